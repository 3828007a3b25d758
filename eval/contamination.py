"""``eval.run --train-data PATH...``: which eval images and questions the model may have trained on.

What a training-data path can be, and what is matched (never by file name: the same scan under two names
is one image, two scans named ``1.png`` are two):

- an **image-token folder** (``tokenization.image_tokenize``'s output, ``manifest.json`` format
  ``medmax-image-tokens``): each image's VQGAN codes. An eval image is encoded with the model's own VQGAN
  (``MODEL/vqgan``) and matched by a SHA-256 of its codes. Codes compare only when made by the same
  VQGAN, so a folder whose manifest ``vqgan_digest`` differs from the model's VQGAN's is not matched, and
  results.json's ``_train_data`` says so. (A VQGAN maps near-identical scans to the same codes, which is
  the point: a re-saved or re-compressed copy still counts as seen.)
- a **raw image CSV** (``image_tokenize``'s input; also ``.jsonl`` / ``.parquet`` rows): the column
  ``img_path`` or ``image_path`` names each image, relative to the file's folder (and kept inside it);
  each image is decoded to RGB and matched by a SHA-256 of its size and pixels, so the same pixels saved
  as PNG or BMP match. Question texts come from the columns ``question``, ``prompt`` or ``text``.
- a **sequence folder** (``tokenization.build_sequences``): it holds token ids, not the images' or the
  texts' sources, so it is refused with a line naming what to pass instead (the image-token folder or
  the CSV it was built from).

A question matches when its normalised text (``eval.scoring.normalize``: case, punctuation, articles), or
one of its lines, equals a piece of a training text: the whole text, a line, or a part between markers such
as ``<image>`` and MedMax's end-of-turn ``<reserved08706>`` (so "<image>Where is it?<reserved08706>left"
holds the question "Where is it?"). A question whose options are written differently there (on its line
in training, as lines here) does not match.

results.json per task, ``contamination``: ``n_images`` (distinct eval images), ``images_in_training``,
``n_questions``, ``questions_in_training``, and the task's score on questions whose image was seen
(``score_seen``) and not seen (``score_unseen``), each with its 95 % CI, so the headline can be read for
what it is made of. Matching decides no prediction, so ``--train-data`` is not in the fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from medmax.errors import UserError
from medmax.paths import PathEscapeError, resolve_inside

from .ablation import row_value
from .data import EvalRecord, load_record_image
from .scoring import normalize
from .stats import summary

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("img_path", "image_path")
TEXT_COLUMNS = ("question", "prompt", "text")


@dataclass
class TrainIndex:
    pixels: set = field(default_factory=set)
    codes: set = field(default_factory=set)
    questions: set = field(default_factory=set)
    code_digests: set = field(default_factory=set)  # the VQGANs that made ``codes``
    notes: list = field(default_factory=list)  # per path: what it gave, or why it gave nothing


def pixel_hash(image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def code_hash(codes) -> str:
    return hashlib.sha256(np.asarray(codes, dtype=np.int32).tobytes()).hexdigest()


_TAG = re.compile(r"<[^<>\s]+>")  # <image>, MedMax's end-of-turn <reserved08706> and other markers split texts


def _texts(value) -> set[str]:
    """The normalised pieces of a text: the whole, each line, each part between markers."""
    text = str(value or "")
    pieces = [text, *text.splitlines(), *_TAG.split(text)]
    return {normalize(p) for p in pieces if normalize(p)}


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _add_table(index: TrainIndex, path: Path) -> None:
    from medmax.images import ImageLoadError, load_image

    rows, before, unreadable = _read_table(path), len(index.pixels), []
    for i, row in enumerate(rows):
        for col in TEXT_COLUMNS:
            index.questions |= _texts(row.get(col))
        name = next((row[c] for c in IMAGE_COLUMNS if row.get(c)), None)
        if not name:
            continue
        try:
            index.pixels.add(pixel_hash(load_image(resolve_inside(path.parent, str(name)))))
        except (ImageLoadError, PathEscapeError, OSError, ValueError) as e:
            unreadable.append(f"row {i + 1} ({name}): {e}")
    note = f"{path}: {len(index.pixels) - before} distinct images by pixels, {len(rows)} rows' texts"
    if unreadable:
        note += f"; {len(unreadable)} images unreadable, the first: {unreadable[0]}"
    index.notes.append(note)


def _add_token_folder(index: TrainIndex, folder: Path, manifest: dict) -> None:
    from medmax.image_tokens import iter_image_tokens

    digest = (manifest.get("settings") or {}).get("vqgan_digest")
    n = 0
    for _, codes in iter_image_tokens(folder):
        index.codes.add((digest, code_hash(codes)))
        n += 1
    index.code_digests.add(digest)
    index.notes.append(f"{folder}: {n} images by VQGAN codes")


def check_paths(paths: list[Path]) -> None:
    """Refuse, before any model work, a path that is none of the kinds in the module doc."""
    from medmax.image_tokens import FORMAT, read_image_token_manifest

    for path in paths:
        if not path.exists():
            raise UserError(f"--train-data {path}: does not exist")
        if path.is_dir() and (read_image_token_manifest(path) or {}).get("format") != FORMAT:
            raise UserError(f"--train-data {path}: a folder that is not an image-token folder (a sequence folder holds "
                            f"token ids, not images or texts); pass the image-token folder or the CSV it was built from")
        if path.is_file() and path.suffix not in (".csv", ".jsonl", ".parquet"):
            raise UserError(f"--train-data {path}: not an image-token folder, nor a .csv, .jsonl or .parquet file")


def build_index(paths: list[Path]) -> TrainIndex:
    """Everything the training data says, from each path (see the module doc)."""
    from medmax.image_tokens import read_image_token_manifest

    check_paths(paths)
    index = TrainIndex()
    for path in paths:
        if path.is_dir():
            _add_token_folder(index, path, read_image_token_manifest(path))
        else:
            _add_table(index, path)
    return index


def _encoder(model: Path, index: TrainIndex):
    """The model's VQGAN when some token folder's codes were made by it, else None (a note says why)."""
    if not index.codes:
        return None
    from medmax.vqgan import load_vqgan

    vqgan = load_vqgan(model / "vqgan").prepare_for_encoding()
    if vqgan.codes_digest() not in index.code_digests:
        index.notes.append(f"the image-token folders' codes come from another VQGAN than {model / 'vqgan'}; "
                           f"eval images cannot be matched by codes")
        return None
    return vqgan


def _image_keys(rec: EvalRecord, data: Path, vqgan) -> set:
    from medmax.images import preprocess

    image = load_record_image(data, rec)
    keys = {("pixels", pixel_hash(image))}
    if vqgan is not None:
        codes = vqgan.encode_codes(preprocess(image, vqgan.resolution)[None])[0].tolist()
        keys.add(("codes", (vqgan.codes_digest(), code_hash(codes))))
    return keys


def match(records: list[EvalRecord], data: Path, model: Path, index: TrainIndex) -> dict[str, dict]:
    """uid -> {"image": an id of its image, "image_seen": bool (None: unreadable), "question_seen": bool}."""
    vqgan = _encoder(model, index)
    by_image: dict = {}
    out = {}
    for rec in records:
        key = ("bytes", hashlib.sha256(rec.image_bytes).hexdigest()) if rec.image_bytes is not None else ("path", rec.image_path)
        if key not in by_image:
            try:
                keys = _image_keys(rec, data, vqgan) if rec.image_path or rec.image_bytes else set()
                by_image[key] = any(k[1] in index.pixels if k[0] == "pixels" else k[1] in index.codes for k in keys) if keys else None
            except (ValueError, OSError, MemoryError) as e:
                logger.warning("--train-data: %s: its image cannot be read (%s); it counts as neither seen nor unseen", rec.uid, e)
                by_image[key] = None
        out[rec.uid] = {"image": f"{key[0]}:{key[1]}", "image_seen": by_image[key],
                        "question_seen": bool(_texts(rec.prompt) & index.questions)}
    return out


def summarize(kind: str, rows: list[dict], seen: dict[str, dict], key: str) -> dict | None:
    """results.json's ``contamination`` for a task's scored rows (None when none was matched)."""
    marks = [(r, seen[r["uid"]]) for r in rows if r.get("uid") in seen]
    if not marks:
        return None
    images = {m["image"]: m["image_seen"] for _, m in marks if m["image_seen"] is not None}
    scored = [(row_value(kind, r), m) for r, m in marks if row_value(kind, r) is not None]
    return {"n_images": len(images), "images_in_training": sum(images.values()),
            "n_questions": len(marks), "questions_in_training": sum(m["question_seen"] for _, m in marks),
            "score_seen": summary([v for v, m in scored if m["image_seen"]], f"{key}:seen"),
            "score_unseen": summary([v for v, m in scored if m["image_seen"] is False], f"{key}:unseen")}


def report_lines(results: dict) -> list[str]:
    keys = sorted(k for k, e in results.items() if not k.startswith("_") and isinstance(e, dict) and e.get("contamination"))
    if not keys:
        return []
    lines = ["", "## Contamination (--train-data)", ""]
    lines += [f"- {note}" for note in results.get("_train_data", [])]
    lines += ["", "| task | images in training | questions in training | score, seen images | score, unseen images |",
              "|---|---|---|---|---|"]
    for key in keys:
        c = results[key]["contamination"]
        cells = [_cell(c[name]) for name in ("score_seen", "score_unseen")]
        lines.append(f"| {key} | {c['images_in_training']} of {c['n_images']} | {c['questions_in_training']} of "
                     f"{c['n_questions']} | {cells[0]} | {cells[1]} |")
    return lines


def _cell(m: dict) -> str:
    if m["score"] is None:
        return "- (n 0)"
    ci = m["ci95"]
    return f"{m['score']:.3f} [{ci['low']:.2f}, {ci['high']:.2f}] (n {m['n']})"
