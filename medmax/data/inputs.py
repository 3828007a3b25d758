"""Input rows of a sequence build: JSONL and parquet files in, ``(row number, row or RowError)`` batches out.

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .rows import BuildConfigError, RowError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_ROW_BYTES = 4 * 2**20  # 4 MiB: a 4096-token row is ~20 KB of text; raise it with --max-row-bytes
# Columns that name a row (first present wins), quoted in errors beside the row number.
ID_COLUMNS = ("id", "uid", "uuid", "qid", "question_id", "sample_id", "example_id", "row_id", "idx")


def find_inputs(specs: list[str | Path], suffixes: tuple[str, ...] = INPUT_SUFFIXES) -> list[Path]:
    """Input files from files, folders (their files with one of ``suffixes``) or glob patterns, sorted."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"--input {spec}: no {' / '.join(suffixes)} files found")
        bad = [p for p in matches if p.suffix not in suffixes]
        if bad:
            raise BuildConfigError(f"--input {bad[0]}: unsupported file type (expected {', '.join(suffixes)})")
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


def bounded_lines(fh, limit: int) -> Iterator[bytes | None]:
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
        for number, line in enumerate(bounded_lines(fh, limit), start=1):
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
    return update_digest(hashlib.sha256(), path).hexdigest()


def update_digest(digest, path: Path):
    """Feed a file's content to ``digest`` (a hashlib object) in 1 MiB blocks; -> ``digest``."""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest
