"""The sequence-folder format: schema, writers, reader and manifest (what a build writes, what training reads).

Folder layout::

    DIR/part-FFFFF-SSSS.parquet   input_ids list<int32>, labels list<int32> (-100: no loss), length int32,
                                  format string, then the passthrough columns (medmax.data.passthrough)
    DIR/manifest.json             {"format": "medmax-sequences", "version": 1, "special_ids", "tokenizer",
                                   "counts", "token_stats", "files", "columns", "written", ...}
    DIR/errors.jsonl              one line per rejected or dropped row: file, row (1-based), the row's own
                                  id column and value when it has one, kind, reason
    DIR/progress/                 done-FFFFF.json once input file FFFFF is complete (what a resumed run skips)

``FFFFF`` is the input file's index and ``SSSS`` the shard within it. ``written`` in the manifest lists
every file the build wrote: a later build recognises its own outputs by that list, never by a name
pattern (``medmax.data.build_folder``), and the folder is built beside itself and swapped in when complete.

Two writers share the schema and the manifest: :class:`ShardWriter` (the build, ``medmax.data.build``,
with passthrough columns) and :func:`write_sequences` (id and label lists only: tests, benchmarks and
synthetic data). :func:`read_sequences` reads a folder into flat arrays; ``medmax.data.store`` serves it
memory-mapped instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import passthrough
from .inputs import row_id, update_digest
from .passthrough import ColumnFilter
from ..image_tokens import list_array  # the one list<int32> conversion
from ..errors import UserError
from ..vocab import IGNORE_INDEX
from .rows import Built, RowError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress"  # per-input-file completion records and error lists, for --resume
ERRORS = "errors.jsonl"
FORMAT_NAME = "medmax-sequences"
FORMAT_VERSION = 1
SHARD_GLOB = "part-*.parquet"
_REQUIRED_KEYS = ("format", "version", "special_ids", "tokenizer", "counts", "token_stats", "files")


class DataError(UserError):
    """A data folder that cannot be used (its manifest, files or content); the message names the file or setting."""


# ---------------------------------------------------------------------------------------------
# Outputs


def clear_file_outputs(folder: Path, index: int) -> None:
    """Remove what input file ``index`` left in a build's own work folder, before building it again."""
    for path in [*folder.glob(f"part-{index:05d}-*.parquet*"), *(folder / PROGRESS).glob(f"*-{index:05d}.json*")]:
        path.unlink()


def progress_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """The completion record and error list of one input file."""
    return folder / PROGRESS / f"done-{index:05d}.json", folder / PROGRESS / f"errors-{index:05d}.jsonl"


def _sequence_arrays(chunk: list) -> list[pa.Array]:
    return [
        list_array([b.input_ids for b in chunk]),
        list_array([b.labels for b in chunk]),
        pa.array([len(b) for b in chunk], type=pa.int32()),
        pa.array([b.format for b in chunk], type=pa.string()),
    ]


@dataclass(frozen=True)
class ShardLayout:
    """The fixed columns of a shard (before the passthrough ones) and how built rows fill them."""

    name: str
    fields: tuple[pa.Field, ...]
    arrays: Callable[[list], list[pa.Array]]  # built rows -> one array per field

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


SEQUENCES = ShardLayout("sequences", (
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("length", pa.int32()),
    pa.field("format", pa.string()),
), _sequence_arrays)


def shard_schema(types: dict, layout: ShardLayout = SEQUENCES) -> pa.Schema:
    """The shard schema: the fixed columns, then the passthrough columns of ``types`` (name -> type)."""
    return pa.schema(list(layout.fields) + [passthrough.field(name, t) for name, t in types.items()])


def shard_types(path: Path, layout: ShardLayout = SEQUENCES) -> dict:
    """The passthrough columns and types of a written shard."""
    schema = pq.read_schema(path)
    return {f.name: passthrough.field_type(f) for f in schema if f.name not in layout.names}


