"""The reduced quickstart: every step of the real pipeline runs through its program and leaves its output."""

import json

import pytest

import quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert quickstart.main(["--output", str(out), "--reduced"]) == 0
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
    for artifact in ("report.png", "loss_curve.png", "image_0.png", "results.json", "reconstructions.png"):
        assert (run / "report" / artifact).is_file() and artifact in report


def test_dicom_files_pass_through_the_tokenizer(run):
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["images"]["dicom_tokenized"] >= 2  # CT and MR from pydicom's bundled files


def test_heldout_accuracy_beats_chance(run):
    results = json.loads((run / "eval" / "results.json").read_text())
    closed = results["synthetic_closed"]
    assert closed["n"] >= 40
    # chance is 0.5; the reduced setting (300 scans, 80 steps) lands around 0.9
    assert closed["score"] >= 0.75
