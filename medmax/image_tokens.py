"""Read the token files ``tokenization.image_tokenize`` writes: ``img_path`` -> raw VQGAN codes.

A finished partition is a parquet file named ``tokens-rank{R:05d}-part{P:06d}.parquet`` (see
:data:`PARTITION_GLOB`) with columns ``img_path`` (string, as written in the CSV) and ``img_tokens``
(list of int, codes ``0..n_embed-1``, row-major). Partitions being written carry a ``.tmp`` suffix and
are renamed only when complete; readers here see finished files only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

PARTITION_GLOB = "tokens-rank*-part*.parquet"
COLUMNS = ("img_path", "img_tokens")


def partition_files(folder: str | Path) -> list[Path]:
    """The finished partitions of an output folder, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image token folder does not exist")
    return sorted(p for p in folder.glob(PARTITION_GLOB) if p.is_file())


def iter_image_tokens(folder: str | Path) -> Iterator[tuple[str, list[int]]]:
    """Yield ``(img_path, codes)`` from every finished partition of one output folder."""
    for path in partition_files(folder):
        table = pq.read_table(path, columns=list(COLUMNS))
        for img_path, codes in zip(table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist()):
            yield img_path, codes


def read_image_tokens(folders: str | Path | Iterable[str | Path]) -> dict[str, list[int]]:
    """All ``img_path -> codes`` of one or more output folders.

    The same path in two folders must carry the same codes; a conflict raises ``ValueError`` naming it.
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    tokens: dict[str, list[int]] = {}
    for folder in folders:
        for img_path, codes in iter_image_tokens(folder):
            previous = tokens.setdefault(img_path, codes)
            if previous is not codes and previous != codes:
                raise ValueError(f"{folder}: {img_path!r} has different image tokens in another token folder")
    logger.info("read image tokens for %d images", len(tokens))
    return tokens
