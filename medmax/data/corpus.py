"""A text corpus for fitting a tokenizer: the text columns of JSONL / parquet / CSV rows, or plain text files.

- JSONL, JSON lines and parquet are read by :func:`medmax.data.inputs.iter_row_batches` (streamed, bounded,
  invalid UTF-8 or JSON the error of its row); CSV in chunks of :data:`CSV_CHUNK_ROWS` rows; a ``.txt``
  file line by line (a line is a text; blank lines are skipped, not counted).
- From a row, each of ``columns`` that is present gives text: a string as it is; a list gives its strings
  and each item's ``content`` / ``value`` (``conversations`` as role/content or LLaVA's from/value).
- Structure markers are not text: ``<image>`` and the end-of-turn ``<reserved08706>`` are cut out
  (:func:`medmax.vocab.split_markers`, so ``\\<image>`` stays text), as ``build_sequences`` never encodes them.
- A row that gives no text (none of the columns, or not a string) or cannot be read is an error with
  its file, row number and reason, counted, never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..vocab import END_OF_TURN, IMAGE_PLACEHOLDER, split_markers
from .inputs import INPUT_SUFFIXES, MAX_ROW_BYTES, bounded_lines, iter_row_batches
from .rows import RowError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
CSV_SUFFIXES = (".csv",)
CORPUS_SUFFIXES = INPUT_SUFFIXES + CSV_SUFFIXES + TEXT_SUFFIXES
DEFAULT_COLUMNS = ("text", "conversations")  # what build_sequences reads text from
CSV_CHUNK_ROWS = 4096
_MARKERS = (IMAGE_PLACEHOLDER, END_OF_TURN)


@dataclass
class CorpusCounts:
    """What reading the corpus found; ``errors`` holds ``{file, row, kind, reason}`` of each row that gave no text."""

    rows: int = 0
    texts: int = 0
    characters: int = 0
    errors: list[dict] = field(default_factory=list)


def iter_corpus(paths: list[Path], columns: tuple[str, ...], counts: CorpusCounts,
                max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[str]:
    """Every text of the corpus, in file and row order; ``counts`` is filled in as the texts are drawn."""
    for k, path in enumerate(paths, start=1):
        logger.info("reading %s (file %d of %d; %d texts so far)", path, k, len(paths), counts.texts)
        for number, row in _rows(path, columns, max_row_bytes):
            counts.rows += 1
            try:
                texts = row_texts(row, columns)
            except RowError as err:
                counts.errors.append({"file": str(path), "row": number, "kind": err.kind, "reason": err.reason})
                continue
            for text in texts:
                counts.texts += 1
                counts.characters += len(text)
                yield text


def row_texts(row: dict | str | RowError, columns: tuple[str, ...]) -> list[str]:
    """The texts of one row (a line of a text file is its own text), markers cut out; RowError when it has none."""
    if isinstance(row, RowError):
        raise row
    values = [row] if isinstance(row, str) else [row[c] for c in columns if c in row]
    pieces = [piece for value in values for piece in _strings(value)]
    if not pieces:
        raise RowError("no_text", f"no text in the columns {list(columns)}")
    return [part for piece in pieces for part, _ in split_markers(piece, _MARKERS) if part]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        items = [item.get("content", item.get("value")) if isinstance(item, dict) else item for item in value]
        return [item for item in items if isinstance(item, str) and item.strip()]
    return []


def _rows(path: Path, columns: tuple[str, ...], max_row_bytes: int) -> Iterator[tuple[int, dict | str | RowError]]:
    if path.suffix in TEXT_SUFFIXES:
        yield from _text_lines(path, max_row_bytes)
    elif path.suffix in CSV_SUFFIXES:
        yield from _csv_rows(path, columns)
    else:
        for batch in iter_row_batches(path, 1024, max_row_bytes):
            yield from batch


def _text_lines(path: Path, limit: int) -> Iterator[tuple[int, str | RowError]]:
    with open(path, "rb") as fh:
        for number, line in enumerate(bounded_lines(fh, limit), start=1):
            if line is None:
                yield number, RowError("row_too_large", f"the line is longer than {limit} bytes")
            elif line.strip():
                try:
                    yield number, line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    yield number, RowError("invalid_utf8", f"line is not valid UTF-8: {err}")


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict | RowError]]:
    """Rows numbered from 1 (the header is not a row); a cell that is not UTF-8 is its row's error."""
    import pandas as pd

    reader = pd.read_csv(path, usecols=lambda c: c in columns, chunksize=CSV_CHUNK_ROWS, dtype=object,
                         keep_default_na=False, encoding_errors="surrogateescape")
    number = 0
    try:
        with reader:
            for frame in reader:
                for row in frame.to_dict("records"):
                    number += 1
                    yield number, _checked_utf8(row)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        yield number + 1, RowError("invalid_csv", f"cannot be parsed as CSV from here on ({' '.join(str(exc).split())})")


def _checked_utf8(row: dict) -> dict | RowError:
    for column, value in row.items():
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            return RowError("invalid_utf8", f"column {column!r} is not valid UTF-8")
    return row
