"""End to end: a tiny model on a small synthetic set in MedMax's schema, all 12 VQA task names present."""

import json
from pathlib import Path

import pytest
from PIL import Image

import eval.run as run
from eval.tasks import VQA_TASKS


def _main(argv):
    """Run the program as a user would; -> its results.json (None when it wrote none)."""
    assert run.main(argv) == 0
    path = Path(argv[argv.index("--output") + 1]) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None

ROWS_PER_TASK = 2
ANSWERS = {"closed": "yes", "open": "upper left lesion", "mcq": "B"}
OPTIONS = "\n(A) lung\n(B) liver\n(C) brain\n(D) kidney"
BAD_ROWS = [
    ({"task_name": "vqa_rad", "question_type": "closed", "image_path": "/etc/hostname"}, "is absolute"),
    ({"task_name": "slake", "question_type": "open", "image_path": "../outside.png"}, "contains '..'"),
    ({"task_name": "pmc_vqa", "question_type": "mcq", "image_path": "img/missing.png", "answer": "A"}, "not found"),
    ({"task_name": "made_up_task", "question_type": "closed", "image_path": "img/0.png"}, "unknown task 'made_up_task'"),
]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    (root / "img").mkdir()
    for i in range(ROWS_PER_TASK):
        Image.new("RGB", (72, 64), (60 * i, 120, 200 - 50 * i)).save(root / "img" / f"{i}.png")
    rows = []
    for task in VQA_TASKS:
        for i in range(ROWS_PER_TASK):
            rows.append({"task_name": task.name, "question_type": task.type, "answer": ANSWERS[task.type],
                         "prompt": "Is there a lesion in the image?" + (OPTIONS if task.type == "mcq" else ""),
                         "image_path": f"img/{i}.png", "pair_id": f"{i // 2}:modality" if task.name == "probmed" else None})
    rows.append({"task_name": "image_captioning", "question_type": "pmc_oa", "prompt": "", "answer": "a CT scan", "image_path": "img/0.png"})
    rows.append({"task_name": "visual_chat", "question_type": "conversation", "prompt": "What is shown?\n<image>",
                 "answer": str({"gpt4_answer": "a bright round lesion", "fig_caption": "c", "fig_label": "Fig 1",
                                "in_text_mention": "m", "domain": {"ct_scan": True}}), "image_path": "img/1.png"})
    rows += [{"prompt": "q", "answer": "yes", **bad} for bad, _ in BAD_ROWS]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(tiny_model_dir, data, out, *extra):
    return ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-new-tokens", "3",
            "--batch-size", "4", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = _main(_argv(tiny_model_dir, eval_data, out))
    return out, results


def test_every_vqa_task_is_scored(full_run):
    out, results = full_run
    for task in VQA_TASKS:
        entry = results[task.key]
        assert entry["n"] + entry["n_errors"] == ROWS_PER_TASK + (task.key in ("vqa_rad_closed", "slake_open", "pmc_vqa_mcq"))
        assert entry["metric"] == ("recall" if task.type == "open" else "accuracy")
        assert 0.0 <= entry["score"] <= 1.0 and entry["stderr"] is not None
        rows = [json.loads(l) for l in (out / "predictions" / f"{task.key}.jsonl").read_text().splitlines()]
        assert {"question", "image", "answer", "output"} <= set(rows[0])
    assert set(results["probmed_closed"]["metrics"]) == {"accuracy", "paired_accuracy"}
    assert results["probmed_closed"]["metrics"]["paired_accuracy"]["n"] == 1  # both rows form pair 0
    assert results["visual_chat"]["metric"] == "token_f1" and results["visual_chat"]["n"] == 1
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "report.png").stat().st_size > 0 and "| vqa_rad_closed | toolkit | accuracy |" in (out / "report.md").read_text()


