"""Evaluation data: MedMax's eval schema, and converters from each benchmark's released files.

MedMax schema (parquet or JSONL, one row per question)::

    task_name      vqa_rad | slake | pathvqa | quilt_vqa | pmc_vqa | omnimed_vqa | path_mmu | probmed
                   | image_captioning | image_generation | visual_chat | mm_out
    question_type  closed | open | mcq | pmc_oa | quilt | report | conversation | detailed_description ...
    prompt         the question (MCQ prompts carry their options)
    answer         the gold answer (visual_chat: a dict with gpt4_answer, fig_caption, fig_label,
                   in_text_mention, domain; a JSON or Python-literal string of it is accepted)
    image_path     relative to the data folder; absolute paths and '..' are refused
    options        optional: {"A": text, ...} (or its JSON string), used to map text answers to letters
    pair_id        optional: ProbMed question pairs (a question and its adversarial twin share one)

Released files the converters read (field names as published):
    vqa_rad    VQA_RAD Dataset Public.json: image_name, question, answer, answer_type (CLOSED/OPEN)
    slake      test.json: img_name, question, answer, answer_type, q_lang (only "en" is kept)
    pmc_vqa    test.csv / test_2.csv: Figure_path, Question, Choice A..D, Answer_label or Answer
    omnimed    QA_information/**/*.json: question, gt_answer (option text), option_A..D, image_path, question_id
    path_mmu   data.json: {subset: {split: [{No, question, options ["A) ..."], answer, img}]}}, test splits
    probmed    test.json: id, image, question, answer, qa_type (modality_gt / modality_hallu ...), image_type
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from medmax.paths import PathEscapeError, resolve_inside

from .scoring import LETTERS, answer_letter

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("task_name", "question_type", "prompt", "answer", "image_path")
FORMATS = ("medmax", "vqa_rad", "slake", "pmc_vqa", "omnimed", "path_mmu", "probmed")


@dataclass
class EvalRecord:
    uid: str  # "<file>:<row>", stable across runs
    task_name: str
    question_type: str
    prompt: str
    answer: object  # str, or a dict for visual_chat
    image_path: str | None
    options: dict | None = None
    pair_id: str | None = None
    extra: dict = field(default_factory=dict)


class BadRow(ValueError):
    """A row that cannot be evaluated; the run reports it and goes on."""


# ---------------------------------------------------------------- image paths
def resolve_image(root: Path, rel: str | None) -> Path:
    """The image file a row names, kept inside ``root``: absolute paths, '..' and escaping links are refused."""
    if not rel:
        raise BadRow("no image_path")
    text = str(rel).replace("\\", "/")
    if text.startswith("/") or PurePosixPath(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise BadRow(f"image_path {rel!r} is absolute; paths must be relative to the data folder")
    if ".." in PurePosixPath(text).parts:
        raise BadRow(f"image_path {rel!r} contains '..'; paths must stay inside the data folder")
    try:
        path = resolve_inside(root, text)
    except PathEscapeError:
        raise BadRow(f"image_path {rel!r} leaves the data folder through a link") from None
    if not path.is_file():
        raise BadRow(f"image {rel!r} not found under {root}")
    return path


# ---------------------------------------------------------------- MedMax schema
def parse_options(value) -> dict | None:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return {str(k).strip().upper(): str(v) for k, v in dict(value).items() if v is not None}


_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[).:]\s*(\S.*?)\s*$", re.MULTILINE)


def options_from_prompt(prompt: str) -> dict | None:
    """Options written into an MCQ prompt as lines "A: text", "(A) text", "A. text" (MedMax's rows carry no
    options column); None unless the letters run A, B, ... with at least two of them."""
    found = {}
    for letter, text in _OPTION_LINE.findall(prompt or ""):
        found.setdefault(letter, text)
    letters = sorted(found)
    if len(letters) < 2 or "".join(letters) != LETTERS[: len(letters)]:
        return None
    return {k: found[k] for k in letters}


def parse_answer(value, task_name: str):
    """visual_chat answers are dicts; MedMax stores them as a string (JSON or Python literal)."""
    if task_name == "visual_chat" and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return ast.literal_eval(value)
    return value


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
    return rows


def record_from_row(row: dict, uid: str) -> EvalRecord:
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise BadRow(f"missing columns {missing}")
    try:
        options = parse_options(row.get("options"))
        answer = parse_answer(row["answer"], str(row["task_name"]))
    except (ValueError, SyntaxError) as e:
        raise BadRow(f"unreadable options/answer: {e}") from e
    if options is None and row["question_type"] == "mcq":
        options = options_from_prompt(str(row["prompt"] or ""))
    return EvalRecord(
        uid=uid,
        task_name=str(row["task_name"]),
        question_type=str(row["question_type"]),
        prompt="" if row["prompt"] is None else str(row["prompt"]),
        answer=answer,
        image_path=row["image_path"] or None,
        options=options,
        pair_id=None if row.get("pair_id") in (None, "") else str(row["pair_id"]),
    )


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no .parquet or .jsonl files in MedMax's eval schema")
    return files


def load_medmax(path: Path) -> tuple[list[EvalRecord], list[dict]]:
    """Records from a MedMax-schema file or folder, and a problem entry for each unreadable row."""
    records, problems = [], []
    for file in data_files(path):
        recs, probs = _records(_read_rows(file), file.name)
        records += recs
        problems += probs
    return records, problems


def _records(rows, name: str) -> tuple[list[EvalRecord], list[dict]]:
    """Rows to records (uid ``name:i``); a row that does not fit the schema becomes a problem entry."""
    records, problems = [], []
    for i, row in enumerate(rows):
        uid = f"{name}:{i}"
        try:
            records.append(record_from_row(row, uid))
        except BadRow as e:
            problems.append({"uid": uid, "reason": str(e)})
    return records, problems


# ---------------------------------------------------------------- converters to the MedMax schema
def _row(task, qtype, prompt, answer, image, options=None, pair_id=None) -> dict:
    return {"task_name": task, "question_type": qtype, "prompt": prompt, "answer": answer, "image_path": image,
            "options": options, "pair_id": pair_id}


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    return question.strip() + "\n" + "\n".join(f"({k}) {v}" for k, v in options.items())


def _join(image_dir: str, name: str) -> str:
    return str(PurePosixPath(image_dir) / name) if image_dir else name


def convert_vqa_rad(path: Path, image_dir: str = "VQA_RAD Image Folder") -> list[dict]:
    items = json.loads(path.read_text())
    return [_row("vqa_rad", str(it["answer_type"]).strip().lower(), it["question"], str(it["answer"]).strip(),
                 _join(image_dir, it["image_name"])) for it in items]


def convert_slake(path: Path, image_dir: str = "imgs") -> list[dict]:
    items = json.loads(path.read_text())
    kept = [it for it in items if it.get("q_lang") == "en"]
    logger.info("%s: %d of %d SLAKE questions are English; the rest are left out", path, len(kept), len(items))
    return [_row("slake", str(it["answer_type"]).strip().lower(), it["question"], str(it["answer"]).strip(),
                 _join(image_dir, it["img_name"])) for it in kept]


def _strip_choice(letter: str, text: str) -> str:
    text = str(text).strip()
    for sep in (":", ".", ")"):
        if text.upper().startswith(letter + sep):
            return text[2:].strip()
    return text


def convert_pmc_vqa(path: Path, image_dir: str = "images") -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for it in csv.DictReader(f):
            options = {k: _strip_choice(k, it[f"Choice {k}"]) for k in "ABCD" if it.get(f"Choice {k}")}
            answer = it.get("Answer_label") or it["Answer"]
            rows.append(_row("pmc_vqa", "mcq", mcq_prompt(it["Question"], options), answer_letter(answer, options) or answer,
                             _join(image_dir, it["Figure_path"]), options))
    return rows


def convert_omnimed(path: Path, image_dir: str = "") -> list[dict]:
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    rows = []
    for file in files:
        for it in json.loads(file.read_text()):
            options = {k: str(it[f"option_{k}"]) for k in LETTERS if it.get(f"option_{k}") not in (None, "")}
            letter = answer_letter(it["gt_answer"], options)
            rows.append(_row("omnimed_vqa", "mcq", mcq_prompt(it["question"], options), letter or it["gt_answer"],
                             _join(image_dir, it["image_path"]), options))
    return rows


def convert_path_mmu(path: Path, image_dir: str = "images") -> list[dict]:
    data = json.loads(path.read_text())
    rows = []
    for subset in sorted(data):
        for split in sorted(s for s in data[subset] if s.startswith("test")):
            for it in data[subset][split]:
                options = {}
                for i, opt in enumerate(it["options"]):
                    letter = LETTERS[i]
                    options[letter] = _strip_choice(letter, opt)
                rows.append(_row("path_mmu", "mcq", mcq_prompt(it["question"], options), str(it["answer"]).strip()[:1].upper(),
                                 _join(image_dir, it["img"]), options))
    return rows


def probmed_pair_id(item: dict) -> str | None:
    """A question and its adversarial twin share ``<image id>:<qa_type without gt/hallu>``; others stand alone."""
    parts = str(item["qa_type"]).split("_")
    if "gt" not in parts and "hallu" not in parts:
        return None
    return f"{item['id']}:" + "_".join(p for p in parts if p not in ("gt", "hallu"))


def convert_probmed(path: Path, image_dir: str = "") -> list[dict]:
    items = json.loads(path.read_text())
    return [_row("probmed", "closed", str(it["question"]).replace("<image>", "").strip(), str(it["answer"]).strip().lower(),
                 _join(image_dir, it["image"]), None, probmed_pair_id(it)) for it in items]


CONVERTERS = {"vqa_rad": convert_vqa_rad, "slake": convert_slake, "pmc_vqa": convert_pmc_vqa,
              "omnimed": convert_omnimed, "path_mmu": convert_path_mmu, "probmed": convert_probmed}


def load_records(data: Path, fmt: str = "medmax", source: Path | None = None, image_dir: str | None = None):
    """Records and per-row problems. ``medmax``: ``data`` is the schema folder/file. Otherwise ``source`` is the
    released file (or folder for OmniMedVQA), relative to ``data`` unless absolute, and images live under ``data``."""
    if fmt == "medmax":
        return load_medmax(data)
    if fmt not in CONVERTERS:
        raise ValueError(f"--data-format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if source is None:
        raise ValueError(f"--data-format {fmt} needs --source (the benchmark's released file)")
    src = source if source.is_absolute() else data / source
    kwargs = {} if image_dir is None else {"image_dir": image_dir}
    return _records(CONVERTERS[fmt](src, **kwargs), src.name)
