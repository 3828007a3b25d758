"""Eval data: MedMax schema, released-file converters, safe image paths, task registry, prompt styles."""

import csv
import re
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.data import BadRow, convert_path_mmu, convert_pmc_vqa, load_medmax, load_records, resolve_image
from eval.prompts import build_prompt
from eval.run import apply_limit
from eval.tasks import TASKS, VQA_TASKS, select_tasks, task_for
from medmax.errors import UserError
from medmax.generation import END_OF_TURN


def test_registry_has_medmax_keys():
    assert [t.key for t in VQA_TASKS] == [
        "vqa_rad_closed", "slake_closed", "pathvqa_closed", "quilt_vqa_closed", "vqa_rad_open", "slake_open",
        "pathvqa_open", "quilt_vqa_open", "pmc_vqa_mcq", "omnimed_vqa_mcq", "path_mmu_mcq", "probmed_closed"]
    assert {"image_captioning_report", "image_generation_quilt", "visual_chat", "mm_out"} <= {t.key for t in TASKS}
    assert [t.key for t in select_tasks("slake,probmed_closed")] == ["slake_closed", "slake_open", "probmed_closed"]
    assert task_for("visual_chat", "conversation").key == "visual_chat"
    with pytest.raises(ValueError, match="unknown task 'vqa_radd'"):
        select_tasks("vqa_radd")


def test_resolve_image_refuses_escapes(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    assert resolve_image(root, "img/a.png") == (root / "img" / "a.png").resolve()
    for bad, why in [("/etc/passwd", "absolute"), ("../outside.png", r"'\.\.'"), ("img/../../outside.png", r"'\.\.'"),
                     ("img/link.png", "link"), ("img/missing.png", "not found"), (None, "no image_path")]:
        with pytest.raises(BadRow, match=why):
            resolve_image(root, bad)


def test_medmax_parquet_and_jsonl(tmp_path):
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": "q?", "answer": "yes", "image_path": "a.png"},
            {"task_name": "visual_chat", "question_type": "conversation", "prompt": "<image>\nWhat?",
             "answer": str({"gpt4_answer": "a mass", "domain": {"ct_scan": True}}), "image_path": "b.png"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps({"task_name": "x", "prompt": "p"}) + "\n")
    records, problems = load_medmax(tmp_path)
    assert [r.uid for r in records] == ["a.parquet:0", "a.parquet:1"]
    assert records[1].answer["gpt4_answer"] == "a mass"  # MedMax stores the dict as a Python literal string
    assert problems == [{"uid": "b.jsonl:0", "reason": "missing columns ['question_type', 'answer', 'image_path']"}]


def test_mcq_gold_naming_no_option_is_a_problem_when_loading(tmp_path):
    rows = [{"task_name": "omnimed_vqa", "question_type": "mcq", "prompt": "Which?\nA: CT\nB: MRI", "answer": "ultrasound",
             "image_path": "a.png"},
            {"task_name": "pmc_vqa", "question_type": "mcq", "prompt": "Which organ?", "answer": "liver", "image_path": "a.png"},
            {"task_name": "path_mmu", "question_type": "mcq", "prompt": "Which?\nA) Both (x) and (y)\nB) Neither A) nor B)",
             "answer": "B) Neither A) nor B)", "image_path": "a.png"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, problems = load_records(path)
    assert problems == [{"uid": "rows.jsonl:0", "reason": "MCQ answer 'ultrasound' matches none of the options A, B"},
                        {"uid": "rows.jsonl:1", "reason": "MCQ answer 'liver' is not an option letter and the row has no options"}]
    assert [r.uid for r in records] == ["rows.jsonl:2"] and records[0].options == {"A": "Both (x) and (y)", "B": "Neither A) nor B)"}


def test_pmc_vqa_and_path_mmu(tmp_path):
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"])
        w.writeheader()
        w.writerow({"Figure_path": "PMC1_f1.jpg", "Question": "What organ?", "Answer": "Liver", "Choice A": " A:Lung",
                    "Choice B": " B:Liver", "Choice C": " C:Brain", "Choice D": " D:Kidney", "Answer_label": "B"})
    row = convert_pmc_vqa(tmp_path / "test.csv")[0]
    assert row["answer"] == "B" and row["options"]["B"] == "Liver" and row["image_path"] == "images/PMC1_f1.jpg"

    (tmp_path / "data.json").write_text(json.dumps({"PubMed": {
        "test": [{"No": 1, "question": "Which stain?", "options": ["A) H&E", "B) PAS"], "answer": "B) PAS", "img": "p1.jpg"}],
        "val": [{"No": 2, "question": "dev", "options": ["A) x", "B) y"], "answer": "A", "img": "p2.jpg"}]}}))
    rows = convert_path_mmu(tmp_path / "data.json")
    assert len(rows) == 1 and rows[0]["answer"] == "B" and rows[0]["options"] == {"A": "H&E", "B": "PAS"}


def test_limit_is_deterministic_and_keeps_order(tmp_path):
    records, _ = load_records(_schema(tmp_path, 20), "medmax")
    a = apply_limit(records, 5, seed=0, key="vqa_rad_closed")
    assert [r.uid for r in a] == [r.uid for r in apply_limit(records, 5, seed=0, key="vqa_rad_closed")]
    assert len(a) == 5 and a == sorted(a, key=lambda r: int(r.uid.split(":")[1]))
    assert [r.uid for r in a] != [r.uid for r in apply_limit(records, 5, seed=1, key="vqa_rad_closed")]


def _schema(folder: Path, n: int) -> Path:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"task_name": "vqa_rad", "question_type": "closed", "prompt": f"q{i}",
                                        "answer": "yes", "image_path": "a.png"}) + "\n" for i in range(n)))
    return path