def test_bad_rows_are_reported_and_the_rest_completes(full_run):
    out, results = full_run
    problems = [json.loads(l) for l in (out / "problems.jsonl").read_text().splitlines()]
    assert results["_problems"] == len(BAD_ROWS) == len(problems)
    for _, reason in BAD_ROWS:
        assert any(reason in p["reason"] for p in problems), reason
    assert results["vqa_rad_closed"]["n_errors"] == 1
    assert "no --clip-model" in results["image_captioning_pmc_oa"]["skipped"]
    assert "no rows" in results["image_generation_report"]["skipped"]
    assert "contains '..'" in (out / "report.md").read_text()


def test_report_lists_real_results_first_and_skipped_tasks_once_per_reason(full_run):
    """Issue 23: --tasks all on one benchmark's data put many "skipped: no rows" lines before the real ones."""
    out, results = full_run
    lines = (out / "report.md").read_text().splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("| ")]
    assert not any("skipped" in lines[i] for i in table)
    no_rows = sorted(k for k, e in results.items() if not k.startswith("_") and "no rows" in e.get("skipped", ""))
    assert len(no_rows) > 1
    summary = [line for line in lines if "no rows for this task in the data" in line]
    assert summary == [f"- no rows for this task in the data: {', '.join(no_rows)}"]
    assert lines.index(summary[0]) > table[-1] and lines.index(summary[0]) > lines.index(f"## Skipped tasks ({len(no_rows) + 1})")


