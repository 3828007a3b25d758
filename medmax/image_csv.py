"""A CSV that lists images: which column names them, how a row's path becomes a file, and loading them all.

Shared by ``tokenization.image_tokenize`` (which streams the CSV in partitions) and
``tokenization.train_vqgan`` (which loads every image into one tensor). The rules are the same for
both: column ``img_path`` (MedMax) or ``image_path``, or one the user names; relative paths resolve
against an image root and no path may leave it; an unreadable image is a failed row with its reason,
never replaced by anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .images import ImageLoadError, load_image, preprocess
from .paths import PathEscapeError, resolve_inside

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("img_path", "image_path")


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


def load_image_csv(csv: Path, column: str, root: Path, resolution: int, progress: bool = True) -> tuple[torch.Tensor | None, list[dict]]:
    """Every row's image as (N, 3, R, R) in [-1, 1] (None when none loads), and the failures ``{row, img_path, error}``."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    paths = pd.read_csv(csv, usecols=[column], dtype=str, keep_default_na=False, skip_blank_lines=False)[column].tolist()
    pixels, errors = [], []
    for row, img_path in enumerate(tqdm(paths, desc=f"images {Path(csv).name}", unit="img", disable=not progress)):
        try:
            pixels.append(preprocess(load_image(resolve_image(root, img_path)), resolution))
        except ImageLoadError as exc:
            errors.append({"row": row, "img_path": img_path, "error": exc.reason})
            logger.warning("%s row %d: %s", csv, row, exc)
    return (torch.stack(pixels) if pixels else None), errors