def conform_shard(path: Path, types: dict, layout: ShardLayout = SEQUENCES) -> bool:
    """Rewrite a shard to the passthrough ``types`` (a widening of its own); False when it already has them."""
    have = shard_types(path, layout)
    if have == types:  # column order may differ between input files; readers join columns by name
        return False
    table = pq.read_table(path)
    columns = [table.column(name) for name in layout.names]
    for name, t in types.items():
        columns.append(passthrough.convert(table.column(name) if name in have else None, have.get(name), t, len(table)))
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_arrays(columns, schema=shard_schema(types, layout)), tmp, **_write_options(types))
    tmp.replace(path)  # a new file: a hard link to the old one (a resumed build's) is left as it was
    return True


def _write_options(types: dict) -> dict:
    # Token lists: high-entropy codes gain little from dictionary pages, which cost ~40% of the write time.
    scalar = [n for n, t in types.items() if t == passthrough.JSON or not pa.types.is_list(t)]
    return {"use_dictionary": ["format", *scalar], "compression": "zstd", "compression_level": 1}


class ShardWriter:
    """Writes the sequences of one input file as ``part-FFFFF-SSSS.parquet`` shards of bounded size.

    Passthrough types are inferred per group of rows and widened as later rows need
    (``medmax.data.passthrough``); a change starts a new shard, and :meth:`close` rewrites the earlier ones,
    so every shard of the file ends with the same schema (:attr:`types`).
    """

    def __init__(self, folder: Path, file_index: int, columns: ColumnFilter, rows_per_shard: int, rows_per_group: int = 4096,
                 layout: ShardLayout = SEQUENCES):
        self.folder, self.file_index, self.filter, self.layout = folder, file_index, columns, layout
        self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
        self.types: dict = {}  # passthrough column -> type, in first-seen order
        self.files: list[str] = []
        self._shard_types: dict | None = None  # the types of the open shard
        self._stale = False  # a closed shard has narrower types than self.types
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._pending: list[tuple[Built, dict]] = []

    @property
    def columns(self) -> dict[str, str]:
        return {name: passthrough.type_name(t) for name, t in self.types.items()}

    def add(self, built: Built, row: dict) -> None:
        self._pending.append((built, row))
        if len(self._pending) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        chunk, self._pending = self._pending, []
        key_sets = dict.fromkeys(tuple(row) for _, row in chunk)  # rows share few key sets: select once per set
        names = dict.fromkeys(name for keys in key_sets for name in self.filter.select(dict.fromkeys(keys)))
        values = {name: [row.get(name) for _, row in chunk] for name in names}
        for name, vals in values.items():
            self.types[name] = passthrough.merge_types(self.types.get(name, pa.null()), passthrough.infer_type(vals))
        if self._writer is not None and self._shard_types != self.types:
            self._close_shard()
            self._stale = True
        while chunk:
            if self._writer is None:
                self._open()
            take = min(len(chunk), self.rows_per_shard - self._rows_in_shard)
            self._writer.write_table(self._table(chunk[:take], {k: v[:take] for k, v in values.items()}))
            chunk, values = chunk[take:], {k: v[take:] for k, v in values.items()}
            self._rows_in_shard += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._close_shard()

    def close(self) -> list[str]:
        self.flush()
        if self._writer is not None:
            self._close_shard()
        if self._stale:
            for name in self.files:
                conform_shard(self.folder / name, self.types, self.layout)
        return self.files

    def _open(self) -> None:
        name = f"part-{self.file_index:05d}-{len(self.files):04d}.parquet"
        self._tmp = self.folder / (name + ".tmp")
        self._shard_types = dict(self.types)
        self._writer = pq.ParquetWriter(self._tmp, shard_schema(self._shard_types, self.layout),
                                        **_write_options(self._shard_types))
        self.files.append(name)
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._tmp.rename(self.folder / self.files[-1])  # a finished shard appears atomically
        self._writer = None

    def _table(self, chunk: list[tuple[Built, dict]], values: dict[str, list]) -> pa.Table:
        columns = self.layout.arrays([b for b, _ in chunk])
        for name, t in self._shard_types.items():
            vals = values.get(name)
            columns.append(passthrough.to_array(vals, t) if vals is not None else passthrough.convert(None, None, t, len(chunk)))
        return pa.Table.from_arrays(columns, schema=shard_schema(self._shard_types, self.layout))


