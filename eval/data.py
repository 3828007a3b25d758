"""Evaluation data: MedMax's eval schema, and converters from each benchmark's files as their authors publish them.

MedMax schema (parquet or JSONL, one row per question)::

    task_name      vqa_rad | slake | pathvqa | quilt_vqa | pmc_vqa | omnimed_vqa | path_mmu | probmed
                   | image_captioning | image_generation | visual_chat | mm_out
    question_type  closed | open | mcq | pmc_oa | quilt | report | conversation | detailed_description ...
    prompt         the question (MCQ prompts carry their options)
    answer         the gold answer (visual_chat: a dict with gpt4_answer, fig_caption, fig_label,
                   in_text_mention, domain; a JSON or Python-literal string of it is accepted)
    image_path     relative to the data folder; absolute paths and '..' are refused. Or the image itself:
                   an ``image`` (or ``image_path``) column holding ``{"bytes", "path"}`` as Hugging Face
                   datasets store an Image feature in parquet, or raw bytes
    options        optional: {"A": text, ...} (or its JSON string), used to map text answers to letters
    groups         optional: {column: value} a task's accuracy is broken down by in the report (a converter's
                   categories: GMAI-MMBench's clinical VQA task, department, ...)
    pair_id        optional: questions sharing one are scored together (``paired_accuracy``: 1 only when
                   all are right), in any task: ProbMed's adversarial pairs, MediConfusion-style image pairs

An MCQ row whose gold answer names no single option (see ``eval.scoring.resolve_gold``) is a problem
row when it is loaded, never a silent "wrong". Each converter below names the release it reads and
its fields in its docstring; ``SourceOptions`` carries the choices a release leaves open (split,
language, trusting a pickle). A converted row's uid is ``<file>:<its place in that file>``, so a uid
names the same question whatever split or language is chosen.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from medmax.answers import options_from_prompt, parse_options
from medmax.errors import UserError
from medmax.paths import PathEscapeError, resolve_inside

from .scoring import LETTERS, UnresolvedGold, resolve_gold, yes_no

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("task_name", "question_type", "prompt", "answer", "image_path")
EDIT_COLUMNS = ("input_images", "edit")  # image_editing rows (eval/editing.py): several inputs; the synthetic edit's truth
FORMATS = ("medmax", "vqa_rad", "slake", "pathvqa", "quilt_vqa", "pmc_vqa", "omnimed", "path_mmu", "probmed",
           "vlmeval_tsv", "gmai_mmbench", "mmmu", "medxpertqa_mm", "m3d_vqa")
# A volume named by a row (a .npy of M3D-VQA, a NIfTI file, a DICOM series folder) enters a prompt as this many
# slices, evenly spaced, normalised by percentile: the defaults of ``image_tokenize --volume-column``.
VOLUME_SLICES, VOLUME_WINDOW = "16", "percentile"


@dataclass
class EvalRecord:
    uid: str  # "<file>:<row>", stable across runs
    task_name: str
    question_type: str
    prompt: str
    answer: object  # str, or a dict for visual_chat
    image_path: str | None  # a file under the data folder; for an embedded image, the name it was stored under
    options: dict | None = None
    pair_id: str | None = None
    extra: dict = field(default_factory=dict)
    image_bytes: bytes | None = None  # the image itself, when the row embeds it (parquet, HF datasets style)


class BadRow(UserError):
    """A row that cannot be evaluated; the run reports it and goes on."""


@dataclass(frozen=True)
class SourceOptions:
    """Choices a released file leaves open; each applies to the formats in ``_OPTION_FORMATS``."""

    image_dir: str | None = None  # image folder inside --data (default per format)
    split: str | None = None  # vqa_rad / path_mmu / pathvqa: which split (default test)
    lang: str | None = None  # slake: en (default), zh or all
    trust_pickle: bool = False  # pathvqa: unpickle a .pkl question file (a pickle can run code)


SPLITS = {"vqa_rad": ("test", "train", "all"), "path_mmu": ("test", "test_tiny", "val"),
          "pathvqa": ("test", "train", "val", "all"), "mmmu": ("validation", "dev", "test")}
LANGS = ("en", "zh", "all")
_OPTION_FORMATS = {"split": tuple(SPLITS), "lang": ("slake",), "trust_pickle": ("pathvqa",)}


# ---------------------------------------------------------------- images
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
    if not path.is_file() and not path.is_dir():  # a folder: a DICOM series
        raise BadRow(f"image {rel!r} not found under {root}")
    return path


def record_image(root: Path, rec: EvalRecord):
    """A generation segment for the row's image: its embedded bytes decoded (RGB ``PIL.Image``), else its file path."""
    if rec.image_bytes is None:
        return resolve_image(root, rec.image_path)
    return load_record_image(root, rec)


