"""Paired-image consistency as one mechanism (issue 28): any task's pair_id column gives paired_accuracy."""

import json

from PIL import Image

import eval.run as run
from eval.report import task_metrics
from eval.tasks import TASKS_BY_KEY


def test_any_correct_scored_task_with_pairs_reports_pair_accuracy():
    rows = [{"uid": "a", "correct": True, "pair_id": "p1"}, {"uid": "b", "correct": False, "pair_id": "p1"},
            {"uid": "c", "correct": True, "pair_id": "p2"}, {"uid": "d", "correct": True, "pair_id": "p2"}]
    for key in ("slake_closed", "pmc_vqa_mcq", "probmed_closed"):
        entry = task_metrics(TASKS_BY_KEY[key], rows)
        assert entry["metrics"]["paired_accuracy"]["n"] == 2 and entry["metrics"]["paired_accuracy"]["score"] == 0.5
    medmax = task_metrics(TASKS_BY_KEY["slake_closed"], [{**r, "medmax_text": "yes", "answer": "yes"} for r in rows], "medmax")
    assert medmax["metrics"]["paired_accuracy"]["score"] == 0.5
    assert "paired_accuracy" not in task_metrics(TASKS_BY_KEY["slake_closed"], [{"uid": "a", "correct": True}])["metrics"]


def test_a_pair_id_column_reaches_the_rows_of_any_task(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):  # MediConfusion-style: two images, one question each, scored as a pair
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(data / f"{i}.png")
        rows.append({"task_name": "vqa_rad", "question_type": "closed", "prompt": "Is there a mass?",
                     "answer": "yes" if i % 2 else "no", "image_path": f"{i}.png", "pair_id": f"pair{i // 2}"})
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--tasks", "vqa_rad_closed",
                     "--max-new-tokens", "1", "--device", "cpu"]) == 0
    entry = json.loads((out / "results.json").read_text())["vqa_rad_closed"]
    assert entry["metrics"]["paired_accuracy"]["n"] == 2
    assert entry["metrics"]["paired_accuracy"]["score"] <= entry["score"]