class ErrorLog:
    """Appends rejected rows to a JSONL file: file, row number, the row's id (when it has one), kind and reason."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "w", encoding="utf-8")

    def add(self, file: Path, row: int, err: RowError, source: dict | None = None) -> None:
        record = {"file": str(file), "row": row}
        named = row_id(source)
        if named is not None:
            record.update(id_column=named[0], id=named[1])
        record.update(kind=err.kind, reason=err.reason)
        self._fh.write(json.dumps(record) + "\n")  # ASCII: a lone surrogate in an id or reason cannot break the file

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
    """The manifest of a sequence (or preference) folder, checked: format, version, required keys, special ids
    and shard files. Anything wrong is a :class:`DataError` naming the folder or file."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: dataset folder does not exist")
    if not path.is_file():
        raise DataError(f"{path}: no manifest; is {folder} a folder written by tokenization.build_sequences?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: version {manifest.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if not isinstance(manifest["special_ids"], dict):
        raise DataError(f"{path}: special_ids is not a mapping")
    absent = [f for f in manifest["files"] if not (path.parent / f).is_file()]
    if absent:
        raise DataError(f"{path}: lists shard files that do not exist: {absent[:3]}")
    return manifest


def written_files(manifest: dict) -> list[str]:
    """Every file (relative path) a build wrote into its folder, from its manifest.

    A manifest from before ``written`` was recorded lists its shards, and its errors and progress
    records follow from its input count.
    """
    if "written" in manifest:
        return [*manifest["written"], MANIFEST]
    progress = [f"{PROGRESS}/{p.name}" for i in range(len(manifest.get("inputs", []))) for p in progress_paths(Path(), i)]
    return [*manifest["files"], ERRORS, *progress, MANIFEST]


def shard_paths(folder: str | Path) -> list[Path]:
    """The shard files of a sequence folder, in manifest order (after validating the manifest)."""
    manifest = read_manifest(folder)
    return [Path(folder) / name for name in manifest["files"]]


def folder_digest(folder: str | Path, manifest: dict | None = None) -> str:
    """sha256 of a data folder's content: its manifest and every data file it lists (not its path).

    ``manifest``: the folder's manifest, already read (any layout); by default it is read and checked.
    """
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    digest = hashlib.sha256()
    update_digest(digest, folder / MANIFEST)
    for name in manifest.get("files") or sorted(p.name for p in folder.glob("*.parquet")):
        digest.update(name.encode())
        update_digest(digest, folder / name)
    return digest.hexdigest()


def write_sequences(folder: str | Path, rows, special_ids: dict, rows_per_shard: int = 1000,
                    row_format: str = "pretraining") -> Path:
    """Write a sequence folder from (input_ids, labels) pairs: for tests, benchmarks and synthetic data.

    ``rows`` may be any iterable (it is read once, in bounded memory). ``tokenization.build_sequences`` is the
    real producer; this goes through the same :class:`ShardWriter` and writes the same manifest keys (no
    passthrough columns, no inputs, ``tokenizer`` None).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, 0, ColumnFilter(keep=()), rows_per_shard)
    n_rows = total = n_loss = 0
    shortest, longest = None, None
    for ids, labels in rows:
        ids, labels = np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)
        n_rows, total, n_loss = n_rows + 1, total + len(ids), n_loss + int((labels != IGNORE_INDEX).sum())
        shortest = len(ids) if shortest is None else min(shortest, len(ids))
        longest = len(ids) if longest is None else max(longest, len(ids))
        writer.add(Built(ids, labels, 0, format=row_format), {})
    files = writer.close()
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "special_ids": special_ids, "tokenizer": None,
        "counts": {"rows_read": n_rows, "rows_written": n_rows},
        "token_stats": {"total_tokens": total, "trained_tokens": n_loss, "min_length": shortest,
                        "mean_length": round(total / n_rows, 3) if n_rows else None, "max_length": longest},
        "files": files, "columns": {}, "written": list(files),
    }
    write_manifest(folder, manifest)
    return folder
