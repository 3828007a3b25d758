"""Image codes by path or bytes, for the builds of sequence and preference folders (``medmax.data.build``).

A build resolves each image a row refers to with an :class:`ImageCodeLookup`: first the code table read from
image-token folders (:func:`load_code_table`; the folders' format is :mod:`medmax.image_tokens`, written by
:mod:`medmax.image_tokenizing`), then, given a VQGAN, the image itself, read from bytes or under an image root
and encoded on the fly. :func:`image_token_fingerprint` is what a build records of each folder, so that a resumed
build notices changed codes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .data.inputs import file_digest
from .data.rows import BuildConfigError, RowError, VolumeRef
from .image_tokens import (
    VolumeCodes,
    folder_fingerprint,
    folder_kind,
    partition_files,
    read_image_token_manifest,
    read_image_tokens,
    read_volume_tokens,
)
from .paths import PathEscapeError, resolve_inside

logger = logging.getLogger(__name__)


def _compact(codes) -> np.ndarray:
    arr = np.asarray(codes, dtype=np.int64)
    if arr.size and arr.min() >= 0 and arr.max() < 2**15:
        return arr.astype(np.int16)
    return arr.astype(np.int32) if arr.size and arr.max() < 2**31 else arr


def load_code_table(folders: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``img_path -> codes`` of every image folder among ``folders``, stored compactly, as (h, w) grids where the
    folder records them (:func:`medmax.image_tokens.iter_image_tokens`); conflicts raise."""
    images = [f for f in folders if folder_kind(f) == "images"]
    table = read_image_tokens(images, convert=_compact, grids=True)
    logger.info("image codes for %d images from %d folder(s)", len(table), len(images))
    return table


def load_volume_table(folders: tuple[str, ...]) -> dict[str, VolumeCodes]:
    """``img_path -> VolumeCodes`` of every volume folder among ``folders`` (written with ``--volume-column``)."""
    return read_volume_tokens([f for f in folders if folder_kind(f) == "volumes"])


def table_code_count(table: dict[str, np.ndarray], folders) -> int | None:
    """The one code count all images in the table share (None for an empty table)."""
    counts = Counter(v.size for v in table.values())
    if len(counts) > 1:
        raise BuildConfigError(
            f"--image-tokens {', '.join(map(str, folders))}: images have different code counts "
            f"{dict(counts.most_common(4))}; pass --codes-per-image to choose one (others are rejected)"
        )
    return next(iter(counts), None)


class ImageCodeLookup:
    """Resolves an image reference (path or bytes) to raw codes: the table first, then the VQGAN."""

    def __init__(self, table: dict[str, np.ndarray], vqgan=None, image_root: str | None = None,
                 volumes: dict[str, VolumeCodes] | None = None):
        self.table, self.vqgan, self.volumes = table, vqgan, volumes or {}
        self.root = Path(image_root).resolve() if image_root else None

    def __call__(self, ref) -> np.ndarray | VolumeCodes:
        if isinstance(ref, VolumeRef):
            found = self.volumes.get(ref.path, self.volumes.get(os.path.normpath(ref.path)))
            if found is None:
                raise RowError("missing_image", f"volume {ref.path!r} is not in --image-tokens (tokenize volumes with "
                                                "image_tokenize --volume-column)")
            return found
        if isinstance(ref, str):
            codes = self.table.get(ref)
            if codes is None:
                codes = self.table.get(os.path.normpath(ref))
            if codes is not None:
                return codes
            if self.vqgan is None or self.root is None:
                raise RowError("missing_image", f"no image codes for path {ref!r} in --image-tokens")
            return self._encode(self._inside_root(ref))
        if self.vqgan is None:
            raise RowError("missing_image", "the row holds image bytes; pass --ckpt to tokenize them on the fly")
        return self._encode(bytes(ref))

    def _inside_root(self, ref: str) -> Path:
        try:
            path = resolve_inside(self.root, ref)
        except PathEscapeError:
            raise RowError("missing_image", f"image path {ref!r} leaves --image-root {self.root}") from None
        if not path.is_file():
            raise RowError("missing_image", f"image path {ref!r} not in --image-tokens nor under --image-root")
        return path

    def _encode(self, source) -> np.ndarray:
        import torch

        from .images import ImageLoadError, load_image, preprocess

        try:
            image = load_image(source)
        except ImageLoadError as err:
            raise RowError("image_load_error", str(err)) from None
        pixels = preprocess(image, self.vqgan.resolution)[None]  # (1, 3, R, R): square (a shaped build reads grids from --image-tokens)
        param = next(self.vqgan.parameters())
        with torch.no_grad():
            codes = self.vqgan.encode_codes(pixels.to(param.device, param.dtype))  # (1, h*w)
        return codes[0].cpu().numpy()


def image_token_fingerprint(folder: str | Path) -> dict:
    """An image-token folder by content: what its manifest says decides it (settings, row counts, rows
    digest: :func:`medmax.image_tokens.folder_fingerprint`; None without a manifest), and each finished
    partition's row count and sha256, which also covers codes no manifest vouches for."""
    folder = Path(folder)
    manifest = folder_fingerprint(folder) if read_image_token_manifest(folder) is not None else None
    partitions = {p.name: {"rows": pq.ParquetFile(p).metadata.num_rows, "sha256": file_digest(p)} for p in partition_files(folder)}
    return {"manifest": manifest, "partitions": partitions, "rows": sum(v["rows"] for v in partitions.values())}
