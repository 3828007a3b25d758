"""Results always belong to their model and settings: an output folder's fingerprint, checked before any work.

Reproduces issue 10: model A into ``--output O``, then model B (or another setting) into the same ``O``,
never loaded model B and left A's results.json under a report naming B.
"""

import hashlib
import importlib.metadata
import json
import shutil

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import eval.run as run
from medmax.presets import make_model_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpdata")
    Image.new("RGB", (64, 64), (10, 90, 200)).save(root / "a.png")
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Is there a lesion {i}?", "answer": "yes",
             "image_path": "a.png"} for i in range(3)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def model_b(tiny_vqgan, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model_b"), "tiny", vqgan=tiny_vqgan, seed=1)


def _argv(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--device", "cpu", "--tasks", "vqa_rad_closed",
            "--max-new-tokens", "2", *extra]


@pytest.fixture(scope="module")
def done_a(tiny_model_dir, data, tmp_path_factory):
    """A finished run of model A; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("run_a") / "out"
    assert run.main(_argv(tiny_model_dir, data, out)) == 0
    return out


@pytest.fixture
def out_a(done_a, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(done_a, out)
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the fingerprint was checked")

    monkeypatch.setattr(run, "_setup", refuse)


def _refused(argv, capsys) -> str:
    """Run the program; it must stop with exit code 2 and one line naming the difference; -> that line."""
    assert run.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("medmax-eval: error: "), err
    return err[0]


def test_another_model_into_the_same_folder_refuses_before_loading(out_a, model_b, data, no_model_load, capsys):
    before = {p.name: p.read_bytes() for p in out_a.iterdir() if p.is_file()}
    line = _refused(_argv(model_b, data, out_a), capsys)
    assert "model" in line and "model.safetensors" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out_a.iterdir() if p.is_file()} == before  # nothing rewritten


@pytest.mark.parametrize("extra, name", [
    (["--prompt-style", "chameleon"], "prompt_style"),
    (["--max-new-tokens", "5"], "max_new_tokens"),
    (["--repetition-penalty", "1.3"], "repetition_penalty"),
    (["--seed", "7"], "seed"),
    (["--dtype", "bfloat16"], "dtype"),
    (["--limit", "2"], "limit"),
    (["--protocol", "medmax"], "protocol"),
])
def test_another_setting_refuses_naming_it(out_a, tiny_model_dir, data, no_model_load, capsys, extra, name):
    argv = _argv(tiny_model_dir, data, out_a)
    if name in ("max_new_tokens", "protocol"):  # medmax's protocol fixes the answer length itself
        i = argv.index("--max-new-tokens")
        del argv[i : i + 2]
    line = _refused(argv + extra, capsys)
    assert name in line


def test_changed_weights_or_data_at_the_same_path_refuse(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    model, rows = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(data, rows)
    out = tmp_path / "out"
    assert run.main(_argv(model, rows, out)) == 0
    capsys.readouterr()
    monkeypatch.setattr(run, "_setup", lambda *a, **k: pytest.fail("model loaded"))
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert "model.safetensors" in _refused(_argv(model, rows, out), capsys)
    shutil.copy(tiny_model_dir / "model.safetensors", model / "model.safetensors")  # weights back
    text = (rows / "rows.jsonl").read_text().replace('"answer": "yes"', '"answer": "no"', 1)
    (rows / "rows.jsonl").write_text(text)
    assert "rows.jsonl" in _refused(_argv(model, rows, out), capsys)


def test_the_same_model_and_data_elsewhere_reuse_the_predictions(out_a, tiny_model_dir, data, tmp_path, no_model_load):
    """The path is not part of the fingerprint: a copied model folder resumes (nothing to do, no model load)."""
    moved = tmp_path / "moved_model"
    shutil.copytree(tiny_model_dir, moved)
    before = (out_a / "results.json").read_bytes()
    assert run.main(_argv(moved, data, out_a)) == 0
    assert (out_a / "results.json").read_bytes() == before


def test_overwrite_starts_afresh_and_keeps_files_eval_did_not_write(out_a, model_b, data, tiny_model_dir):
    (out_a / "notes.txt").write_text("mine")
    (out_a / "predictions" / "my_analysis.csv").write_text("mine too")
    old = json.loads((out_a / "results.json").read_text())["_fingerprint"]["digest"]
    assert run.main(_argv(model_b, data, out_a, "--overwrite")) == 0
    results = json.loads((out_a / "results.json").read_text())
    assert results["_fingerprint"]["digest"] != old
    assert (out_a / "notes.txt").read_text() == "mine" and (out_a / "predictions" / "my_analysis.csv").is_file()
    rows = [json.loads(line) for line in (out_a / "predictions" / "vqa_rad_closed.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["fingerprint"] for r in rows} == {results["_fingerprint"]["digest"][:16]}


def test_results_carry_the_fingerprint_and_the_toolkit_version(done_a, tiny_model_dir, data):
    results = json.loads((done_a / "results.json").read_text())
    fp = results["_fingerprint"]
    assert results["_toolkit_version"] == importlib.metadata.version("medmax-toolkit") == fp["toolkit_version"]
    digest = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert fp["model"]["model.safetensors"] == digest and "config.json" in fp["model"] and "tokenizer.json" in fp["model"]
    assert any(name.startswith("vqgan/") for name in fp["model"])
    assert fp["data"] == {"rows.jsonl": hashlib.sha256((data / "rows.jsonl").read_bytes()).hexdigest()}
    assert fp["settings"]["prompt_style"] == "sft" and fp["settings"]["max_new_tokens"] == 2
    assert str(tiny_model_dir) not in json.dumps(fp)  # the content decides, not the path
    assert json.loads((done_a / "fingerprint.json").read_text())["digest"] == fp["digest"]


def test_a_folder_without_a_fingerprint_is_not_reused(out_a, tiny_model_dir, data, no_model_load, capsys):
    """Predictions written by an older version (no fingerprint.json) cannot be told apart: refuse."""
    (out_a / "fingerprint.json").unlink()
    assert "fingerprint" in _refused(_argv(tiny_model_dir, data, out_a), capsys)