def load_record_image(root: Path, rec: EvalRecord):
    """The row's image as RGB ``PIL.Image`` through ``medmax.images.load_image``; BadRow when it cannot be read."""
    from medmax.images import ImageLoadError, load_image
    from medmax.prompting import load_volume_input
    from medmax.volumes import is_volume_path

    source = rec.image_bytes if rec.image_bytes is not None else resolve_image(root, rec.image_path)
    try:
        if isinstance(source, Path) and is_volume_path(source):  # its slices and header (medmax.prompting)
            return load_volume_input(source, slices=VOLUME_SLICES, window=VOLUME_WINDOW)
        return load_image(source)
    except ImageLoadError as e:
        name = f"embedded image {rec.image_path or '(no name)'!r}" if rec.image_bytes is not None else f"image {rec.image_path!r}"
        raise BadRow(f"{name}: {e.reason}") from None


def _image_fields(row: dict) -> tuple[bytes | None, str | None]:
    """(embedded bytes, path) from ``image_path`` or ``image``: a path string, raw bytes, or ``{"bytes", "path"}``."""
    value = row.get("image_path")
    if value in (None, "") and "image" in row:
        value = row["image"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), value.get("path") or None
        value = value.get("path")
    return None, (str(value) if value else None)


# ---------------------------------------------------------------- MedMax schema
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
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{i + 1}: not valid UTF-8 (byte {e.start} of the line)") from None
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from e
    return rows


