"""Files of a sequence build: input rows in (JSONL / parquet), parquet shards + manifest out.

Output folder layout (what training reads)::

    DIR/part-FFFFF-SSSS.parquet   input_ids list<int32>, labels list<int32> (-100: no loss), length int32,
                                  format string, then the passthrough columns (medmax.passthrough)
    DIR/manifest.json             {"format": "medmax-sequences", "version": 1, "special_ids", "tokenizer",
                                   "counts", "token_stats", "files", "columns", "written", ...}
    DIR/errors.jsonl              one line per rejected or dropped row: file, row (1-based), the row's own
                                  id column and value when it has one, kind, reason
    DIR/progress/                 done-FFFFF.json once input file FFFFF is complete (what a resumed run skips)

``FFFFF`` is the input file's index and ``SSSS`` the shard within it. ``written`` in the manifest lists
every file the build wrote: a later build recognises its own outputs by that list, never by a name
pattern (``medmax.build_folder``), and the folder is built beside itself and swapped in when complete.

Reading is streamed and bounded: a JSONL line longer than ``max_row_bytes`` (default
:data:`MAX_ROW_BYTES`) is that row's error and is skipped in pieces, never held whole; a parquet row
whose text (every string value, nested ones included; image bytes not counted) is longer is that row's
error too. Invalid UTF-8 is the error of its line (or parquet row), never of the run.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import passthrough
from .passthrough import ColumnFilter
from .sequences import Built, RowError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress"  # per-input-file completion records and error lists, for --resume
ERRORS = "errors.jsonl"
FORMAT_NAME = "medmax-sequences"
FORMAT_VERSION = 1
SHARD_GLOB = "part-*.parquet"
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_ROW_BYTES = 4 * 2**20  # 4 MiB: a 4096-token row is ~20 KB of text; raise it with --max-row-bytes
# Columns that name a row (first present wins), quoted in errors beside the row number.
ID_COLUMNS = ("id", "uid", "uuid", "qid", "question_id", "sample_id", "example_id", "row_id", "idx")
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


def iter_row_batches(path: Path, batch_size: int, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[list[tuple[int, dict | RowError]]]:
    """Batches of ``(row number from 1, row or RowError)``; streams, never reading the whole file."""
    if path.suffix == ".parquet":
        yield from _parquet_batches(path, batch_size, max_row_bytes)
    else:
        yield from _jsonl_batches(path, batch_size, max_row_bytes)


def _too_large(limit: int, what: str) -> RowError:
    return RowError("row_too_large", f"{what} is longer than --max-row-bytes {limit}; raise the limit to read it")


def _parquet_batches(path: Path, batch_size: int, limit: int):
    number = 0
    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        sizes = np.zeros(record_batch.num_rows, dtype=np.int64)
        for column in record_batch.columns:
            sizes += text_bytes(column)
        rows = _batch_rows(record_batch.filter(pa.array(sizes <= limit))) if (sizes > limit).any() else _batch_rows(record_batch)
        kept = iter(rows)
        items = [_too_large(limit, f"the row's text ({size} bytes)") if size > limit else next(kept) for size in sizes]
        yield [(number + i + 1, item) for i, item in enumerate(items)]
        number += len(items)


def _batch_rows(record_batch: pa.RecordBatch) -> list[dict | RowError]:
    try:
        return record_batch.to_pylist()
    except UnicodeDecodeError:  # one bad string: find it row by row
        return [_one_row(record_batch.slice(i, 1)) for i in range(record_batch.num_rows)]


def _one_row(one: pa.RecordBatch) -> dict | RowError:
    try:
        return one.to_pylist()[0]
    except UnicodeDecodeError as err:
        return RowError("invalid_utf8", f"a string in the row is not valid UTF-8: {err}")


def text_bytes(array: pa.Array) -> np.ndarray:
    """(len(array),) int64: bytes of string data in each row, nested lists and structs included."""
    t = array.type
    if pa.types.is_dictionary(t):
        return text_bytes(array.dictionary_decode())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = array.offsets.to_numpy().astype(np.int64)
        inner = np.concatenate([[0], np.cumsum(text_bytes(array.flatten()))])
        return inner[offsets[1:] - offsets[0]] - inner[offsets[:-1] - offsets[0]]
    if pa.types.is_struct(t):
        return sum((text_bytes(child) for child in array.flatten()), np.zeros(len(array), dtype=np.int64))
    return np.zeros(len(array), dtype=np.int64)


def _parse_json_line(line: bytes) -> dict | RowError:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowError("invalid_utf8", f"line is not valid UTF-8: {err}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return RowError("invalid_json", f"line is not valid JSON: {err}")
    if not isinstance(row, dict):
        return RowError("invalid_json", f"line is JSON {type(row).__name__}, expected an object")
    return row


def _lines(fh, limit: int) -> Iterator[bytes | None]:
    """Lines of a binary file; None for a line over ``limit`` bytes, skipped in 1 MiB pieces."""
    while line := fh.readline(limit + 1):
        if line.endswith(b"\n") or len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = fh.readline(1 << 20)
        yield None


def _jsonl_batches(path: Path, batch_size: int, limit: int):
    batch = []
    with open(path, "rb") as fh:
        for number, line in enumerate(_lines(fh, limit), start=1):
            if line is None:
                batch.append((number, _too_large(limit, "the line")))
            elif line.strip():  # blank lines are not rows
                batch.append((number, _parse_json_line(line.removeprefix(codecs.BOM_UTF8) if number == 1 else line)))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def row_id(row: dict | None) -> tuple[str, object] | None:
    """``(column, value)`` of the row's own id (the first of :data:`ID_COLUMNS` holding a string or number)."""
    for name in ID_COLUMNS:
        value = (row or {}).get(name)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return name, value
    return None


def file_digest(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Outputs


def clear_file_outputs(folder: Path, index: int) -> None:
    """Remove what input file ``index`` left in a build's own work folder, before building it again."""
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


def _sequence_arrays(chunk: list) -> list[pa.Array]:
    return [
        _list_array([b.input_ids for b in chunk]),
        _list_array([b.labels for b in chunk]),
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
    (``medmax.passthrough``); a change starts a new shard, and :meth:`close` rewrites the earlier ones,
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
