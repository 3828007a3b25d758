"""Image-token folders: ``img_path`` -> raw VQGAN codes, the format image tokenization writes
(:mod:`medmax.image_tokenizing`, run by ``tokenization.image_tokenize``).

A folder holds:

- ``tokens-rank{R:05d}-part{P:06d}.parquet`` (see :data:`PARTITION_GLOB`): the finished partition ``P``
  (CSV rows ``P * partition_size`` onwards), written by rank ``R``. Columns ``img_path`` (string, as
  written in the CSV), ``img_tokens`` (list of int32, codes ``0..n_embed-1``, row-major) and, from
  version 3 on, ``grid_h`` / ``grid_w`` (int32: the image's grid of codes, rows x columns). Its
  file metadata key ``medmax.partition`` (JSON) says what the partition covers: ``partition``,
  ``rows`` (CSV rows in it), ``written``, ``failed``, ``duplicate`` (rows whose path an earlier row
  already had), ``digest`` (sha256 of its rows' paths and duplicate flags) and ``errors`` (the failed
  rows: ``row``, ``img_path``, ``reason``). A partition is written as a hidden ``.tmp`` file and
  renamed when complete; readers here see finished files only.
- A *volume* folder's partitions have :data:`VOLUME_SCHEMA`: one row per volume, ``img_path`` (the CSV's
  path), ``img_tokens`` (every chosen slice's codes, slice after slice), ``slice_indices`` (canonical slice
  numbers, inferior to superior), ``positions_mm`` (each slice's z in LPS; null without geometry),
  ``grid`` (codes per slice as ``[h, w]``), ``spacing_mm`` (slice, row, column; null without geometry),
  ``window`` (the intensity rule), ``window_bounds`` (the values mapped to black and white) and
  ``geometry`` (JSON: source kind, shape, axis codes, slice axis, modality, skipped files). Read them with
  :func:`read_volume_tokens`.
- ``errors/part{P:06d}.jsonl``: the failed rows of partition ``P``, one JSON object a line
  (:func:`write_errors`; a partition without failed rows has no file).
- ``manifest.json`` (:func:`read_image_token_manifest`), version 3 (version 2, written before volumes and
  non-square grids, is an image folder without the fields marked *3*: its images are square; it is read as one):

  - ``format``: ``"medmax-image-tokens"``; ``version``: 3; ``kind`` (*3*): ``"images"`` or ``"volumes"``.
  - ``settings``: everything that decides a code or whether a row fails; a resume must match all of
    it. ``vqgan_digest`` (sha256 of the VQGAN's encoder, ``quant_conv`` and codebook weights and sizes:
    :meth:`medmax.vqgan.VQGAN.codes_digest`, never its path), ``resolution``, ``n_embed``, ``dtype``
    (``fp32`` / ``bf16``), ``channels_last``, ``device_type`` (``cpu`` / ``cuda``), ``frame``,
    ``max_image_pixels``, ``max_aspect_ratio``, ``column``, ``image_root`` and ``partition_size``; *3*:
    ``aspect`` (``square``: MedMax's centre crop; ``keep``: :mod:`medmax.image_layout`'s grids),
    ``downsampling``, ``kind`` and, for volumes (null for images), ``slices`` (``K``, ``all``),
    ``slice_column``, ``slice_resolution``, ``window`` and ``volume_index``.
  - ``volumes`` (*3*, volume folders): ``intensity`` (the window's width and level in HU, or the percentiles)
    and ``orientation`` (the canonical one slices are taken in, :mod:`medmax.volumes`).
  - ``complete``: true when every row of the CSV the last run read is in exactly one partition;
    false while a run is under way or after it was killed.
  - ``rows`` (when complete): ``input`` = ``written`` + ``failed`` + ``duplicate``; for volumes also
    ``slices`` (slices tokenized) and ``skipped_files`` (files of DICOM folders that are not slices).
  - ``grids`` (*3*, image folders, when complete): images written per grid, ``{"HxW": count}`` in codes.
  - ``rows_digest`` (when complete): sha256 over the partitions' digests, i.e. the content of the
    image-path column; it changes when any row is added, removed or edited.
  - ``input``, ``ckpt``: the paths the last run was given (for people; nothing is keyed on them).

- ``summary.json``: the last run's closing summary.

:func:`folder_fingerprint` is what a consumer (``build_sequences``) records to notice that a folder's
codes or rows changed: the settings, the row counts and the rows digest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .jsonl import dumps_line, write_atomic

logger = logging.getLogger(__name__)


class ImageTokensError(UserError):
    """An image-token folder that cannot be read as one; the message names it."""

PARTITION_GLOB = "tokens-rank*-part*.parquet"
COLUMNS = ("img_path", "img_tokens")
GRID_COLUMNS = ("grid_h", "grid_w")  # version 3 image folders
SCHEMA = pa.schema([("img_path", pa.string()), ("img_tokens", pa.list_(pa.int32())), ("grid_h", pa.int32()), ("grid_w", pa.int32())])
VOLUME_SCHEMA = pa.schema([
    ("img_path", pa.string()), ("img_tokens", pa.list_(pa.int32())), ("slice_indices", pa.list_(pa.int32())),
    ("positions_mm", pa.list_(pa.float64())), ("grid", pa.list_(pa.int32())), ("spacing_mm", pa.list_(pa.float64())),
    ("window", pa.string()), ("window_bounds", pa.list_(pa.float64())), ("geometry", pa.string()),
])
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
FORMAT, VERSION = "medmax-image-tokens", 3
READABLE_VERSIONS = (2, 3)  # 2: image folders written before volumes and grids, square, the same first two columns
PARTITION_KEY = b"medmax.partition"  # parquet file metadata: what the partition covers


def partition_path(folder: Path, rank: int, k: int) -> Path:
    return folder / f"tokens-rank{rank:05d}-part{k:06d}.parquet"


def partition_index(path: Path) -> int:
    """``tokens-rank00001-part000007.parquet`` -> 7."""
    return int(path.stem.rsplit("part", 1)[1])


def error_path(folder: Path, k: int) -> Path:
    return folder / "errors" / f"part{k:06d}.jsonl"


def partition_info(path: Path) -> dict | None:
    """The ``medmax.partition`` metadata of a finished partition (its footer only), None if it has none."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[PARTITION_KEY]) if PARTITION_KEY in metadata else None


