"""The one JSONL (and JSON) reader and writer: eval's predictions, judge cache and done markers, the
synthetic data set, training's log history, image-token error files.

One rule for all of them: a last line cut short (a kill mid-write) is dropped with a warning, and so is
any line that is not a JSON object; neither is ever fatal. Only the process that owns a file repairs it
(``repair=True`` cuts the unfinished line off before that process appends again); a reader of another
process's file never writes to it. Whole files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """The JSON objects of ``path`` (none when it is missing); see the module docstring for damaged lines."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        if repair:
            os.truncate(path, cut)
        data = data[:cut]
    rows = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            logger.warning("%s:%d: skipping a line that is not a JSON object", path, number)
    return rows


def dumps_line(row: dict, sort_keys: bool = True) -> str:
    return json.dumps(row, sort_keys=sort_keys) + "\n"


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append whole lines and flush them (an interruption can only cut the last one)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(dumps_line(r) for r in rows))
        f.flush()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed over it when complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict], sort_keys: bool = True) -> None:
    """All of ``rows``, one JSON object a line, written atomically (``sort_keys=False`` keeps each row's key order)."""
    write_atomic(path, "".join(dumps_line(r, sort_keys) for r in rows))


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing, cut short or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