def test_prompt_styles(tmp_path):
    records, _ = load_records(_schema(tmp_path, 1), "medmax")
    rec, task, img = records[0], select_tasks("vqa_rad_closed")[0], tmp_path / "a.png"
    assert build_prompt(rec, task, "sft", img) == [img, "q0", END_OF_TURN]  # MedMax: image, question, end of turn
    assert build_prompt(rec, task, "default", img) == [img, "q0"]
    chameleon = build_prompt(rec, task, "chameleon", img)
    assert chameleon[0] == img and chameleon[1].endswith("Question: q0\nAnswer:") and "'yes' or 'no'" in chameleon[1]


def test_mcq_options_read_from_the_prompt(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"task_name": "omnimed_vqa", "question_type": "mcq", "prompt": "Which?\nA: CT\nB: MRI scan",
                                "answer": "MRI scan", "image_path": "a.png"}) + "\n")
    rec = load_records(path)[0][0]
    assert rec.options == {"A": "CT", "B": "MRI scan"}


def test_visual_chat_image_order(tmp_path):
    rows = [{"task_name": "visual_chat", "question_type": "conversation", "prompt": "What is this?\n<image>", "answer": "{}", "image_path": "a.png"},
            {"task_name": "visual_chat", "question_type": "conversation", "prompt": "<image>\nWhat is this?", "answer": "{}", "image_path": "a.png"},
            {"task_name": "visual_chat", "question_type": "detailed_description", "prompt": "<image>\nDescribe", "answer": "{}", "image_path": "a.png"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, img = select_tasks("visual_chat")[0], tmp_path / "a.png"
    built = [build_prompt(r, task, "sft", img) for r in load_records(path)[0]]
    assert built[0] == ["What is this?", img, END_OF_TURN]  # MedMax: a prompt ending in <image> puts the image last
    assert built[1] == [img, "What is this?", END_OF_TURN]
    assert built[2] == [img, "Analyze the image in a comprehensive and detailed manner.", END_OF_TURN]


def test_synthetic_tasks_are_selectable_but_not_in_all():
    assert [t.key for t in select_tasks("synthetic")] == ["synthetic_closed", "synthetic_mcq", "synthetic_open"]
    assert "synthetic" not in {t.name for t in select_tasks("all")}
    assert task_for("synthetic", "mcq").kind == "mcq"


@pytest.mark.parametrize("fmt, name", [("medmax", "rows.jsonl"), ("vqa_rad", "testset.json"), ("pmc_vqa", "test.csv"),
                                       ("slake", "test.json")])
def test_a_data_file_that_is_not_utf8_is_one_clear_error(tmp_path, fmt, name):
    """README "Bad input and limits": an unreadable file is one line naming it, never a traceback."""
    good = json.dumps({"task_name": "vqa_rad", "question_type": "closed", "prompt": "q", "answer": "yes", "image_path": "a.png"})
    (tmp_path / name).write_bytes(good.encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    source = None if fmt == "medmax" else Path(name)
    where = r"rows\.jsonl:2" if fmt == "medmax" else re.escape(name)
    with pytest.raises(UserError, match=rf"{where}: not valid UTF-8"):
        load_records(tmp_path, fmt, source)
