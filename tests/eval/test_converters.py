"""Converters on fixtures written the way each benchmark's authors publish their files.

Each fixture keeps the release's field names, value spellings and quirks (the facts are cited in the
converter's docstring in eval/data.py): VQA-RAD's one file holding train and test with ``answer_type``
"CLOSED " and integer answers; SLAKE's Chinese rows; PathMMU's ``)`` inside option text and its
test_tiny subset of test; OmniMedVQA's text gold answers; ProbMed's ids that repeat across its two
sources; PathVQA's and Quilt-VQA's parquet files with the image embedded as bytes.
"""

import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.data import FORMATS, BadRow, EvalRecord, load_records, record_image


def _png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


_HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image() feature in parquet


def _write_hf_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [pa.field("image", _HF_IMAGE)] + [pa.field(k, pa.string()) for k in rows[0] if k != "image"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


# ---------------------------------------------------------------- VQA-RAD
def _rad(qid, phrase_type, answer, answer_type, image="synpic100.jpg", question="Is there a mass?"):
    """One row of `VQA_RAD Dataset Public.json` with every field the OSF release carries."""
    return {"qid": qid, "phrase_type": phrase_type, "qid_linked_id": f"03f451ca-de62-4617-9679-{qid:012d}",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=48e1dd0e", "image_name": image,
            "image_organ": "HEAD", "evaluation": "not evaluated", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": "PRES", "answer": answer, "answer_type": answer_type}


def test_vqa_rad_official_file_defaults_to_its_test_questions(tmp_path):
    items = [_rad(1, "freeform", "Yes", "CLOSED"), _rad(2, "para", "Yes", "CLOSED"), _rad(3, "frame", "No", "CLOSED"),
             _rad(4, "test_freeform", 2, "OPEN", question="How many lesions?"),  # integer answer
             _rad(5, "test_para", "Yes", "CLOSED "),  # trailing space, as published
             _rad(6, "test_freeform", "left", "OPEN")]
    _write_json(tmp_path / "VQA_RAD Dataset Public.json", items)
    records, problems = load_records(tmp_path, "vqa_rad", Path("VQA_RAD Dataset Public.json"))
    assert problems == []
    assert [(r.uid, r.question_type, r.answer) for r in records] == [
        ("VQA_RAD Dataset Public.json:3", "open", "2"), ("VQA_RAD Dataset Public.json:4", "closed", "Yes"),
        ("VQA_RAD Dataset Public.json:5", "open", "left")]  # uids keep the row's place in the file
    assert records[0].image_path == "VQA_RAD Image Folder/synpic100.jpg"
    train, _ = load_records(tmp_path, "vqa_rad", Path("VQA_RAD Dataset Public.json"), split="train")
    assert [r.uid.split(":")[1] for r in train] == ["0", "1", "2"]
    every, _ = load_records(tmp_path, "vqa_rad", Path("VQA_RAD Dataset Public.json"), split="all")
    assert len(every) == 6


def test_vqa_rad_test_split_is_the_451_of_testset_json(tmp_path):
    """The official file's test_freeform (308) + test_para (143) rows are testset.json's 451 questions."""
    items = ([_rad(i, "test_freeform", "Yes", "CLOSED") for i in range(308)]
             + [_rad(1000 + i, "test_para", "No", "CLOSED") for i in range(143)]
             + [_rad(2000 + i, p, "Yes", "CLOSED") for i, p in enumerate(["freeform", "para", "frame"] * 10)])
    _write_json(tmp_path / "VQA_RAD Dataset Public.json", items)
    records, _ = load_records(tmp_path, "vqa_rad", Path("VQA_RAD Dataset Public.json"))
    assert len(records) == 451


def test_vqa_rad_trainset_testset_layout(tmp_path):
    """The common split files: the file is the split, phrase_type without the test_ prefix."""
    fields = ("qid", "image_name", "image_organ", "answer", "answer_type", "question_type", "question", "phrase_type")
    test_rows = [{k: _rad(1, "freeform", "Yes", "CLOSED")[k] for k in fields},
                 {**{k: _rad(2, "para", 3, "OPEN")[k] for k in fields}}]
    _write_json(tmp_path / "testset.json", test_rows)
    _write_json(tmp_path / "trainset.json", [{k: _rad(3, "frame", "No", "CLOSED")[k] for k in fields}])
    records, _ = load_records(tmp_path, "vqa_rad", Path("testset.json"))
    assert [(r.question_type, r.answer) for r in records] == [("closed", "Yes"), ("open", "3")]
    with pytest.raises(ValueError, match=r"trainset\.json.*train split.*--split train"):
        load_records(tmp_path, "vqa_rad", Path("trainset.json"))
    assert len(load_records(tmp_path, "vqa_rad", Path("trainset.json"), split="train")[0]) == 1
    with pytest.raises(ValueError, match="--split must be one of"):
        load_records(tmp_path, "vqa_rad", Path("testset.json"), split="validation")


# ---------------------------------------------------------------- SLAKE
def _slake(qid, question, answer, lang, answer_type):
    return {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": question, "answer": answer, "q_lang": lang,
            "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": qid}


def test_slake_english_by_default_chinese_on_request(tmp_path):
    _write_json(tmp_path / "Slake1.0" / "test.json", [
        _slake(11, "Does the picture contain lung?", "Yes", "en", "CLOSED"),
        _slake(12, "图中是否包含肺？", "是", "zh", "CLOSED"),
        _slake(13, "Which organ is abnormal?", "Lung", "en", "OPEN"),
        _slake(14, "哪个器官不正常？", "肺", "zh", "OPEN")])
    src = Path("Slake1.0/test.json")
    english, _ = load_records(tmp_path, "slake", src)
    assert [r.prompt for r in english] == ["Does the picture contain lung?", "Which organ is abnormal?"]
    assert english[0].image_path == "imgs/xmlab102/source.jpg" and english[0].question_type == "closed"
    chinese, _ = load_records(tmp_path, "slake", src, lang="zh")
    assert [(r.answer, r.question_type, r.uid) for r in chinese] == [("是", "closed", "test.json:1"), ("肺", "open", "test.json:3")]
    assert len(load_records(tmp_path, "slake", src, lang="all")[0]) == 4
    with pytest.raises(ValueError, match="--lang"):
        load_records(tmp_path, "slake", src, lang="fr")
    with pytest.raises(ValueError, match="--lang applies to slake"):
        load_records(tmp_path, "vqa_rad", src, lang="zh")


# ---------------------------------------------------------------- PathMMU
def test_path_mmu_test_split_with_brackets_inside_options(tmp_path):
    """jamessyx/PathMMU data.json: {subset: {val, test_tiny, test}}; test_tiny is a subset of test."""
    def item(no, options, answer, img):
        return {"No": no, "img": img, "question": "Which pattern is seen?", "options": options, "answer": answer,
                "explanation": "e", "source_img": f"books_set/images/{img}"}
    same = item(0, ["A) Sheet-like (solid) pattern", "B) Both A) and C)", "C) Spindle cells (fascicles)"],
                "B) Both A) and C)", "7dd3.png")
    _write_json(tmp_path / "data.json", {
        "Atlas": {"val": [item(0, ["A) x", "B) y"], "A) x", "d6de.png")], "test_tiny": [same],
                  "test": [same, item(1, ["A) Hyaline cast", "B) Necrotic debris (karyorrhexis)"],
                                      "B) Necrotic debris (karyorrhexis)", "1eb9.png")]},
        "PubMed": {"test": [item(0, ["A) H&E", "B) PAS", "C) Trichrome"], "C) Trichrome", "aa11.png")]}})
    records, problems = load_records(tmp_path, "path_mmu", Path("data.json"))
    assert problems == []
    assert [(r.answer, r.uid) for r in records] == [("B", "data.json:Atlas/test/0"), ("B", "data.json:Atlas/test/1"),
                                                   ("C", "data.json:PubMed/test/0")]
    assert records[0].options == {"A": "Sheet-like (solid) pattern", "B": "Both A) and C)", "C": "Spindle cells (fascicles)"}
    assert records[0].image_path == "images/7dd3.png" and "(B) Both A) and C)" in records[0].prompt
    tiny, _ = load_records(tmp_path, "path_mmu", Path("data.json"), split="test_tiny")
    assert [r.uid for r in tiny] == ["data.json:Atlas/test_tiny/0"]


def test_path_mmu_answer_that_disagrees_with_its_option_is_a_problem(tmp_path):
    _write_json(tmp_path / "data.json", {"EduContent": {"test": [
        {"No": 0, "img": "a.png", "question": "q", "options": ["A) x (y)", "B) z"], "answer": "A) z"}]}})
    records, problems = load_records(tmp_path, "path_mmu", Path("data.json"))
    assert records == [] and problems[0]["uid"] == "data.json:EduContent/test/0" and "names option A" in problems[0]["reason"]


# ---------------------------------------------------------------- OmniMedVQA
def _omni(qid, gt, options, image="Images/ACRIMA/Im553_g_ACRIMA.png"):
    row = {"dataset": "ACRIMA", "question_id": f"ACRIMA_{qid:04d}", "question_type": "Disease Diagnosis",
           "question": "What is the diagnosis?", "gt_answer": gt, "image_path": image, "modality_type": "Fundus Photography"}
    row.update({f"option_{k}": v for k, v in options.items()})
    return row


def test_omnimed_gold_matching_no_option_is_a_problem_row(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    _write_json(qa / "ACRIMA.json", [_omni(1, "Glaucoma", {"A": "Normal", "B": "Glaucoma"}),
                                     _omni(2, "Cataract", {"A": "Normal", "B": "Glaucoma"})])
    _write_json(qa / "AIDA.json", [_omni(3, "T-1", {"A": "T 1", "B": "T-1", "C": "T2", "D": "CT"})])
    records, problems = load_records(tmp_path, "omnimed", Path("QA_information"))
    assert [(r.uid, r.answer) for r in records] == [("Open-access/ACRIMA.json:0", "B"), ("Open-access/AIDA.json:0", "B")]
    assert problems == [{"uid": "Open-access/ACRIMA.json:1",
                         "reason": "MCQ answer 'Cataract' matches none of the options A, B"}]
    assert records[0].image_path == "Images/ACRIMA/Im553_g_ACRIMA.png" and records[1].options["D"] == "CT"


# ---------------------------------------------------------------- ProbMed
def _probmed(pid, image, image_type, qa_type, answer):
    return {"id": pid, "image": image, "image_type": image_type, "qa_type": qa_type,
            "question": f"<image>\nIs this {qa_type}?", "answer": answer}


def test_probmed_pairs_are_keyed_on_the_image(tmp_path):
    """ProbMed test.json: ids restart per source (MedICaT, ChestX-ray14), so id 0 names two images."""
    medicat, chest = "medicat/PMC1_fig1.jpg", "chestxray/00000001_000.png"
    _write_json(tmp_path / "test.json", [
        _probmed(0, medicat, "ct_brain", "modality_gt", "yes"), _probmed(0, medicat, "ct_brain", "modality_hallu", "no"),
        _probmed(0, medicat, "ct_brain", "abnormality", "yes"),
        _probmed(0, medicat, "ct_brain", "entity_gt_1", "yes"), _probmed(0, medicat, "ct_brain", "entity_hallu_1", "no"),
        _probmed(0, chest, "x-ray_chest", "modality_gt", "yes"), _probmed(0, chest, "x-ray_chest", "modality_hallu", "no"),
        _probmed(0, chest, "x-ray_chest", "abnormality", "no"), _probmed(0, chest, "x-ray_chest", "entity_hallu", "no")])
    records, _ = load_records(tmp_path, "probmed", Path("test.json"))
    pairs = [r.pair_id for r in records]
    assert pairs[0] == pairs[1] != pairs[5] == pairs[6]  # same id, different images: two pairs, not one of four
    assert pairs[2] is None and pairs[7] is None and pairs[3] == pairs[4] != pairs[0]
    assert pairs[8] not in pairs[:8]  # a lone hallucinated entity stands alone
    assert records[0].prompt == "Is this modality_gt?" and records[0].image_path == medicat


# ---------------------------------------------------------------- PathVQA
_PATHVQA_ROWS = [("test_0000.jpg", "Does this image show ulceration?", "yes"),
                 ("test_0001.jpg", "What have lost their nuclei?", "neutrophils"),
                 ("test_0002.jpg", "Is the stain eosin?", "no")]


def test_pathvqa_hf_parquet_with_embedded_images(tmp_path):
    """flaviagiammarino/path-vqa: data/{train,validation,test}-000NN-of-000MM.parquet, columns image{bytes,path}, question, answer."""
    data = tmp_path / "data"
    rows = [{"image": {"bytes": _png((i * 60, 0, 0)), "path": None}, "question": q, "answer": a}
            for i, (_, q, a) in enumerate(_PATHVQA_ROWS)]
    _write_hf_parquet(data / "test-00000-of-00001.parquet", rows)
    _write_hf_parquet(data / "train-00000-of-00003.parquet", rows[:1])
    records, problems = load_records(tmp_path, "pathvqa", Path("data"))
    assert problems == []
    assert [(r.task_name, r.question_type, r.answer, r.uid) for r in records] == [
        ("pathvqa", "closed", "yes", "test-00000-of-00001.parquet:0"), ("pathvqa", "open", "neutrophils", "test-00000-of-00001.parquet:1"),
        ("pathvqa", "closed", "no", "test-00000-of-00001.parquet:2")]
    assert records[1].image_bytes == rows[1]["image"]["bytes"] and records[1].image_path is None
    image = record_image(tmp_path, records[1])
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (60, 0, 0)
    assert len(load_records(tmp_path, "pathvqa", Path("data"), split="train")[0]) == 1
    assert len(load_records(tmp_path, "pathvqa", Path("data/test-00000-of-00001.parquet"))[0]) == 3


def test_pathvqa_question_files_and_the_pickle_needs_trust(tmp_path):
    """The UCSD release: pvqa/qas/test/test_qa.pkl (a pickled list of {image, question, answer}), images/test/<image>.jpg."""
    items = [{"image": name[:-4], "question": q, "answer": a} for name, q, a in _PATHVQA_ROWS]
    _write_json(tmp_path / "qas" / "test" / "test_qa.json", items)
    records, _ = load_records(tmp_path, "pathvqa", Path("qas/test/test_qa.json"))
    assert [(r.question_type, r.image_path) for r in records] == [
        ("closed", "images/test/test_0000.jpg"), ("open", "images/test/test_0001.jpg"), ("closed", "images/test/test_0002.jpg")]
    pkl = tmp_path / "qas" / "test" / "test_qa.pkl"
    pkl.write_bytes(pickle.dumps(items))
    with pytest.raises(ValueError, match=r"test_qa\.pkl: .*--trust-pickle") as err:
        load_records(tmp_path, "pathvqa", Path("qas/test/test_qa.pkl"))
    assert "\n" not in str(err.value)
    trusted, _ = load_records(tmp_path, "pathvqa", Path("qas/test/test_qa.pkl"), trust_pickle=True)
    assert [(r.uid, r.answer) for r in trusted] == [("test_qa.pkl:0", "yes"), ("test_qa.pkl:1", "neutrophils"), ("test_qa.pkl:2", "no")]
    with pytest.raises(ValueError, match="--trust-pickle applies to pathvqa"):
        load_records(tmp_path, "slake", Path("x.json"), trust_pickle=True)


def test_pathvqa_pickle_is_never_opened_without_trust(tmp_path, monkeypatch):
    (tmp_path / "test_qa.pkl").write_bytes(b"not even read")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled without --trust-pickle"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled without --trust-pickle"))
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_records(tmp_path, "pathvqa", Path("test_qa.pkl"))


# ---------------------------------------------------------------- Quilt-VQA
def test_quilt_vqa_parquet_closed_and_open(tmp_path):
    """wisdomik/Quilt_VQA: data/train-*.parquet (its only split is the evaluation set), columns image, question,
    answer, answer_type (closed/open), context."""
    rows = [{"image": {"bytes": _png(), "path": "0a1b.jpg"}, "question": "Is this tissue necrotic?",
             "answer": "Yes, there is extensive necrosis.", "answer_type": "closed", "context": "the narrator says..."},
            {"image": {"bytes": _png(), "path": "0a1c.jpg"}, "question": "What stain is used?", "answer": "H&E",
             "answer_type": "open", "context": "..."},
            {"image": {"bytes": _png(), "path": "0a1d.jpg"}, "question": "Is the margin clear?",
             "answer": "The margin looks clear.", "answer_type": "closed", "context": "..."}]
    _write_hf_parquet(tmp_path / "data" / "train-00000-of-00001-5a6b.parquet", rows)
    records, problems = load_records(tmp_path, "quilt_vqa", Path("data"))
    assert [(r.task_name, r.question_type, r.answer) for r in records] == [
        ("quilt_vqa", "closed", "yes"), ("quilt_vqa", "open", "H&E")]
    assert records[0].image_bytes == rows[0]["image"]["bytes"] and records[0].image_path == "0a1b.jpg"
    assert problems == [{"uid": "train-00000-of-00001-5a6b.parquet:2",
                         "reason": "closed question whose answer 'The margin looks clear.' holds no yes/no"}]
    assert "context" not in records[0].prompt and "narrator" not in records[0].prompt


def test_quilt_vqa_json_with_yes_no_answer(tmp_path):
    """Quilt-LLaVA's evaluation JSON: answer_type CLOSED/OPEN, closed rows carry yes_no_answer beside the sentence."""
    _write_json(tmp_path / "quiltvqa_test_w_ans.json", [
        {"id": 0, "image": "0a1b.jpg", "question": "Is this necrotic?", "answer": "Necrosis is seen.",
         "yes_no_answer": "Yes", "answer_type": "CLOSED"},
        {"id": 1, "image": "0a1c.jpg", "question": "What stain?", "answer": "H&E", "answer_type": "OPEN"}])
    records, _ = load_records(tmp_path, "quilt_vqa", Path("quiltvqa_test_w_ans.json"))
    assert [(r.question_type, r.answer, r.image_path) for r in records] == [
        ("closed", "yes", "images/0a1b.jpg"), ("open", "H&E", "images/0a1c.jpg")]


# ---------------------------------------------------------------- embedded images in MedMax's schema, and the list
def test_medmax_schema_rows_may_carry_image_bytes(tmp_path):
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": "q", "answer": "yes",
             "image": {"bytes": _png((1, 2, 3)), "path": "x.png"}},
            {"task_name": "vqa_rad", "question_type": "closed", "prompt": "q", "answer": "yes",
             "image": {"bytes": b"not an image", "path": "broken.png"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    records, problems = load_records(tmp_path / "rows.parquet")
    assert problems == [] and records[0].image_bytes and records[0].image_path == "x.png"
    assert record_image(tmp_path, records[0]).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(BadRow, match="embedded image 'broken.png'"):
        record_image(tmp_path, records[1])
    assert isinstance(record_image(tmp_path, EvalRecord("u", "t", "closed", "q", "yes", None, image_bytes=_png())), Image.Image)


def test_a_file_of_another_release_is_named_in_one_line(tmp_path):
    _write_json(tmp_path / "test.json", [_slake(1, "q", "Yes", "en", "CLOSED")])
    with pytest.raises(ValueError, match=r"test\.json: a row has no field 'image_name'; is this the vqa_rad release\?"):
        load_records(tmp_path, "vqa_rad", Path("test.json"), split="all")
    _write_json(tmp_path / "data.json", {"Atlas": {"test": []}})
    with pytest.raises(ValueError, match="not laid out as the probmed release"):
        load_records(tmp_path, "probmed", Path("data.json"))


def test_every_format_is_listed():
    assert FORMATS == ("medmax", "vqa_rad", "slake", "pathvqa", "quilt_vqa", "pmc_vqa", "omnimed", "path_mmu", "probmed",
                       "vlmeval_tsv", "gmai_mmbench", "mmmu", "medxpertqa_mm", "m3d_vqa")


# ---------------------------------------------------------------- the program, end to end on embedded images
def test_eval_run_reads_embedded_images_and_the_source_flags(tiny_model_dir, tmp_path, capsys):
    import eval.run as run

    rows = [{"image": {"bytes": _png((i * 60, 90, 0)), "path": None}, "question": q, "answer": a}
            for i, (_, q, a) in enumerate(_PATHVQA_ROWS)]
    rows.append({"image": {"bytes": b"\x89PNG truncated", "path": "test_0003.jpg"}, "question": "Is it?", "answer": "yes"})
    _write_hf_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    _write_hf_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows[:1])
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(tmp_path), "--data-format", "pathvqa", "--source", "data",
            "--split", "test", "--output", str(out), "--tasks", "pathvqa", "--max-new-tokens", "2", "--device", "cpu"]
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["pathvqa_closed"]["n"], results["pathvqa_closed"]["n_errors"]) == (2, 1)
    assert (results["pathvqa_open"]["n"], results["pathvqa_open"]["n_errors"]) == (1, 0)
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [p["uid"] for p in problems] == ["test-00000-of-00001.parquet:3"]
    assert problems[0]["reason"].startswith("embedded image 'test_0003.jpg': ")
    path_mmu = [{"pathvqa": "path_mmu", "test": "all", str(out): str(tmp_path / "out_mmu")}.get(a, a) for a in argv]
    capsys.readouterr()
    assert run.main(path_mmu) == 2
    assert capsys.readouterr().err == "medmax-eval: error: --split must be one of test, test_tiny, val for path_mmu, got 'all'\n"


def test_vqa_rad_image_folder_defaults_per_layout(tmp_path):
    """OSF's one file: ``VQA_RAD Image Folder/``. MEVF's split files (github.com/aioz-ai/MICCAI19-MedVQA, the
    data_RAD folder its README links: testset.json, trainset.json, images/): ``images/``. --image-dir still wins."""
    fields = ("qid", "image_name", "image_organ", "answer", "answer_type", "question_type", "question", "phrase_type")
    _write_json(tmp_path / "testset.json", [{k: _rad(1, "freeform", "Yes", "CLOSED")[k] for k in fields}])
    _write_json(tmp_path / "VQA_RAD Dataset Public.json", [_rad(2, "test_freeform", "Yes", "CLOSED")])
    assert load_records(tmp_path, "vqa_rad", Path("testset.json"))[0][0].image_path == "images/synpic100.jpg"
    osf = load_records(tmp_path, "vqa_rad", Path("VQA_RAD Dataset Public.json"))[0][0]
    assert osf.image_path == "VQA_RAD Image Folder/synpic100.jpg"
    assert load_records(tmp_path, "vqa_rad", Path("testset.json"), "imgs")[0][0].image_path == "imgs/synpic100.jpg"