def list_array(rows: list) -> pa.ListArray:
    """Rows of int codes (arrays or lists) -> an Arrow ``list<int32>`` column, without a Python int per code."""
    lengths = np.array([len(c) for c in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def partition_table(paths: list[str], codes: list) -> pa.Table:
    """A partition's rows in :data:`SCHEMA`: each image path, its codes and their grid ((h, w) arrays; a flat
    list has no recorded grid: null)."""
    grids = [np.shape(c) if np.ndim(c) == 2 else (None, None) for c in codes]
    return pa.table({"img_path": paths, "img_tokens": list_array([np.ravel(c) for c in codes]),
                     "grid_h": [g[0] for g in grids], "grid_w": [g[1] for g in grids]}, schema=SCHEMA)


def grid_counts(table: pa.Table) -> dict[str, int]:
    """``{"HxW": images}`` of a partition's rows."""
    pairs = zip(table.column("grid_h").to_pylist(), table.column("grid_w").to_pylist())
    counts: dict[str, int] = {}
    for h, w in pairs:
        if h is None:
            continue
        counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
    return counts


@dataclass(frozen=True)
class VolumeCodes:
    """One tokenized volume: its slices' codes and where they lie (a row of :data:`VOLUME_SCHEMA`)."""

    codes: np.ndarray  # (K, h*w) codes of the K chosen slices, inferior to superior
    slice_indices: list[int]
    positions_mm: list[float] | None
    grid: tuple[int, int]
    spacing_mm: list[float] | None
    window: str
    geometry: dict

    def record(self) -> dict:
        """The row's columns (``img_path`` aside)."""
        return {"img_tokens": self.codes.reshape(-1), "slice_indices": self.slice_indices, "positions_mm": self.positions_mm,
                "grid": list(self.grid), "spacing_mm": self.spacing_mm, "window": self.window,
                "window_bounds": self.geometry.get("window_bounds"), "geometry": json.dumps(self.geometry, sort_keys=True)}


def volume_table(paths: list[str], volumes: list[VolumeCodes]) -> pa.Table:
    """A volume partition's rows in :data:`VOLUME_SCHEMA`."""
    records = [v.record() for v in volumes]
    columns = {"img_path": paths, "img_tokens": list_array([r["img_tokens"] for r in records])}
    for name in VOLUME_SCHEMA.names[2:]:
        columns[name] = pa.array([r[name] for r in records], type=VOLUME_SCHEMA.field(name).type)
    return pa.table(columns, schema=VOLUME_SCHEMA)


def folder_kind(folder: str | Path) -> str:
    """``"images"`` or ``"volumes"`` (a folder without a version-3 manifest holds images)."""
    return (read_image_token_manifest(folder) or {}).get("kind", "images")


def iter_volume_tokens(folder: str | Path) -> Iterator[tuple[str, VolumeCodes]]:
    """Yield ``(img_path, VolumeCodes)`` from every finished partition of a volume folder."""
    for path in partition_files(folder):
        for row in pq.read_table(path, schema=VOLUME_SCHEMA).to_pylist():
            h, w = row["grid"]
            codes = np.asarray(row["img_tokens"], dtype=np.int32).reshape(len(row["slice_indices"]), h * w)
            geometry = json.loads(row["geometry"])
            yield row["img_path"], VolumeCodes(codes, row["slice_indices"], row["positions_mm"], (h, w), row["spacing_mm"],
                                               row["window"], geometry)


def write_partition(path: Path, table: pa.Table, info: dict) -> None:
    """Write a partition with its metadata as a hidden ``.tmp`` file, then rename it into place."""
    table = table.replace_schema_metadata({PARTITION_KEY: json.dumps(info)})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_errors(path: Path, errors: list[dict]) -> None:
    """``errors/partK.jsonl`` with exactly these rows (none: no file); an unchanged file is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(dumps_line(e, sort_keys=False) for e in errors)
    if not errors:
        path.unlink(missing_ok=True)
    elif not path.is_file() or path.read_text() != text:
        write_atomic(path, text)


def write_json(path: Path, obj) -> None:
    """Atomically (a temporary file, then a rename)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_image_token_manifest(folder: str | Path) -> dict | None:
    """The folder's ``manifest.json`` (fields in the module docstring), None if it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ImageTokensError(f"{path}: not valid JSON ({exc})") from None


def folder_fingerprint(folder: str | Path) -> dict:
    """What decides a folder's content: its settings, row counts and rows digest (from its manifest).

    A folder written before manifests had versions gives its old manifest and the number of rows in
    its partition files instead.
    """
    folder = Path(folder)
    manifest = read_image_token_manifest(folder)
    if manifest is None:
        raise ImageTokensError(f"{folder}: not an image-token folder (no {MANIFEST})")
    if manifest.get("format") != FORMAT:
        written = sum(pq.read_metadata(p).num_rows for p in partition_files(folder))
        return {"settings": manifest, "rows": {"written": written}, "complete": None, "rows_digest": None}
    return {key: manifest.get(key) for key in ("settings", "rows", "complete", "rows_digest")}


def partition_files(folder: str | Path) -> list[Path]:
    """The finished partitions of an output folder, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image token folder does not exist")
    return sorted(p for p in folder.glob(PARTITION_GLOB) if p.is_file())


def iter_image_tokens(folder: str | Path, grids: bool = False) -> Iterator[tuple[str, list[int]]]:
    """Yield ``(img_path, codes)`` from every finished partition of one image folder (a volume folder is refused):
    the flat list, or with ``grids`` an (h, w) array where the partition records its grid (version 3; version 2's
    images are square)."""
    manifest = read_image_token_manifest(folder) or {}
    if manifest.get("kind", "images") != "images":
        raise ImageTokensError(f"{folder}: a volume-token folder; its rows are volumes (read_volume_tokens), not images")
    if manifest.get("complete") is False:
        logger.warning("%s: its last image_tokenize run did not finish; some rows may be missing or stale", folder)
    for path in partition_files(folder):
        names = set(pq.read_schema(path).names)
        gridded = grids and all(c in names for c in GRID_COLUMNS)
        table = pq.read_table(path, columns=list(COLUMNS) + (list(GRID_COLUMNS) if gridded else []))
        rows = zip(table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist())
        if not gridded:
            yield from rows
            continue
        for (img_path, codes), h, w in zip(rows, table.column("grid_h").to_pylist(), table.column("grid_w").to_pylist()):
            if h is None or w is None:
                yield img_path, codes
                continue
            if h * w != len(codes):
                raise ImageTokensError(f"{path}: {img_path!r} has {len(codes)} codes for a {h}x{w} grid")
            yield img_path, np.asarray(codes, dtype=np.int32).reshape(h, w)


def read_image_tokens(folders: str | Path | Iterable[str | Path], convert: Callable | None = None, grids: bool = False) -> dict:
    """All ``img_path -> codes`` of one or more output folders (each row's codes passed through ``convert``;
    ``grids``: as :func:`iter_image_tokens`).

    The same path in two folders must carry the same codes; a conflict raises :class:`ImageTokensError` naming it.
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    tokens: dict = {}
    for folder in folders:
        for img_path, codes in iter_image_tokens(folder, grids):
            codes = convert(codes) if convert else codes
            previous = tokens.setdefault(img_path, codes)
            if previous is not codes and not np.array_equal(previous, codes):
                raise ImageTokensError(f"{folder}: {img_path!r} has different image tokens in another token folder")
    logger.info("read image tokens for %d images", len(tokens))
    return tokens


def read_volume_tokens(folders: str | Path | Iterable[str | Path]) -> dict[str, VolumeCodes]:
    """All ``img_path -> VolumeCodes`` of one or more volume folders; the same path with other codes raises."""
    if isinstance(folders, (str, Path)):
        folders = [folders]
    volumes: dict[str, VolumeCodes] = {}
    for folder in folders:
        for img_path, volume in iter_volume_tokens(folder):
            previous = volumes.setdefault(img_path, volume)
            if previous is not volume and (previous.slice_indices != volume.slice_indices or not np.array_equal(previous.codes, volume.codes)):
                raise ImageTokensError(f"{folder}: volume {img_path!r} has different tokens in another token folder")
    logger.info("read tokens for %d volumes", len(volumes))
    return volumes
