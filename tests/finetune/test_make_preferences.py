"""finetune.make_preferences: MMedPO's two kinds of dispreferred answer, local noising, weights, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.make_preferences import main
from medmax.preference_mining import Box, changed_share, noise_region, question_type, random_box, swap_answer
from medmax.data.preference_loader import load_preferences
from medmax.synthetic import write_dataset
from tokenization.build_preferences import main as build_main


def test_swapped_answers_keep_the_question_type():
    rng = np.random.default_rng(0)
    assert swap_answer("closed", "Is there a lesion?", "yes", rng) == "no"
    assert swap_answer("closed", "Is there a lesion?", "No.", rng) == "yes"
    mcq = "Where is the lesion? A) upper left B) upper right C) lower left D) lower right"
    picked = {swap_answer("mcq", mcq, "B", rng) for _ in range(40)}
    assert picked == {"A", "C", "D"}
    assert swap_answer("mcq", "Which?", "B", rng, options={"A": "x", "B": "y"}) == "A"
    assert swap_answer("open", "Where?", "upper left", rng, pool=["upper left", "lower right"]) == "lower right"
    assert swap_answer("open", "Where?", "upper left", rng, pool=["upper left"]) is None
    assert question_type(mcq, "C") == "mcq" and question_type("Is it?", "Yes") == "closed"
    assert question_type("Where?", "upper left") == "open"


def test_noise_touches_only_the_region_and_the_weight_counts_changed_codes():
    pixels = torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)
    box = Box(0.25, 0.5, 0.75, 1.0)
    noised = noise_region(pixels, box.mask(16, 16), 0.9, torch.Generator().manual_seed(0))
    inside = box.mask(16, 16)
    assert torch.equal(noised[:, ~inside], pixels[:, ~inside])
    assert (noised[:, inside] != pixels[:, inside]).float().mean() > 0.99 and inside.sum() == 8 * 8
    assert noised.min() >= -1 and noised.max() <= 1
    assert changed_share([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    side = random_box(np.random.default_rng(1), 0.4)
    assert side.x1 - side.x0 == pytest.approx(0.4) and 0 <= side.x0 and side.y1 <= 1
    with pytest.raises(ValueError, match="lesion_box"):
        Box.parse([0.5, 0.2, 0.4, 0.9], "lesion_box")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    write_dataset(root, 6, 3, seed=0)
    return root


def test_pairs_from_eval_and_training_rows_build_into_a_preference_folder(tmp_path, tiny_model_dir, scans, capsys):
    rows = [json.loads(line) for line in (scans / "eval" / "eval.jsonl").read_text().splitlines()]
    rows[0]["weight"] = 0.3
    rows[1]["lesion_box"] = [0.1, 0.1, 0.6, 0.6]
    rows.append({**rows[2], "image_path": "../../outside.png"})  # leaves the image root
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs.jsonl"
    argv = ["--model", str(tiny_model_dir), "--input", str(src), str(scans / "train.jsonl"), "--image-root",
            str(scans), "--output", str(out), "--image-pairs", "mirror", "--batch-size", "8"]
    main(argv)
    made = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [json.loads(line) for line in Path(f"{out}.errors.jsonl").read_text().splitlines()]
    assert any(e["row"] == len(rows) and "leaves" in e["reason"] for e in errors)
    text = [m for m in made if m["question_type"] != "generation"]
    for m in text:
        assert m["chosen"] != m["rejected"] and len(m["images"]) == 1 and m["prompt"].startswith("<image>")
    gold = {(r["prompt"], r["image_path"]): r["answer"] for r in rows[:-1]}
    for m in text:
        if (m["prompt"][len("<image>"):], m["image_path"]) in gold:
            assert m["chosen"] == gold[(m["prompt"][len("<image>"):], m["image_path"])]
    first = [m for m in text if m["source"] == f"{src}:1"]
    assert first and all(m["weight"] == 0.3 for m in first)
    noise = [m for m in made if m["kind"] == "noise" and m["source"] != f"{src}:1"]
    assert all(0 < m["weight"] <= 1 for m in noise)
    images = [m for m in made if m["kind"] == "image_mirror"]
    assert images and all(m["chosen"]["image_tokens"] != m["rejected"]["image_tokens"] for m in images)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["pairs"] == len(made) and summary["left_out"]["unreadable_row"] >= 1
    build_main(["--input", str(out), "--tokenizer", str(tiny_model_dir), "--output", str(tmp_path / "folder"),
                "--no-progress", "--strict"])
    assert len(load_preferences(tmp_path / "folder")) == len(made)
    capsys.readouterr()
    assert main(argv) == 2  # one error line naming the flag, not a traceback
    assert "--overwrite" in capsys.readouterr().err


def _eval_rows(scans: Path) -> list[dict]:
    return [json.loads(line) for line in (scans / "eval" / "eval.jsonl").read_text().splitlines()]


def _mine(tmp_path, model_dir, scans, lines: list, *flags) -> tuple[int, Path]:
    """Run the program on ``lines`` (dicts are written as JSON, bytes as they are); -> (exit code, output)."""
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines))
    out = tmp_path / "prefs.jsonl"
    code = main(["--model", str(model_dir), "--input", str(src), "--image-root", str(scans), "--output", str(out),
                 "--batch-size", "4", *flags])
    return code, out


def _errors(out: Path) -> dict[int, dict]:
    return {e["row"]: e for e in map(json.loads, Path(f"{out}.errors.jsonl").read_text().splitlines())}


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs os.mkfifo")
def test_a_malformed_line_is_that_rows_error_and_the_run_goes_on(tmp_path, tiny_model_dir, scans):
    import os

    good = _eval_rows(scans)[0]
    os.mkfifo(scans / "pipe.png")
    try:
        lines = [b"[1,2,3]", b"null", {**good, "weight": "heavy"}, {**good, "question_type": ["closed"]},
                 b'{"prompt": "\xff\xfe", "answer": "yes"}', {**good, "weight": 1e39}, {**good, "image_path": "pipe.png"},
                 {**good, "options": [1, 2]}, {**good, "lesion_mask": 5}, good]
        code, out = _mine(tmp_path, tiny_model_dir, scans, lines, "--kinds", "hallucination")
    finally:
        os.unlink(scans / "pipe.png")
    assert code == 0
    errors = _errors(out)
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert "expected an object" in errors[1]["reason"] and "expected an object" in errors[2]["reason"]
    assert "'weight'" in errors[3]["reason"] and "'weight'" in errors[6]["reason"]
    assert "question_type" in errors[4]["reason"] and "UTF-8" in errors[5]["reason"]
    assert "not a regular file" in errors[7]["reason"] and "options" in errors[8]["reason"]
    assert "lesion_mask" in errors[9]["reason"]
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert made and all(m["source"].endswith(":10") for m in made)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["rows_read"] == 10 and sum(summary["left_out"].values()) == 9


def test_an_over_long_question_is_its_rows_error_named_by_row(tmp_path, tiny_model_dir, scans):
    good = _eval_rows(scans)[0]
    long = {**good, "prompt": "Is there a lesion " * 1500 + "?"}  # over the tiny model's context of 4096
    code, out = _mine(tmp_path, tiny_model_dir, scans, [good, long, good], "--kinds", "hallucination",
                      "--max-new-tokens", "2")
    assert code == 0
    errors = _errors(out)
    assert list(errors) == [2] and "context" in errors[2]["reason"] and "prompt 0" not in errors[2]["reason"]
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert {m["source"].rsplit(":", 1)[1] for m in made} <= {"1", "3"} and made


def test_settings_that_cannot_work_are_config_errors(tmp_path):
    from finetune.make_preferences import ConfigError, MineConfig
    from medmax.errors import UserError

    assert issubclass(ConfigError, UserError)
    for bad in ({"kinds": ("dream",)}, {"image_pairs": "blur"}, {"noise_level": 2.0}, {"box_side": 0.0},
                {"batch_size": 0}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError):
            MineConfig(model="m", inputs=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "out.jsonl"), **bad)


@pytest.mark.parametrize("how", ["same path", "a link to it", "its error file"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, tiny_model_dir, scans, how):
    src = tmp_path / "rows.jsonl"
    text = (scans / "eval" / "eval.jsonl").read_text()
    out = tmp_path / "prefs.jsonl"
    if how == "same path":
        out = src
    elif how == "a link to it":
        out.symlink_to(src)
    else:
        src = tmp_path / "prefs.jsonl.errors.jsonl"
    src.write_text(text)
    code = main(["--model", str(tiny_model_dir), "--input", str(src), "--image-root", str(scans), "--output", str(out),
                 "--overwrite"])
    assert code == 2 and src.read_text() == text


def test_mcq_options_as_a_json_string_and_a_gold_given_as_text(tmp_path, tiny_model_dir, scans, monkeypatch):
    """The eval schema's options (a JSON string) are options, not characters; a text gold has its letter."""
    from finetune import make_preferences

    options = {"A": "upper left", "B": "upper right", "C": "lower left", "D": "lower right"}
    base = _eval_rows(scans)[0]
    rows = [{**base, "question_type": "mcq", "prompt": "Where is the lesion?", "options": json.dumps(options),
             "answer": "upper right"},
            {**base, "question_type": "mcq", "prompt": "Where is the lesion?", "options": json.dumps(options),
             "answer": "B"}]
    # the model answers right, naming the gold by its letter: never a rejected answer, so one is swapped in
    monkeypatch.setattr(make_preferences.Miner, "answers", lambda self, items, codes: ["(B)"] * len(items))
    code, out = _mine(tmp_path, tiny_model_dir, scans, rows, "--kinds", "hallucination")
    assert code == 0
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["kind"] for m in made] == ["hallucination_swap"] * 2
    assert made[0]["chosen"] == "upper right" and made[0]["rejected"] in {"upper left", "lower left", "lower right"}
    assert made[1]["chosen"] == "B" and made[1]["rejected"] in {"A", "C", "D"}