def test_resume_after_interruption_gives_identical_results(tiny_model_dir, eval_data, full_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real, calls = run.evaluate_batch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.main(_argv(tiny_model_dir, eval_data, out))
    assert not (out / "results.json").exists()
    shard = out / "predictions" / "slake_closed.rank0.jsonl"
    done_before = shard.read_text().count("\n")
    with open(shard, "a") as f:
        f.write('{"uid": "eval.jsonl:')  # a line cut short by the interruption
    monkeypatch.setattr(run, "evaluate_batch", real)
    run.main(_argv(tiny_model_dir, eval_data, out))
    assert (out / "results.json").read_bytes() == (full_run[0] / "results.json").read_bytes()
    assert done_before == ROWS_PER_TASK and shard.read_text().count("\n") == ROWS_PER_TASK  # nothing redone
    for task in VQA_TASKS:
        name = f"predictions/{task.key}.jsonl"
        assert (out / name).read_text() == (full_run[0] / name).read_text()
    run.main(_argv(tiny_model_dir, eval_data, out))  # a finished run reruns to the same file
    assert (out / "results.json").read_bytes() == (full_run[0] / "results.json").read_bytes()


def test_shards_merge_to_the_single_process_results(tiny_model_dir, eval_data, full_run, tmp_path):
    out = tmp_path / "sharded"
    tasks = "vqa_rad,pmc_vqa,probmed"
    shard = ("--tasks", tasks, "--num-shards", "2", "--run-id", "launch-1")
    assert _main(_argv(tiny_model_dir, eval_data, out, *shard, "--shard-rank", "1")) is None
    results = _main(_argv(tiny_model_dir, eval_data, out, *shard, "--shard-rank", "0"))
    assert (out / "predictions" / "vqa_rad_closed.rank1.jsonl").is_file()
    for key in ("vqa_rad_closed", "vqa_rad_open", "pmc_vqa_mcq", "probmed_closed"):
        assert results[key] == full_run[1][key]


def test_limit_and_flag_errors(tiny_model_dir, eval_data, tmp_path, capsys):
    results = _main(_argv(tiny_model_dir, eval_data, tmp_path / "lim", "--tasks", "slake_closed", "--limit", "2"))
    assert results["slake_closed"]["n"] == 2 and {k for k in results if not k.startswith("_")} == {"slake_closed"}
    capsys.readouterr()
    for extra, message in ((["--tasks", "nope"], "unknown task 'nope'"), (["--limit", "0"], "--limit must be >= 1"),
                           (["--judge-url", "ftp://judge"], "--judge-url must start with http")):
        assert run.main(_argv(tiny_model_dir, eval_data, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medmax-eval: error: ") and message in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_workers_spawn_shards_and_merge(tiny_model_dir, eval_data, full_run, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(run.__file__).resolve().parents[1])  # workers run `python -m eval.run`
    out = tmp_path / "workers"
    results = _main(_argv(tiny_model_dir, eval_data, out, "--tasks", "vqa_rad_closed,path_mmu", "--workers", "2"))
    assert (out / "predictions" / "path_mmu_mcq.rank1.jsonl").is_file()
    for key in ("vqa_rad_closed", "path_mmu_mcq"):
        assert results[key] == full_run[1][key]


def test_one_bad_row_never_takes_down_its_batch(tiny_model_dir, tmp_path, monkeypatch):
    """A broken image, an image whose decoding runs out of memory, and a prompt whose generation raises are
    each that row's reported failure; the other rows of the same batch are scored (issue 12)."""
    import medmax.images
    from medmax.generation import Generator

    data = tmp_path / "data"
    data.mkdir()
    for name in ("good.png", "huge.png"):
        Image.new("RGB", (64, 64), (10, 90, 200)).save(data / name)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8)
    images = ["good.png", "broken.png", "huge.png", "good.png", "good.png"]
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": ("EXPLODE " if i == 3 else "") + f"Lesion {i}?",
             "answer": "yes", "image_path": image} for i, image in enumerate(images)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_load, real_generate = medmax.images.load_image, Generator.generate

    def load_image(source, **kwargs):
        if str(source).endswith("huge.png"):
            raise MemoryError  # stands in for a decompression that exhausts memory
        return real_load(source, **kwargs)

    def generate(self, prompts, config=None):
        if any(isinstance(s, str) and "EXPLODE" in s for p in prompts for s in p):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_generate(self, prompts, config)

    monkeypatch.setattr(medmax.images, "load_image", load_image)
    monkeypatch.setattr(Generator, "generate", generate)
    out = tmp_path / "out"
    results = _main(_argv(tiny_model_dir, data, out, "--tasks", "vqa_rad_closed", "--batch-size", "8"))
    assert results["vqa_rad_closed"]["n"] == 2 and results["vqa_rad_closed"]["n_errors"] == 3
    reasons = {p["uid"]: p["reason"] for p in map(json.loads, (out / "problems.jsonl").read_text().splitlines())}
    assert "broken.png" in reasons["rows.jsonl:1"]
    assert "memory" in reasons["rows.jsonl:2"].lower() and "huge.png" in reasons["rows.jsonl:2"]
    assert "RuntimeError" in reasons["rows.jsonl:3"] and "illegal memory access" in reasons["rows.jsonl:3"]
    assert set(reasons) == {"rows.jsonl:1", "rows.jsonl:2", "rows.jsonl:3"}


def test_every_flag_defaults_to_its_eval_config_field(tmp_path, monkeypatch):
    """Each default is written once, in EvalConfig (torchrun's RANK / WORLD_SIZE fill the shard flags)."""
    import dataclasses

    from eval.run import EvalConfig, build_parser, config_from_args

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = build_parser().parse_args(["--model", "m", "--data", str(tmp_path), "--output", str(tmp_path / "o")])
    built = config_from_args(args)
    for f in dataclasses.fields(EvalConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(built, f.name) == f.default, f.name


# ------------------------------------------------------------------------------ runs that score little or nothing
def _mevf_rad(root: Path, n_closed: int = 3) -> Path:
    """VQA-RAD as MEVF (github.com/aioz-ai/MICCAI19-MedVQA) ships it: ``data_RAD/testset.json`` with the images
    in ``data_RAD/images/`` (README: "extracted to data_RAD/"; its users read ``data_RAD/images/<image_name>``)."""
    folder = root / "data_RAD"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 90, 200)).save(folder / "images" / "synpic100.jpg")
    rows = [{"qid": i, "image_name": "synpic100.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
             "question_type": "PRES", "question": f"Is there a mass {i}?", "phrase_type": "freeform"} for i in range(n_closed)]
    (folder / "testset.json").write_text(json.dumps(rows))
    return folder


