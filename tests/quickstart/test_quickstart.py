"""The reduced quickstart: every step of the real pipeline runs through its program and leaves its output."""

import csv
import json

import pytest

import quickstart

# Four-way multiple choice, chance 0.25. The reduced run's VQGAN trains for 100 steps on any machine (it used to
# train for 20 s of wall time, which on a loaded machine was a step or two, and this fell toward chance).
MCQ_FLOOR = 0.40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert quickstart.main(["--output", str(out), "--reduced", "--grpo-steps", "2"]) == 0
    return out


def test_every_step_leaves_its_output(run):
    assert (run / "data" / "images.csv").is_file() and (run / "vqgan" / "vqgan.safetensors").is_file()
    assert list((run / "tokens").glob("*.parquet"))
    for split in ("train", "heldout"):
        assert json.loads((run / "sequences" / split / "manifest.json").read_text())["counts"]["rows_written"] > 0
    assert (run / "train" / "loss_curve.png").is_file()
    assert (run / "model" / "config.json").is_file() and (run / "model" / "vqgan" / "vqgan.yaml").is_file()
    assert (run / "eval" / "results.json").is_file() and (run / "eval" / "report.png").is_file()
    record = json.loads((run / "generated" / "generation.json").read_text())
    assert sum(seg.get("type") == "image" for seg in record["segments"]) == 1
    report = (run / "report" / "README.md").read_text()
    for artifact in ("report.png", "loss_curve.png", "image_0.png", "results.json", "reconstructions.png",
                     "faithfulness.png"):
        assert (run / "report" / artifact).is_file() and artifact in report


def test_grpo_steps_keep_the_supervised_model_and_report_its_faithfulness(run):
    """--grpo-steps: model/ is the GRPO export, sft_model/ the supervised one, both measured on the same prompts."""
    assert (run / "sft_model" / "config.json").is_file() and (run / "grpo" / "medmax_run.json").is_file()
    summary = json.loads((run / "report" / "summary.json").read_text())
    before, after = summary["faithfulness_before_grpo"], summary["faithfulness"]
    assert before["n"] == after["n"] >= 16 and 0.0 <= before["match"] <= 1.0
    assert "before GRPO" in (run / "report" / "README.md").read_text() and (run / "report" / "faithfulness_sft.png").is_file()


def test_a_negative_grpo_step_count_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        quickstart.main(["--output", str(tmp_path / "run"), "--grpo-steps", "-1"])
    assert exit_.value.code == 2 and "--grpo-steps" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_dicom_files_pass_through_the_tokenizer(run):
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["images"]["dicom_tokenized"] >= 2  # CT and MR from pydicom's bundled files


def test_heldout_accuracy_beats_chance(run):
    results = json.loads((run / "eval" / "results.json").read_text())
    closed = results["synthetic_closed"]
    assert closed["n"] >= 40
    # chance is 0.5; the reduced setting (300 scans, 80 steps) lands around 0.9
    assert closed["score"] >= 0.75


def test_heldout_mcq_accuracy_beats_chance(run):
    mcq = json.loads((run / "eval" / "results.json").read_text())["synthetic_mcq"]
    assert mcq["n"] >= 20
    assert mcq["score"] >= MCQ_FLOOR  # chance is 0.25


def test_the_vqgan_never_saw_a_heldout_scan(run):
    with open(run / "data" / "train_images.csv") as f:
        trained_on = {r["img_path"] for r in csv.DictReader(f)}
    held_out = {json.loads(line)["image_path"] for line in (run / "data" / "eval" / "eval.jsonl").read_text().splitlines()}
    assert held_out and not trained_on & held_out
    assert json.loads((run / "vqgan" / "summary.json").read_text())["n_images"] == len(trained_on)


def test_text_to_image_faithfulness_is_measured_on_heldout_prompts(run):
    faith = json.loads((run / "report" / "summary.json").read_text())["faithfulness"]
    assert faith["n"] >= 16 and faith["chance"] == 1 / 8 and len(faith["found"]) == faith["n"]
    assert 0.0 <= faith["match"] <= min(faith["position_match"], faith["size_match"]) <= 1.0
    assert "faithfulness" in (run / "report" / "README.md").read_text()
    fid = faith["fid"]  # drawn against the same prompts' held-out scans, on the VQGAN encoder's features
    assert (fid["n_generated"], fid["n_real"], fid["extractor"]) == (faith["n"], faith["n"], "vqgan-encoder") and fid["fid"] >= 0
    assert "stand-in" in (run / "report" / "README.md").read_text()


def test_the_report_says_the_fid_extractor_is_a_stand_in():
    fid = {"fid": 12.5, "kid": 0.01, "kid_std": 0.002, "n_generated": 64, "n_real": 64}
    line = " ".join(quickstart._fid_lines(fid))
    assert "12.500" in line and "64 drawn and 64 real" in line and "stand-in" in line and "VQGAN encoder" in line
    assert quickstart._fid_lines(None) == []


def test_closed_accuracy_falls_towards_chance_without_the_image(run):
    """Issue 28: the image ablation can see a model that looks (chance 0.5 for yes/no)."""
    ablation = json.loads((run / "report" / "summary.json").read_text())["image_ablation"]["closed"]
    real, shuffled = ablation["real"]["score"], ablation["shuffled"]["score"]
    assert shuffled <= real - 0.15 and shuffled <= 0.7
    assert ablation["mcnemar_real_vs_shuffled"]["p_value"] < 0.05 and not ablation["flagged"]
    assert "Image ablation" in (run / "report" / "README.md").read_text()
