"""Files of a sequence build: input rows in (JSONL / parquet), parquet shards + manifest out.

Output folder layout (what training reads)::

    DIR/part-FFFFF-SSSS.parquet   input_ids list<int32>, labels list<int32> (-100: no loss), length int32,
                                  format string, then the passthrough columns (strings)
    DIR/manifest.json             {"format": "medmax-sequences", "version": 1, "special_ids", "tokenizer",
                                   "counts", "token_stats", "files", ...}
    DIR/errors.jsonl              one line per rejected or dropped row: file, row (1-based), kind, reason
    DIR/progress/                 done-FFFFF.json once input file FFFFF is complete (what a resumed run skips)

``FFFFF`` is the input file's index and ``SSSS`` the shard within it, so a rerun writes the same names;
:func:`clear_outputs` removes a previous run's files first, so reruns never append (a resumed run
instead keeps the files of inputs recorded as done and rebuilds the others).
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .sequences import Built, RowError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress"  # per-input-file completion records and error lists, for --resume
ERRORS = "errors.jsonl"
FORMAT_NAME = "medmax-sequences"
FORMAT_VERSION = 1
SHARD_GLOB = "part-*.parquet"
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
_REQUIRED_KEYS = ("format", "version", "special_ids", "tokenizer", "counts", "token_stats", "files")


# ---------------------------------------------------------------------------------------------
# Inputs


def find_inputs(specs: list[str | Path]) -> list[Path]:
    """Input files from files, folders (their *.jsonl / *.json / *.parquet) or glob patterns, sorted."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"--input {spec}: no JSONL or parquet files found")
        bad = [p for p in matches if p.suffix not in INPUT_SUFFIXES]
        if bad:
            raise ValueError(f"--input {bad[0]}: unsupported file type (expected {', '.join(INPUT_SUFFIXES)})")
        found += matches
    return list(dict.fromkeys(found))


def iter_row_batches(path: Path, batch_size: int) -> Iterator[list[tuple[int, dict | RowError]]]:
    """Batches of ``(row number from 1, row or RowError)``; streams, never reading the whole file."""
    if path.suffix == ".parquet":
        yield from _parquet_batches(path, batch_size)
    else:
        yield from _jsonl_batches(path, batch_size)


def _parquet_batches(path: Path, batch_size: int):
    number = 0
    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        rows = record_batch.to_pylist()
        yield [(number + i + 1, row) for i, row in enumerate(rows)]
        number += len(rows)


def _parse_json_line(line: str) -> dict | RowError:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return RowError("invalid_json", f"line is not valid JSON: {err}")
    if not isinstance(row, dict):
        return RowError("invalid_json", f"line is JSON {type(row).__name__}, expected an object")
    return row


def _jsonl_batches(path: Path, batch_size: int):
    batch = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            batch.append((number, _parse_json_line(line)))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Outputs


def clear_outputs(folder: Path) -> None:
    """Remove a previous run's shards, manifest, error list and progress records (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    progress = folder / PROGRESS
    for path in [*folder.glob("part-*.parquet*"), folder / MANIFEST, folder / ERRORS, *progress.glob("*.json*")]:
        path.unlink(missing_ok=True)
    progress.mkdir(exist_ok=True)


def clear_file_outputs(folder: Path, index: int) -> None:
    """Remove what one input file (number ``index``) left behind, before building it again."""
    for path in [*folder.glob(f"part-{index:05d}-*.parquet*"), *(folder / PROGRESS).glob(f"*-{index:05d}.json*")]:
        path.unlink()


def progress_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """The completion record and error list of one input file."""
    return folder / PROGRESS / f"done-{index:05d}.json", folder / PROGRESS / f"errors-{index:05d}.jsonl"


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def shard_schema(keep: tuple[str, ...]) -> pa.Schema:
    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("length", pa.int32()),
        pa.field("format", pa.string()),
    ]
    return pa.schema(fields + [pa.field(name, pa.string()) for name in keep])


def _passthrough(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return None if not value else f"<{len(value)} bytes>"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class ShardWriter:
    """Writes the sequences of one input file as ``part-FFFFF-SSSS.parquet`` shards of bounded size."""

    def __init__(self, folder: Path, file_index: int, keep: tuple[str, ...], rows_per_shard: int, rows_per_group: int = 4096):
        self.folder, self.file_index, self.keep = folder, file_index, keep
        self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
        self.schema = shard_schema(keep)
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._pending: list[tuple[Built, dict]] = []

    def add(self, built: Built, row: dict) -> None:
        self._pending.append((built, row))
        if len(self._pending) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            if self._writer is None:
                self._open()
            take = min(len(self._pending), self.rows_per_shard - self._rows_in_shard)
            chunk, self._pending = self._pending[:take], self._pending[take:]
            self._writer.write_table(self._table(chunk))
            self._rows_in_shard += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._close_shard()

    def close(self) -> list[str]:
        self.flush()
        if self._writer is not None:
            self._close_shard()
        return self.files

    def _open(self) -> None:
        name = f"part-{self.file_index:05d}-{len(self.files):04d}.parquet"
        self._tmp = self.folder / (name + ".tmp")
        # Token lists: high-entropy codes gain little from dictionary pages, which cost ~40% of the write time.
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, use_dictionary=["format", *self.keep], compression="zstd", compression_level=1
        )
        self.files.append(name)
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._tmp.rename(self.folder / self.files[-1])  # a finished shard appears atomically
        self._writer = None

    def _table(self, chunk: list[tuple[Built, dict]]) -> pa.Table:
        columns = [
            _list_array([b.input_ids for b, _ in chunk]),
            _list_array([b.labels for b, _ in chunk]),
            pa.array([len(b) for b, _ in chunk], type=pa.int32()),
            pa.array([b.format for b, _ in chunk], type=pa.string()),
        ]
        columns += [pa.array([_passthrough(row.get(k)) for _, row in chunk], type=pa.string()) for k in self.keep]
        return pa.Table.from_arrays(columns, schema=self.schema)


class ErrorLog:
    """Appends rejected rows to a JSONL file: file, row number, kind and reason."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "w", encoding="utf-8")

    def add(self, file: Path, row: int, err: RowError) -> None:
        record = {"file": str(file), "row": row, "kind": err.kind, "reason": err.reason}
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------------------------------------
# Manifest


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)
    return path


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a sequence folder, checked: format, version, required keys and shard files."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {folder} a folder written by tokenization.build_sequences?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: version {manifest.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    absent = [f for f in manifest["files"] if not (path.parent / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{path}: lists shard files that do not exist: {absent[:3]}")
    return manifest


def shard_paths(folder: str | Path) -> list[Path]:
    """The shard files of a sequence folder, in manifest order (after validating the manifest)."""
    manifest = read_manifest(folder)
    return [Path(folder) / name for name in manifest["files"]]
