"""M3D-VQA (BAAI-DCAI/M3D): its CSV as the generator writes it, converted to closed (mcq) and open questions on
.npy volumes, and scored end to end by eval.run with the 2D tasks' rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import eval.run as run
from eval.data import load_records
from eval.scoring import score_mcq

# The header m3d_vqa_data_generation.py writes, in its order.
HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "Answer Choice"]
REPORT = "Findings: A hypodense lesion in the right hepatic lobe,\nmeasuring 3 cm.\n\nImpression: \"liver lesion\"."
ROWS = [
    # a plane question (type 1), all four choices
    ["M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy", REPORT, "1", "In which plane is this CT image taken?",
     "Sagittal", "Axial", "Coronal", "Oblique", "Axial", "B"],
    # a yes/no question with two choices: the others are 'NA' (the generator fills them so)
    ["M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy", REPORT, "5", "Is the lesion in the right lobe?",
     "Yes", "No", "NA", "NA", "Yes", "A"],
    # a volume that is not there
    ["M3D_Cap_npy/ct_case/000002/missing.npy", "r", "3", "Which organ is enlarged?", "Liver", "Spleen", "Kidney", "Pancreas", "Spleen", "B"],
]


@pytest.fixture(scope="module")
def m3d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m3d")
    volume = root / "M3D_Cap_npy" / "ct_case" / "000001" / "Axial_non_contrast.npy"
    volume.parent.mkdir(parents=True)
    np.save(volume, np.random.default_rng(0).random((1, 8, 32, 32), dtype=np.float32))  # (1, D, H, W), 0..1 as M3D's
    with open(root / "M3D_VQA_test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    return root


def test_each_row_is_a_closed_and_an_open_question(m3d):
    records, problems = load_records(m3d, "m3d_vqa", source=Path("M3D_VQA_test.csv"))
    assert problems == []
    by_uid = {r.uid: r for r in records}
    mcq = by_uid["M3D_VQA_test.csv:0:mcq:plane"]
    assert (mcq.task_name, mcq.question_type, mcq.answer) == ("m3d_vqa", "mcq", "B")
    assert mcq.options == {"A": "Sagittal", "B": "Axial", "C": "Coronal", "D": "Oblique"}
    assert mcq.prompt == "In which plane is this CT image taken?\n(A) Sagittal\n(B) Axial\n(C) Coronal\n(D) Oblique"
    assert mcq.image_path == "M3D_Cap_npy/ct_case/000001/Axial_non_contrast.npy"
    yes_no = by_uid["M3D_VQA_test.csv:1:mcq:location"]
    assert yes_no.options == {"A": "Yes", "B": "No"}  # the NA choices are not offered
    open_q = by_uid["M3D_VQA_test.csv:1:open:location"]
    assert (open_q.question_type, open_q.prompt, open_q.answer) == ("open", "Is the lesion in the right lobe?", "Yes")
    assert score_mcq("(B) Axial", mcq.answer, mcq.options) and not score_mcq("A", mcq.answer, mcq.options)


def test_eval_run_scores_volumes_with_the_2d_rules(m3d, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(m3d), "--data-format", "m3d_vqa", "--source", "M3D_VQA_test.csv",
                     "--tasks", "m3d_vqa", "--output", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["m3d_vqa_mcq"]["metric"] == "accuracy" and results["m3d_vqa_open"]["metric"] == "recall"
    for key in ("m3d_vqa_mcq", "m3d_vqa_open"):
        assert (results[key]["n"], results[key]["n_errors"]) == (2, 1)  # the missing volume is that row's error
        rows = [json.loads(line) for line in (out / "predictions" / f"{key}.jsonl").read_text().splitlines()]
        assert any("missing.npy" in (r.get("error") or "") for r in rows)