def record_from_row(row: dict, uid: str) -> EvalRecord:
    missing = [c for c in REQUIRED_COLUMNS if c not in row and not (c == "image_path" and "image" in row)]
    if missing:
        raise BadRow(f"missing columns {missing}")
    try:
        options = parse_options(row.get("options"))
        answer = parse_answer(row["answer"], str(row["task_name"]))
    except (ValueError, SyntaxError) as e:
        raise BadRow(f"unreadable options/answer: {e}") from e
    if options is None and row["question_type"] == "mcq":
        options = options_from_prompt(str(row["prompt"] or ""))
    if row["question_type"] == "mcq":
        try:
            resolve_gold(answer, options)
        except UnresolvedGold as e:
            raise BadRow(str(e)) from None
    image_bytes, image_path = _image_fields(row)
    return EvalRecord(
        uid=uid,
        task_name=str(row["task_name"]),
        question_type=str(row["question_type"]),
        prompt="" if row["prompt"] is None else str(row["prompt"]),
        answer=answer,
        image_path=image_path,
        options=options,
        pair_id=None if row.get("pair_id") in (None, "") else str(row["pair_id"]),
        image_bytes=image_bytes,
        extra={**({"groups": dict(row["groups"])} if row.get("groups") else {}),
               **{k: row[k] for k in EDIT_COLUMNS if row.get(k) is not None}},
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
    """Rows to records (uid: a converter's ``_uid``, else ``name:i``); a row that does not fit is a problem entry."""
    records, problems = [], []
    for i, row in enumerate(rows):
        uid = row.pop("_uid", None) or f"{name}:{i}"
        try:
            if "_problem" in row:  # a converter found the row unusable
                raise BadRow(row["_problem"])
            records.append(record_from_row(row, uid))
        except BadRow as e:
            problems.append({"uid": uid, "reason": str(e)})
    return records, problems


# ---------------------------------------------------------------- shared by the converters
def _row(task, qtype, prompt, answer, image, options=None, pair_id=None, uid=None) -> dict:
    row = {"task_name": task, "question_type": qtype, "prompt": prompt, "answer": answer, "image_path": image,
           "options": options, "pair_id": pair_id}
    return row if uid is None else {**row, "_uid": uid}


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    return question.strip() + "\n" + "\n".join(f"({k}) {v}" for k, v in options.items())


def _join(image_dir: str, name: str) -> str:
    return str(PurePosixPath(image_dir) / name) if image_dir else name


def _image(value, image_dir: str):
    """A released image field: embedded ``{"bytes", "path"}`` kept as is, a file name joined to ``image_dir``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value
        value = value.get("path")
    return _join(image_dir, str(value)) if value else None


def _answer_type(value) -> str:
    """Released answer types ("CLOSED", "CLOSED " with VQA-RAD's trailing space, "open") as closed / open."""
    return str(value).strip().lower()


def _mcq_gold(answer, options: dict[str, str]):
    """The gold letter when the answer names one option; otherwise the answer as released (the row then loads
    as a problem naming why)."""
    try:
        return resolve_gold(answer, options)
    except UnresolvedGold:
        return answer


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_json_or_jsonl(path: Path) -> list[dict]:
    return _read_rows(path) if path.suffix == ".jsonl" else _read_json(path)


def _split_in_name(path: Path) -> str | None:
    """The split a file's name states (testset.json, test_qa.pkl, test-00000-of-00001.parquet), if any."""
    words = set(re.split(r"[^a-z]+", path.name.lower())) | {path.stem.lower().removesuffix("set")}
    found = [s for s in ("train", "val", "test") if s in words or (s == "val" and "validation" in words)]
    return found[0] if len(found) == 1 else None


def _check_file_split(path: Path, split: str, fmt: str) -> None:
    """For a release whose files are the splits: refuse a file whose name says another split than ``split``."""
    named = _split_in_name(path)
    if split == "all" or named == split:
        return
    if named is None:
        raise UserError(f"{path}: the file name names no split, so it cannot be checked against --split {split}; "
                        f"pass --split all to read every row of it as {fmt}")
    raise UserError(f"{path} holds the {named} split, not {split}; pass --split {named} to evaluate on it")


def _parquet_files(path: Path, split: str) -> list[Path]:
    """A parquet file, or a folder's ``<split>-*.parquet`` files (Hugging Face's ``data/`` layout; val = validation)."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if split != "all":
        files = [f for f in files if _split_in_name(f) == split]
    if not files:
        raise FileNotFoundError(f"{path}: no {'' if split == 'all' else split + ' '}parquet files")
    return files


# ---------------------------------------------------------------- converters to the MedMax schema
def convert_vqa_rad(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """VQA-RAD (Lau et al. 2018, OSF release): ``VQA_RAD Dataset Public.json``, one list holding the train and
    the test questions. Fields: qid, phrase_type, qid_linked_id, image_case_url, image_name, image_organ,
    evaluation, question, question_rephrase, question_relation, question_frame, question_type, answer,
    answer_type. Test rows have phrase_type ``test_freeform`` (308) or ``test_para`` (143): the 451 questions
    of the common ``testset.json``; train rows ``freeform`` / ``para`` / ``frame``. answer_type is "CLOSED" or
    "OPEN", a few with a trailing space; some answers are integers. Images: ``VQA_RAD Image Folder/<image_name>``.

    Also reads the common split files ``trainset.json`` / ``testset.json`` (qid, image_name, image_organ, answer,
    answer_type, question_type, question, phrase_type without the ``test_`` prefix): there the file is the split,
    and a file whose name says another split than ``--split`` is refused. They come from MEVF's ``data_RAD``
    folder (github.com/aioz-ai/MICCAI19-MedVQA, README "Preprocessing"), whose images are in ``images/``: that is
    the default image folder for this layout.
    """
    items, split = _read_json(path), opts.split or "test"
    if any(str(it.get("phrase_type", "")).strip().startswith("test_") for it in items):
        keep = [i for i, it in enumerate(items) if split == "all" or _is_rad_test(it) == (split == "test")]
        layout_images = "VQA_RAD Image Folder"
    else:
        _check_file_split(path, split, "vqa_rad")
        keep = list(range(len(items)))
        layout_images = "images"
    image_dir = layout_images if opts.image_dir is None else opts.image_dir
    logger.info("%s: %d of %d VQA-RAD questions are in the %s split", path, len(keep), len(items), split)
    return [_row("vqa_rad", _answer_type(items[i]["answer_type"]), items[i]["question"], str(items[i]["answer"]).strip(),
                 _join(image_dir, items[i]["image_name"]), uid=f"{path.name}:{i}") for i in keep]


def _is_rad_test(item: dict) -> bool:
    return str(item.get("phrase_type", "")).strip().startswith("test_")


def convert_slake(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """SLAKE (Liu et al. 2021): ``Slake1.0/test.json`` (and train.json, validate.json; the file is the split).
    Fields: img_id, img_name, question, answer, q_lang ("en" / "zh"), location, modality, answer_type
    ("CLOSED" / "OPEN"), base_type, content_type, triple, qid. Images: ``imgs/<img_name>``.

    Chinese rows are left out unless ``--lang zh`` or ``--lang all``: the English rows are the benchmark the
    MedMax paper reports. Kept Chinese answers are scored character by character (``eval.scoring.normalize``).
    """
    items, lang = _read_json(path), opts.lang or "en"
    image_dir = "imgs" if opts.image_dir is None else opts.image_dir
    keep = [i for i, it in enumerate(items) if lang == "all" or it.get("q_lang") == lang]
    logger.info("%s: %d of %d SLAKE questions kept (--lang %s)", path, len(keep), len(items), lang)
    return [_row("slake", _answer_type(items[i]["answer_type"]), items[i]["question"], str(items[i]["answer"]).strip(),
                 _join(image_dir, items[i]["img_name"]), uid=f"{path.name}:{i}") for i in keep]


def _strip_choice(letter: str, text: str) -> str:
    text = str(text).strip()
    for sep in (":", ".", ")"):
        if text.upper().startswith(letter + sep):
            return text[2:].strip()
    return text


def convert_pmc_vqa(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """PMC-VQA (Zhang et al. 2023, xmcmic/PMC-VQA): ``test.csv`` / ``test_clean.csv`` with columns Figure_path,
    Question, Answer, Choice A .. Choice D (written " A:Lung"), Answer_label. Images: ``images/<Figure_path>``."""
    image_dir = "images" if opts.image_dir is None else opts.image_dir
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for it in csv.DictReader(f):
            options = {k: _strip_choice(k, it[f"Choice {k}"]) for k in "ABCD" if it.get(f"Choice {k}")}
            answer = it.get("Answer_label") or it["Answer"]
            rows.append(_row("pmc_vqa", "mcq", mcq_prompt(it["Question"], options), _mcq_gold(answer, options),
                             _join(image_dir, it["Figure_path"]), options))
    return rows


def convert_omnimed(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """OmniMedVQA (Hu et al. 2024): ``QA_information/{Open-access,Restricted-access}/<dataset>.json``, lists of
    {dataset, question_id, question_type, question, gt_answer (the option's text), option_A .. option_D,
    image_path (relative to the release root, e.g. ``Images/ACRIMA/...``), modality_type}. The gold letter is the
    option whose text equals gt_answer exactly, else the one that matches it normalised; a gt_answer that matches
    no option (or two alike) makes the row a reported problem."""
    image_dir = "" if opts.image_dir is None else opts.image_dir
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    rows = []
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        for i, it in enumerate(_read_json(file)):
            options = {k: str(it[f"option_{k}"]) for k in LETTERS if it.get(f"option_{k}") not in (None, "")}
            rows.append(_row("omnimed_vqa", "mcq", mcq_prompt(it["question"], options), _mcq_gold(it["gt_answer"], options),
                             _join(image_dir, it["image_path"]), options, uid=f"{name}:{i}"))
    return rows


def convert_path_mmu(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """PathMMU (Sun et al. 2024, jamessyx/PathMMU): ``data.json`` = {subset (PubMed, SocialPath, EduContent,
    Atlas, PathCLS): {split (val, test_tiny, test): [{No, img, question, options ["A) text", ...], answer
    ("B) text"), explanation, source_img?}]}}. ``test_tiny`` is a subset of ``test``, so one split is read
    (default test). Option text may itself hold ")" ("Both A) and C)"). Images: ``images/<img>``."""
    data, split = _read_json(path), opts.split or "test"
    image_dir = "images" if opts.image_dir is None else opts.image_dir
    rows = []
    for subset in sorted(data):
        for it in data[subset].get(split, []):
            options = {LETTERS[i]: _strip_choice(LETTERS[i], opt) for i, opt in enumerate(it["options"])}
            rows.append(_row("path_mmu", "mcq", mcq_prompt(it["question"], options), _mcq_gold(it["answer"], options),
                             _join(image_dir, it["img"]), options, uid=f"{path.name}:{subset}/{split}/{it['No']}"))
    return rows


_PROBMED_ROLES = ("gt", "hallu")


def probmed_pair_id(item: dict) -> str | None:
    """A question and its adversarial twin share ``<image_type>|<image>|<qa_type without gt/hallu>``; abnormality
    questions stand alone. Keyed on the image, not ``id``: ProbMed's ids from MedICaT and ChestX-ray14 overlap."""
    parts = str(item["qa_type"]).split("_")
    if not any(p in _PROBMED_ROLES for p in parts):
        return None
    return f"{item.get('image_type', '')}|{item['image']}|" + "_".join(p for p in parts if p not in _PROBMED_ROLES)


def convert_probmed(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """ProbMed (Yan et al. 2024, rippleripple/ProbMed): ``test.json``, a list of {id, image, image_type, qa_type,
    question (may start with ``<image>``), answer ("yes" / "no")}. qa_type: modality_gt / modality_hallu,
    body_part_gt / body_part_hallu, abnormality, entity_gt_N / entity_hallu_N, entity_hallu (alone, when the
    image has no abnormality), and the grounding pairs.

    Paired metric (``paired_accuracy`` in results.json): one value per pair of a question and its hallucinated
    twin, 1 only when both are right; lone questions count alone. ProbMed's own ``calculate_score.py`` scores
    per image and category: modality, organ and abnormality agree with our pairs one for one, but for
    condition/finding and position it counts an image right only when every pair of that category on the image
    is right, and counts each image once, then averages per category and weights categories by their counts.
    Ours counts each pair once, over all categories together: the two agree wherever an image has one pair of a
    category, and differ (either way) where it has several.
    """
    image_dir = "" if opts.image_dir is None else opts.image_dir
    items = _read_json(path)
    return [_row("probmed", "closed", str(it["question"]).replace("<image>", "").strip(), str(it["answer"]).strip().lower(),
                 _join(image_dir, it["image"]), None, probmed_pair_id(it)) for it in items]


def _closed_or_open(answer: str) -> str:
    return "closed" if str(answer).strip().lower() in ("yes", "no") else "open"


def _pathvqa_image(value, image_dir: str):
    """Embedded bytes as they are; a released image name ("test_0000") -> ``images/test/test_0000.jpg``."""
    if isinstance(value, dict) and value.get("bytes"):
        return value
    name = str(value.get("path") if isinstance(value, dict) else value)
    folder = name.split("_")[0] if name.split("_")[0] in ("train", "val", "test") else ""
    return _join(image_dir, _join(folder, name if PurePosixPath(name).suffix else f"{name}.jpg"))


def _read_pickle(path: Path, trusted: bool) -> list[dict]:
    if not trusted:
        raise UserError(f"{path}: a pickle can run code when loaded; pass --trust-pickle only if you trust this file, "
                        "or give the JSON or parquet release")
    with open(path, "rb") as f:
        return pickle.load(f)  # the user chose to trust this file (--trust-pickle)


def convert_pathvqa(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """PathVQA (He et al. 2020). Two releases:

    - Hugging Face flaviagiammarino/path-vqa: ``data/{train,validation,test}-000NN-of-000MM.parquet``, columns
      image ({bytes, path}: the image embedded), question, answer. ``--source`` is a parquet file or the folder,
      from which the ``--split`` files are read (default test).
    - The authors' release (UCSD-AI4H/PathVQA): ``pvqa/qas/test/test_qa.pkl``, a pickled list of {image
      ("test_0000"), question, answer}, images ``pvqa/images/test/test_0000.jpg``; the same list as JSON/JSONL
      is read too. A ``.pkl`` is only unpickled with ``--trust-pickle``.

    Neither release has an answer type: yes/no answers are closed questions, the rest open (as the authors split
    them); an ``answer_type`` field, where present, is used instead.
    """
    split = opts.split or "test"
    image_dir = "images" if opts.image_dir is None else opts.image_dir
    if path.suffix in (".pkl", ".json", ".jsonl"):
        _check_file_split(path, split, "pathvqa")
        items = _read_pickle(path, opts.trust_pickle) if path.suffix == ".pkl" else _read_json_or_jsonl(path)
        return [_pathvqa_row(it, image_dir, f"{path.name}:{i}") for i, it in enumerate(items)]
    rows = []
    for file in _parquet_files(path, split):
        rows += [_pathvqa_row(it, image_dir, f"{file.name}:{i}") for i, it in enumerate(_read_rows(file))]
    return rows


def _pathvqa_row(item: dict, image_dir: str, uid: str) -> dict:
    answer = str(item["answer"]).strip()
    qtype = _answer_type(item["answer_type"]) if item.get("answer_type") else _closed_or_open(answer)
    return _row("pathvqa", qtype, item["question"], answer, _pathvqa_image(item["image"], image_dir), uid=uid)


def convert_quilt_vqa(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """Quilt-VQA (Seyfioglu et al. 2024). Hugging Face wisdomik/Quilt_VQA: ``data/train-*.parquet`` (its only
    split is the evaluation set), columns image ({bytes, path}), question, answer, answer_type (closed / open),
    context (the narrator's words the question came from; never shown to the model). Quilt-LLaVA's evaluation
    JSON (``quiltvqa_test_w_ans.json``) has the same fields with answer_type "CLOSED" / "OPEN", the image as a
    file name under ``images/``, and ``yes_no_answer`` beside the sentence answer of closed questions.

    A closed question's gold is ``yes_no_answer`` when present, else its answer when that is yes/no or starts
    with yes/no ("Yes, there is necrosis"); a closed answer holding no yes/no is a reported problem row.
    """
    image_dir = "images" if opts.image_dir is None else opts.image_dir
    if path.suffix in (".json", ".jsonl"):
        named = [(f"{path.name}:{i}", it) for i, it in enumerate(_read_json_or_jsonl(path))]
    else:
        named = [(f"{f.name}:{i}", it) for f in _parquet_files(path, "all") for i, it in enumerate(_read_rows(f))]
    return [_quilt_row(it, image_dir, uid) for uid, it in named]


def _quilt_row(item: dict, image_dir: str, uid: str) -> dict:
    qtype, answer = _answer_type(item["answer_type"]), str(item["answer"]).strip()
    row = _row("quilt_vqa", qtype, item["question"], answer, _image(item["image"], image_dir), uid=uid)
    if qtype != "closed":
        return row
    gold = item.get("yes_no_answer") or answer
    words = gold.split()
    decided = yes_no(words[0]) if words else None
    if decided is None:
        return {**row, "_problem": f"closed question whose answer {answer!r} holds no yes/no"}
    return {**row, "answer": decided}


# ---------------------------------------------------------------- benchmarks beyond MedMax's 12 tasks
_TSV_IMAGE_REF = 64  # VLMEvalKit: an image cell of at most 64 characters is the index of the row holding the image
_TSV_GROUPS = ("category", "l2-category", "clinical vqa task", "department", "perceptual granularity", "modality")


def convert_vlmeval_tsv(path: Path, opts: SourceOptions = SourceOptions(), task: str = "vlmeval_tsv") -> list[dict]:
    """VLMEvalKit's TSV benchmark format (open-compass/VLMEvalKit, ``vlmeval/dataset/image_base.py`` and
    ``image_mcq.py``; GMAI-MMBench, OmniMedVQA, MMMU_DEV_VAL and MMBench are distributed this way): a tab-separated
    file read as pandas reads it, with columns ``index``, ``question``, optional ``hint``, option columns ``A``,
    ``B``, ... (empty / NaN when a question has fewer), ``answer`` (an option letter; "Yes"/"No" in yes/no files
    without option columns), ``image`` (base64), and optional ``category`` / ``l2-category``. Quirks, as VLMEvalKit
    reads them: an ``image`` cell of at most 64 characters is the ``index`` of another row whose image it shares;
    a cell written as a Python list holds several images. The prompt is ``Hint: <hint>`` (when given), the question,
    then the options as "(A) text" lines. Category columns (``category``, ``l2-category`` and GMAI-MMBench's
    ``clinical vqa task``, ``department``, ``perceptual granularity``) become the report's breakdown.

    Problem rows (counted and named, never a crash): an image that is not base64, an index reference to no row,
    several images (eval.run shows one image per question), an answer letter with no option of that letter.
    A file without an ``answer`` column (GMAI-MMBench's TEST file withholds its answers) is refused."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t")
    if "answer" not in table.columns:
        raise UserError(f"{path}: no answer column (a TEST file whose answers are withheld?); use a file with answers")
    items = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in table.to_dict("records")]
    images = {str(it["index"]): str(it.get("image") or "") for it in items}
    return [_tsv_row(it, images, path.name, task) for it in items]


def _tsv_row(it: dict, images: dict, name: str, task: str) -> dict:
    options = {k: str(it[k]) for k in LETTERS if it.get(k) is not None and str(it[k]) != ""}
    question = str(it["question"] or "")
    if it.get("hint"):
        question = f"Hint: {it['hint']}\n{question}"
    groups = {g: str(it[g]) for g in _TSV_GROUPS if it.get(g) is not None}
    uid = f"{name}:{it['index']}"
    if options:
        row = _row(task, "mcq", mcq_prompt(question, options), _mcq_gold(str(it["answer"]).strip(), options), None, options, uid=uid)
    else:
        row = _row(task, "closed", question, yes_no(str(it["answer"])) or str(it["answer"]), None, uid=uid)
    row["groups"] = groups
    try:
        row["image_path"] = {"bytes": _tsv_image(str(it["index"]), images), "path": f"{it['index']}.png"}
    except BadRow as e:
        row["_problem"] = str(e)
    if not options and row["answer"] not in ("yes", "no"):
        row["_problem"] = f"answer {it['answer']!r} is neither an option letter (the row has no options) nor yes/no"
    return row


def _tsv_image(index: str, images: dict) -> bytes:
    import base64
    import binascii

    cell = images[index]
    if 0 < len(cell) <= _TSV_IMAGE_REF:
        if len(images.get(cell, "")) <= _TSV_IMAGE_REF:
            raise BadRow(f"image {cell!r} refers to no row holding an image (VLMEvalKit's index reference)")
        cell = images[cell]
    if cell.startswith("["):
        raise BadRow("the row holds several images; eval.run shows one image per question")
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow(f"image is not base64 (it starts {cell[:20]!r})") from None


def convert_gmai_mmbench(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """GMAI-MMBench (Ye et al. 2024, uni-medical/GMAI-MMBench): ``GMAI-MMBench_VAL.tsv``, VLMEvalKit's TSV format
    (:func:`convert_vlmeval_tsv`) with options ``A``..``E`` and the category columns ``clinical vqa task``,
    ``department``, ``perceptual granularity`` (VLMEvalKit's ``GMAIMMBenchDataset`` reports accuracy by each),
    images PNG-encoded base64. The TEST file has no ``answer`` column and is refused."""
    return convert_vlmeval_tsv(path, opts, task="gmai_mmbench")


MMMU_HEALTH = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
               "Public_Health")
_MMMU_ID = re.compile(r"^(dev|validation|test)_(.+)_(\d+)$")
_MMMU_IMAGE = re.compile(r"<image (\d+)>")


def convert_mmmu(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """MMMU (Yue et al. 2024, MMMU/MMMU on Hugging Face), its Health & Medicine subjects only (``MMMU_HEALTH``):
    parquet files ``<Subject>/<split>-00000-of-00001.parquet`` (split dev, validation (default) or test, whose
    answers are withheld), rows {id ("validation_Clinical_Medicine_1"), question, options (a Python list literal
    written as a string, "['a', 'b']"; "[]" for open questions), explanation, image_1 .. image_7 ({"bytes",
    "path"} structs or null), img_type, answer (a letter for multiple-choice), topic_difficulty, question_type
    ("multiple-choice" or "open"), subfield}. The question (and an option) refers to its images as
    ``<image n>``. A question whose single image is ``<image 1>`` is asked with it, the placeholder read as
    "the image"; problem rows: a ``<image n>`` with no image_n, several images (eval.run shows one image per
    question), an answer letter with no option. Breakdown by subject, subfield, topic_difficulty, img_type."""
    split = opts.split or "validation"
    rows = []
    for file in _parquet_files(path, "all"):
        for i, it in enumerate(pq.read_table(file).to_pylist()):
            m = _MMMU_ID.match(str(it["id"]))
            if m and m.group(2) in MMMU_HEALTH and m.group(1) == split:
                rows.append(_mmmu_row(it, m.group(2), file.name))
    logger.info("%s: %d MMMU health & medicine questions in the %s split", path, len(rows), split)
    return rows


def _mmmu_row(it: dict, subject: str, name: str) -> dict:
    options_list = ast.literal_eval(it["options"]) if isinstance(it["options"], str) else list(it["options"] or [])
    options = {LETTERS[i]: str(o) for i, o in enumerate(options_list[: len(LETTERS)])}
    text = str(it["question"]) + " " + " ".join(options.values())
    used = sorted({int(n) for n in _MMMU_IMAGE.findall(text)})
    given = [n for n in range(1, 8) if isinstance(it.get(f"image_{n}"), dict) and it[f"image_{n}"].get("bytes")]
    question = _MMMU_IMAGE.sub("the image", str(it["question"]))
    groups = {"subject": subject, **{k: str(it[k]) for k in ("subfield", "topic_difficulty", "img_type") if it.get(k)}}
    image = it["image_1"] if 1 in given else None
    if it["question_type"] == "multiple-choice":
        row = _row("mmmu_health", "mcq", mcq_prompt(question, options), _mcq_gold(str(it["answer"]), options), image, options)
    else:
        row = _row("mmmu_health", "open", question, str(it["answer"]), image)
    row.update(_uid=f"{name}:{it['id']}", groups=groups)
    missing = [n for n in used if n not in given]
    if missing:
        row["_problem"] = f"{it['id']}: the question refers to <image {missing[0]}> but image_{missing[0]} is empty"
    elif len(set(used) | set(given)) > 1:
        row["_problem"] = f"{it['id']}: {len(set(used) | set(given))} images; eval.run shows one image per question"
    return row


_ANSWER_CHOICES = re.compile(r"\s*Answer Choices:.*$", re.DOTALL)


def convert_medxpertqa_mm(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """MedXpertQA, its multimodal subset (Zuo et al. 2025, TsinghuaC3I/MedXpertQA): ``MM/test.jsonl`` (or
    ``dev.jsonl``), rows {id ("MM-0"), question (ending in the options written inline: "Answer Choices: (A) ...
    (B) ..."), options ({"A": text, ... "E": text}), label (the gold letter), images (file names, e.g.
    ["MM-0-a.jpeg"]), medical_task, body_system, question_type ("Reasoning" / "Understanding")}. Images:
    ``images/<name>`` (``--image-dir``). The inline "Answer Choices" are cut from the question and the options
    written as "(A) text" lines, as every MCQ here. Problem rows: several images (eval.run shows one image per
    question), a label with no option. Breakdown by medical_task, body_system, question_type."""
    image_dir = "images" if opts.image_dir is None else opts.image_dir
    rows = []
    for it in _read_json_or_jsonl(path):
        options = {str(k).upper(): str(v) for k, v in dict(it["options"]).items()}
        images = list(it.get("images") or [])
        row = _row("medxpertqa_mm", "mcq", mcq_prompt(_ANSWER_CHOICES.sub("", str(it["question"])), options),
                   _mcq_gold(str(it["label"]), options), _join(image_dir, images[0]) if images else None, options,
                   uid=f"{path.name}:{it['id']}")
        row["groups"] = {k: str(it[k]) for k in ("medical_task", "body_system", "question_type") if it.get(k)}
        if len(images) > 1:
            row["_problem"] = f"{it['id']}: {len(images)} images; eval.run shows one image per question"
        rows.append(row)
    return rows


M3D_QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}


def convert_m3d_vqa(path: Path, opts: SourceOptions = SourceOptions()) -> list[dict]:
    """M3D-VQA (Bai et al. 2024, BAAI-DCAI/M3D, the M3D-Data release): ``M3D_VQA_{train,val,test}.csv`` with the
    columns its generator writes (``Data/process/m3d_vqa_data_generation.py``): Image Path, Text (the whole
    report, multi-line and quoted), Question Type (1 plane, 2 phase, 3 organ, 4 abnormality, 5 location),
    Question, Choice A .. Choice D (``NA`` where the question had fewer choices), Answer (the right choice's
    text) and Answer Choice (its letter). Image Path is a ``.npy`` volume of shape (1, 32, 256, 256) relative to
    the data root (``Bench/dataset/multi_dataset.py``'s VQADataset joins it to ``data_root``). Each row is asked
    twice, as M3D's ``eval_vqa.py`` does: closed-ended (``m3d_vqa`` / ``mcq``, the NA choices left out) and
    open-ended (``m3d_vqa`` / ``open``, the Answer text), scored by the same rules as the 2D tasks."""
    image_dir = "" if opts.image_dir is None else opts.image_dir
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, it in enumerate(csv.DictReader(f)):
            options = {k: it[f"Choice {k}"].strip() for k in "ABCD" if it.get(f"Choice {k}", "NA").strip() not in ("", "NA")}
            volume = _join(image_dir, it["Image Path"])
            kind = M3D_QUESTION_TYPES.get(str(it["Question Type"]).strip(), str(it["Question Type"]))
            rows.append(_row("m3d_vqa", "mcq", mcq_prompt(it["Question"], options), _mcq_gold(it["Answer Choice"].strip(), options),
                             volume, options, uid=f"{path.name}:{i}:mcq:{kind}"))
            rows.append(_row("m3d_vqa", "open", it["Question"].strip(), it["Answer"].strip(), volume, uid=f"{path.name}:{i}:open:{kind}"))
    return rows


CONVERTERS = {"vqa_rad": convert_vqa_rad, "slake": convert_slake, "pathvqa": convert_pathvqa, "quilt_vqa": convert_quilt_vqa,
              "pmc_vqa": convert_pmc_vqa, "omnimed": convert_omnimed, "path_mmu": convert_path_mmu, "probmed": convert_probmed,
              "vlmeval_tsv": convert_vlmeval_tsv, "gmai_mmbench": convert_gmai_mmbench, "mmmu": convert_mmmu,
              "medxpertqa_mm": convert_medxpertqa_mm, "m3d_vqa": convert_m3d_vqa}


def _check_options(fmt: str, opts: SourceOptions) -> None:
    """Refuse a choice the format does not make (it would be silently ignored) or a value it does not know."""
    for name, formats in _OPTION_FORMATS.items():
        if getattr(opts, name) not in (None, False) and fmt not in formats:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to {', '.join(formats)}, not --data-format {fmt}")
    if opts.split is not None and opts.split not in SPLITS[fmt]:
        raise UserError(f"--split must be one of {', '.join(SPLITS[fmt])} for {fmt}, got {opts.split!r}")
    if opts.lang is not None and opts.lang not in LANGS:
        raise UserError(f"--lang must be one of {', '.join(LANGS)}, got {opts.lang!r}")


def load_records(data: Path, fmt: str = "medmax", source: Path | None = None, image_dir: str | None = None, *,
                 split: str | None = None, lang: str | None = None, trust_pickle: bool = False):
    """Records and per-row problems. ``medmax``: ``data`` is the schema folder/file. Otherwise ``source`` is the
    released file (or folder for OmniMedVQA and the parquet releases), relative to ``data`` unless absolute, and
    images live under ``data``."""
    opts = SourceOptions(image_dir, split, lang, trust_pickle)
    _check_options(fmt, opts)
    if fmt == "medmax":
        return load_medmax(data)
    if fmt not in CONVERTERS:
        raise UserError(f"--data-format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if source is None:
        raise UserError(f"--data-format {fmt} needs --source (the benchmark's released file)")
    src = source if source.is_absolute() else data / source
    if not src.exists():
        raise FileNotFoundError(f"--source {src}: does not exist")
    try:
        rows = CONVERTERS[fmt](src, opts)
    except KeyError as e:
        raise UserError(f"--source {src}: a row has no field {e}; is this the {fmt} release?") from None
    except (TypeError, AttributeError) as e:
        raise UserError(f"--source {src}: not laid out as the {fmt} release ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--source {src}: not valid UTF-8 (byte {e.start} of a file it reads)") from None
    return _records(rows, src.name)
