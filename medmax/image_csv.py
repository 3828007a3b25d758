"""A CSV that lists images: which column names them, how a row's path becomes a file, and loading them all.

Shared by ``tokenization.image_tokenize`` (which streams the CSV in partitions) and
``tokenization.train_vqgan`` (which loads every image into one tensor). The rules are the same for
both: column ``img_path`` (MedMax) or ``image_path``, or one the user names; the rows are read by
:func:`iter_csv_paths`, where bytes that are not UTF-8 make that one row fail, never the run; relative
paths resolve against an image root and no path may leave it; an unreadable image is a failed row
with its reason, never replaced by anything.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .images import DEFAULT_LIMITS, ImageLimits, ImageLoadError, load_image, preprocess
from .paths import PathEscapeError, resolve_inside

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("img_path", "image_path")
CSV_OPTIONS = dict(dtype=object, keep_default_na=False, encoding_errors="surrogateescape")  # bad bytes: one row's error


class ImageCSVError(UserError):
    """A CSV of images that cannot be used as it is; the message names the file (and the column)."""


def pick_column(csv: Path, column: str | None) -> str:
    """The CSV column holding image paths: ``column`` when given, else img_path (MedMax) or image_path."""
    import pandas as pd

    try:
        header = list(pd.read_csv(csv, nrows=0, encoding_errors="surrogateescape").columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise ImageCSVError(f"{csv}: cannot read the CSV header ({exc})") from None
    if column is not None:
        if column not in header:
            raise ImageCSVError(f"--column {column!r} is not a column of {csv} (columns: {header})")
        return column
    for name in PATH_COLUMNS:
        if name in header:
            return name
    raise ImageCSVError(f"{csv}: no img_path or image_path column (columns: {header}); name one with --column")


def path_bytes(img_path: str) -> bytes:
    return img_path.encode("utf-8", "surrogateescape")


def display_path(img_path: str) -> str:
    """A CSV path as text for messages and error files: bytes that are not UTF-8 shown as ``\\xff``."""
    return path_bytes(img_path).decode("utf-8", "backslashreplace")


def resolve_image(root: Path, img_path: str) -> Path:
    """A CSV path -> the file, refusing empty paths, bytes that are not UTF-8 and paths that leave the image root."""
    if not img_path.strip():
        raise ImageLoadError(repr(img_path), "empty image path in the CSV")
    if display_path(img_path) != img_path:
        raise ImageLoadError(display_path(img_path), "the image path is not valid UTF-8 in the CSV")
    try:
        return resolve_inside(root, img_path)
    except PathEscapeError:
        raise ImageLoadError(img_path, f"path leaves the image root {root} (set --image-root to allow it)") from None


def iter_csv_paths(csv: Path, column: str, chunk_rows: int) -> Iterator[list[str]]:
    """The CSV's image paths, ``chunk_rows`` rows at a time (one chunk in memory), every row kept in order.

    Bytes that are not UTF-8 become lone surrogates (``surrogateescape``), so :func:`resolve_image` fails
    that row alone; a blank line is a row with an empty path.
    """
    import pandas as pd

    reader = pd.read_csv(csv, usecols=[column], skip_blank_lines=False, chunksize=chunk_rows, **CSV_OPTIONS)
    try:
        with reader:
            for frame in reader:
                yield [str(p) for p in frame[column].tolist()]
    except pd.errors.ParserError as exc:
        raise ImageCSVError(f"{csv}: cannot be parsed as CSV ({exc})") from None


@dataclass
class LoadedImages:
    """What :func:`load_image_csv` read from one CSV."""

    pixels: torch.Tensor | None  # (N, 3, R, R) in [-1, 1] of the rows that loaded; None when none did
    errors: list[dict]  # the failed rows: {row, img_path, error}
    digest: str  # sha256 over every row's path and its pixels (or its error): changes when a file's content does
    files: list[Path]  # the file of each row that loaded, in the order of ``pixels``


def load_image_csv(csv: Path, column: str, root: Path, resolution: int, progress: bool = True,
                   limits: ImageLimits = DEFAULT_LIMITS) -> LoadedImages:
    """Every row's image, preprocessed to ``resolution``; an image that cannot be read is a failed row."""
    import torch
    from tqdm.auto import tqdm

    pixels, files, errors, digest = [], [], [], hashlib.sha256()
    rows = (path for chunk in iter_csv_paths(csv, column, 4096) for path in chunk)
    for row, img_path in enumerate(tqdm(rows, desc=f"images {Path(csv).name}", unit="img", disable=not progress)):
        digest.update(len(path_bytes(img_path)).to_bytes(8, "little") + path_bytes(img_path))
        try:
            file = resolve_image(root, img_path)
            pixels.append(preprocess(load_image(file, limits=limits), resolution, limits))
            files.append(file)
            digest.update(b"P" + pixels[-1].numpy().tobytes())
        except ImageLoadError as exc:
            errors.append({"row": row, "img_path": display_path(img_path), "error": exc.reason})
            digest.update(b"E" + exc.reason.encode("utf-8", "backslashreplace"))
            logger.warning("%s row %d: %s", csv, row, exc)
    return LoadedImages(torch.stack(pixels) if pixels else None, errors, digest.hexdigest(), files)