def test_swapped_mcq_answers_read_the_options_as_eval_does():
    rng = np.random.default_rng(0)
    options = json.dumps({"A": "left", "B": "right"})
    assert {swap_answer("mcq", "Which side?", "right", rng, options) for _ in range(10)} == {"left"}
    assert {swap_answer("mcq", "Which side?", "B", rng, options) for _ in range(10)} == {"A"}
    assert {swap_answer("mcq", "Which side?\nA: left\nB: right", "left", rng) for _ in range(10)} == {"right"}


def test_rows_are_streamed_a_batch_at_a_time(tmp_path, tiny_model_dir, scans, monkeypatch):
    """Memory does not grow with the rows: at most a batch of images (and their noised copies) is alive at once."""
    import weakref

    import medmax.images

    alive: list = []
    most = [0]
    real = medmax.images.preprocess

    def counted(*args, **kwargs):
        pixels = real(*args, **kwargs)
        alive.append(weakref.ref(pixels))
        most[0] = max(most[0], sum(r() is not None for r in alive))
        return pixels

    monkeypatch.setattr(medmax.images, "preprocess", counted)
    rows = _eval_rows(scans)
    rows = (rows * (9 // len(rows) + 1))[:9]
    code, out = _mine(tmp_path, tiny_model_dir, scans, rows, "--kinds", "noise", "--max-new-tokens", "1",
                      "--batch-size", "3")
    assert code == 0 and len(alive) == 9 and Path(f"{out}.summary.json").is_file()
    assert most[0] <= 3, f"{most[0]} images alive at once with --batch-size 3"


def test_inputs_are_found_as_build_sequences_finds_them_before_the_model_loads(tmp_path, scans):
    from finetune.make_preferences import MineConfig
    from medmax.errors import UserError

    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.jsonl").write_text("{}\n")
    cfg = MineConfig(model="no-model", inputs=[str(tmp_path / "rows")], output=str(tmp_path / "out.jsonl"))
    assert cfg.inputs == [str(tmp_path / "rows" / "a.jsonl")]  # a folder gives its JSONL and parquet files
    (tmp_path / "rows.csv").write_text("x\n")
    with pytest.raises(UserError, match="unsupported file type"):
        MineConfig(model="no-model", inputs=[str(tmp_path / "rows.csv")], output=str(tmp_path / "out.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        MineConfig(model="no-model", inputs=[str(tmp_path / "missing.jsonl")], output=str(tmp_path / "out.jsonl"))


def test_a_pair_that_would_teach_nothing_is_left_out_at_the_source(tmp_path, tiny_model_dir, scans):
    """An empty gold answer, or an image its perturbation leaves with the same codes, gives no pair (counted)."""
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "flat.png")  # mirroring changes nothing
    rows = [{**_eval_rows(scans)[0], "answer": ""},
            {"text": "Generate a scan: a flat grey scan<reserved08706><image>", "image_path": "flat.png"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs.jsonl"
    code = main(["--model", str(tiny_model_dir), "--input", str(src), "--image-root", str(tmp_path), "--output", str(out),
                 "--image-pairs", "mirror", "--kinds", "hallucination", "--max-new-tokens", "1"])
    assert code == 0 and out.read_text() == ""
    errors = _errors(out)
    assert "'answer' is empty" in errors[1]["reason"] and errors[2]["kind"] == "image_unchanged"


def test_a_training_rows_turn_ends_where_build_sequences_ends_it(tmp_path, tiny_model_dir, scans, monkeypatch):
    """An escaped end-of-turn (``\\<reserved08706>``) is text of the question, as in build_sequences."""
    from finetune import make_preferences

    monkeypatch.setattr(make_preferences.Miner, "answers", lambda self, items, codes: ["no"] * len(items))
    image = _eval_rows(scans)[0]["image_path"]
    row = {"text": "<image>Is \\<reserved08706> shown?<reserved08706>yes", "image_path": image}
    code, out = _mine(tmp_path, tiny_model_dir, scans, [row], "--kinds", "hallucination")
    made = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [(m["prompt"], m["chosen"], m["rejected"]) for m in made] == [
        ("<image>Is \\<reserved08706> shown?", "yes", "no")]