def test_vqa_rad_split_file_finds_its_images_without_image_dir(tiny_model_dir, tmp_path):
    """Issue 23 item 7: the MEVF layout's images are in images/, not in the OSF release's folder name."""
    data = _mevf_rad(tmp_path)
    results = _main(_argv(tiny_model_dir, data, tmp_path / "out", "--data-format", "vqa_rad", "--source", "testset.json",
                          "--tasks", "vqa_rad_closed"))
    assert results["vqa_rad_closed"]["n"] == 3 and results["vqa_rad_closed"]["n_errors"] == 0


def test_a_run_that_scores_nothing_says_why_and_exits_non_zero(tiny_model_dir, tmp_path, capsys, caplog):
    """Issue 23 item 7: every row failing was exit 0, a silent console and a report showing 0."""
    data = _mevf_rad(tmp_path)
    out = tmp_path / "out"
    argv = _argv(tiny_model_dir, data, out, "--data-format", "vqa_rad", "--source", "testset.json",
                 "--tasks", "vqa_rad_closed", "--image-dir", "VQA_RAD Image Folder")
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medmax-eval: error: no row was scored") and "not found" in err[0]
    assert "--image-dir" in err[0]
    assert "vqa_rad_closed: 3 of 3 rows were not scored" in caplog.text and "synpic100.jpg" in caplog.text
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and "3 of 3 rows were not scored" in report
    assert json.loads((out / "results.json").read_text())["vqa_rad_closed"]["n_errors"] == 3


def test_a_task_whose_rows_mostly_fail_warns_with_the_first_reason(tiny_model_dir, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(data / "good.png")
    images = ["good.png", "gone1.png", "gone2.png"]
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Lesion {i}?", "answer": "yes",
             "image_path": image} for i, image in enumerate(images)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _main(_argv(tiny_model_dir, data, tmp_path / "out", "--tasks", "vqa_rad_closed"))
    assert results["vqa_rad_closed"]["n"] == 1
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "2 of 3 rows were not scored" in r.getMessage()]
    assert len(warned) == 1 and "gone1.png" in warned[0].getMessage()
    assert results["_warnings"] == [warned[0].getMessage()]


def test_data_whose_rows_mostly_cannot_be_read_warns(tiny_model_dir, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(data / "a.png")
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": "Lesion?", "answer": "yes", "image_path": "a.png"}]
    rows += [{"task_name": "pmc_vqa", "question_type": "mcq", "prompt": "Which?\n(A) lung\n(B) liver", "answer": "kidney",
              "image_path": "a.png"}] * 2
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _main(_argv(tiny_model_dir, data, tmp_path / "out", "--tasks", "vqa_rad_closed"))
    assert results["vqa_rad_closed"]["n"] == 1
    [line] = results["_warnings"]
    assert line.startswith("2 of 3 rows of the data could not be read or belong to no task; the first, rows.jsonl:1:")
    assert line in caplog.text


def test_eval_s_memory_check_can_be_raised(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """README "Bad input and limits": the model-memory check of every program that loads a model can be overridden."""
    import medmax.model

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(data / "a.png")
    row = {"task_name": "vqa_rad", "question_type": "closed", "prompt": "Lesion?", "answer": "yes", "image_path": "a.png"}
    (data / "rows.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(medmax.model, "_available_bytes", lambda device=None: 1 << 20)  # 1 MiB free
    capsys.readouterr()
    assert run.main(_argv(tiny_model_dir, data, tmp_path / "mem", "--tasks", "vqa_rad_closed")) == 2
    assert "only 1.0 MiB" in capsys.readouterr().err
    results = _main(_argv(tiny_model_dir, data, tmp_path / "mem", "--tasks", "vqa_rad_closed", "--skip-memory-check"))
    assert results["vqa_rad_closed"]["n"] == 1  # the flag decides no prediction: the same folder resumes
