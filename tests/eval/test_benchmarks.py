"""Converters for benchmarks beyond MedMax's 12 tasks (issue 28), on fixtures written with each release's exact
field names and quirks (cited in each converter's docstring in eval/data.py): VLMEvalKit's TSV (base64 images, an
image cell that is another row's index, NaN options), GMAI-MMBench's category columns, MMMU's parquet (options as
a list literal in a string, image_1..image_7 structs, <image n> placeholders, subjects by id), MedXpertQA-MM's
JSONL (options written inline after "Answer Choices:", images by file name)."""

import base64
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import eval.run as run
from eval.data import load_records
from medmax.errors import UserError


def _png(colour=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _b64(colour=(200, 30, 30)) -> str:
    return base64.b64encode(_png(colour)).decode()


def _tsv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)  # how VLMEvalKit's dump() writes a TSV
    return path


def _mcq(index, image, answer="B", **extra):
    return {"index": index, "question": "Which organ is shown?", "hint": None, "A": "lung", "B": "liver", "C": "brain",
            "D": "kidney", "E": None, "answer": answer, "image": image, "category": "CT", "l2-category": "organ", **extra}


def test_vlmeval_tsv_reads_base64_index_references_and_names_each_bad_row(tmp_path):
    rows = [_mcq(0, _b64(), hint="Abdominal scan"), _mcq(1, "0"), _mcq(2, "not base64 at all! " * 5),
            _mcq(3, _b64(), answer="E"), _mcq(4, "99"), _mcq(5, str([_b64(), _b64((0, 0, 9))]))]
    records, problems = load_records(tmp_path, "vlmeval_tsv", _tsv(tmp_path / "MedBench.tsv", rows))
    assert [r.uid for r in records] == ["MedBench.tsv:0", "MedBench.tsv:1"]
    first, shared = records
    assert first.task_name == "vlmeval_tsv" and first.question_type == "mcq" and first.answer == "B"
    assert first.options == {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}  # E is NaN: no option
    assert first.prompt == "Hint: Abdominal scan\nWhich organ is shown?\n(A) lung\n(B) liver\n(C) brain\n(D) kidney"
    assert shared.image_bytes == first.image_bytes == _png()
    assert first.extra["groups"] == {"category": "CT", "l2-category": "organ"}
    reasons = {p["uid"]: p["reason"] for p in problems}
    assert "image is not base64" in reasons["MedBench.tsv:2"]
    assert "'E' matches none of the options" in reasons["MedBench.tsv:3"]
    assert "refers to no row" in reasons["MedBench.tsv:4"]
    assert "several images" in reasons["MedBench.tsv:5"]


def test_a_yes_no_tsv_is_a_closed_task(tmp_path):
    rows = [{"index": 7, "question": "Is there a fracture?", "answer": "Yes", "image": _b64(), "category": "X-ray"}]
    [rec], problems = load_records(tmp_path, "vlmeval_tsv", _tsv(tmp_path / "yn.tsv", rows))
    assert (rec.question_type, rec.answer, problems) == ("closed", "yes", [])


def _gmai(index, answer, task, department):
    return {"index": index, "question": "What abnormality is present?", "A": "none", "B": "effusion", "C": "mass",
            "D": "nodule", "E": "fracture", "answer": answer, "image": _b64((30 * index, 90, 10)), "category": "cat",
            "clinical vqa task": task, "department": department, "perceptual granularity": "Image Level"}


def test_gmai_mmbench_through_eval_run_with_its_categories_apart_from_medmax(tiny_model_dir, tmp_path):
    rows = [_gmai(i, "BCDE"[i % 4], "Disease Diagnosis" if i % 2 else "Organ Recognition", "Pulmonary") for i in range(4)]
    source = _tsv(tmp_path / "GMAI-MMBench_VAL.tsv", rows)
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(tmp_path), "--data-format", "gmai_mmbench",
                     "--source", str(source), "--output", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["gmai_mmbench_mcq"]
    assert entry["n"] == 4 and entry["suite"] == "beyond_medmax" and results["_beyond_medmax"] == ["gmai_mmbench_mcq"]
    assert set(entry["by_group"]["clinical vqa task"]) == {"Disease Diagnosis", "Organ Recognition"}
    assert entry["by_group"]["department"]["Pulmonary"]["n"] == 4
    report = (out / "report.md").read_text()
    assert report.index("## Beyond MedMax's tasks") < report.index("| gmai_mmbench_mcq | toolkit | accuracy |")
    assert "## gmai_mmbench_mcq by category" in report and "| clinical vqa task | Disease Diagnosis | 2 |" in report
    test_file = _tsv(tmp_path / "GMAI-MMBench_TEST.tsv", [{k: v for k, v in rows[0].items() if k != "answer"}])
    with pytest.raises(UserError, match="no answer column"):
        load_records(tmp_path, "gmai_mmbench", test_file)


_HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _mmmu(id_, question, qtype="multiple-choice", answer="A", options="['Aspirin', 'Heparin', 'Warfarin']", images=(1,)):
    row = {"id": id_, "question": question, "options": options, "explanation": "", "img_type": "['Radiology']",
           "answer": answer, "topic_difficulty": "Medium", "question_type": qtype, "subfield": "Cardiology"}
    for n in range(1, 8):
        row[f"image_{n}"] = {"bytes": _png((n * 30, 0, 0)), "path": f"{id_}_{n}.png"} if n in images else None
    return row


def _write_mmmu(folder: Path, subject: str, rows: list[dict]) -> None:
    path = folder / subject / "validation-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    schema = pa.schema([pa.field(k, _HF_IMAGE if k.startswith("image_") else pa.string()) for k in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_mmmu_reads_its_health_subjects_and_names_missing_images(tmp_path):
    root = tmp_path / "MMMU"
    _write_mmmu(root, "Clinical_Medicine", [
        _mmmu("validation_Clinical_Medicine_1", "Which drug suits the ECG in <image 1>?"),
        _mmmu("validation_Clinical_Medicine_2", "Compare <image 1> and <image 2>.", images=(1, 2)),
        _mmmu("validation_Clinical_Medicine_3", "What does <image 2> show?", images=(1,)),
        _mmmu("validation_Clinical_Medicine_4", "Dose in mg?", qtype="open", answer="75", options="[]")])
    _write_mmmu(root, "Art", [_mmmu("validation_Art_1", "Which style is <image 1>?")])
    records, problems = load_records(tmp_path, "mmmu", root)
    assert [r.uid.split(":")[1] for r in records] == ["validation_Clinical_Medicine_1", "validation_Clinical_Medicine_4"]
    mc, open_ = records
    assert mc.task_name == "mmmu_health" and mc.question_type == "mcq" and mc.answer == "A"
    assert mc.prompt == "Which drug suits the ECG in the image?\n(A) Aspirin\n(B) Heparin\n(C) Warfarin"
    assert mc.image_bytes == _png((30, 0, 0)) and mc.extra["groups"]["subject"] == "Clinical_Medicine"
    assert (open_.question_type, open_.answer) == ("open", "75")
    reasons = sorted(p["reason"] for p in problems)
    assert "2 images" in reasons[0] and "refers to <image 2> but image_2 is empty" in reasons[1]


def test_medxpertqa_mm_cuts_its_inline_choices_and_names_bad_rows(tmp_path):
    def row(id_, label="C", images=("MM-0-a.jpeg",)):
        return {"id": id_, "question": "A 45-year-old man ... Which is the diagnosis? Answer Choices: (A) gout "
                "(B) sepsis (C) fracture (D) tumour (E) cyst", "options": {"A": "gout", "B": "sepsis", "C": "fracture",
                "D": "tumour", "E": "cyst"}, "label": label, "images": list(images), "medical_task": "Diagnosis",
                "body_system": "Skeletal", "question_type": "Reasoning"}

    source = tmp_path / "test.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in [row("MM-0"), row("MM-1", images=("MM-1-a.jpeg", "MM-1-b.jpeg")),
                                                          row("MM-2", label="F")]) + "\n")
    [rec], problems = load_records(tmp_path, "medxpertqa_mm", source)
    assert rec.prompt.startswith("A 45-year-old man ... Which is the diagnosis?\n(A) gout\n") and "Answer Choices" not in rec.prompt
    assert (rec.answer, rec.image_path, rec.extra["groups"]["body_system"]) == ("C", "images/MM-0-a.jpeg", "Skeletal")
    reasons = {p["uid"]: p["reason"] for p in problems}
    assert "2 images" in reasons["test.jsonl:MM-1"] and "'F' matches none" in reasons["test.jsonl:MM-2"]
