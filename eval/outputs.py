"""An evaluation's output folder: the files eval.run writes there, and the fingerprint check on reuse.

::

    OUTPUT/fingerprint.json                    what decided these predictions (eval/fingerprint.py)
    OUTPUT/results.json                        our metrics, with the fingerprint and the toolkit version
    OUTPUT/results_medmax.json                 MedMax's layout: {task_id: {"accuracy", "std_err"}}
    OUTPUT/report.md, report.png, problems.jsonl
    OUTPUT/predictions/<task>.jsonl            merged rows in data order (rank 0)
    OUTPUT/predictions/<task>.rank<R>.jsonl    rank R's rows as they are made (rank R only)
    OUTPUT/predictions/images/<uid>.png        drawn images
    OUTPUT/generations_<task>.png              a grid of an image-generation task's prompts and drawings (eval/fid.py)
    OUTPUT/judge_cache.rank<R>.jsonl           parsed judge verdicts, keyed by the whole request
    OUTPUT/.shard<R>.done                      rank R finished this launch (eval/launch.py)

``--overwrite`` deletes these files (never another file in the folder) except the judge caches: their
entries are keyed by the whole request (judge model, prompt, question, gold, answer), so they stay valid.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from medmax.jsonl import read_json, write_atomic

from . import fingerprint
from .errors import FingerprintMismatch
from .tasks import TASKS_BY_KEY

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
RESULTS = "results.json"
RESULTS_MEDMAX = "results_medmax.json"
REPORT_MD, REPORT_PNG, PROBLEMS = "report.md", "report.png", "problems.jsonl"
PREDICTIONS = "predictions"
SHARED = (RESULTS, RESULTS_MEDMAX, REPORT_MD, REPORT_PNG, PROBLEMS)
_RANK_FILE = re.compile(r"^(?P<key>[a-z0-9_]+)\.rank(?P<rank>\d+)\.jsonl$")
_MARKER = re.compile(r"^\.shard(?P<rank>\d+)\.done$")


def shard_path(pred_dir: Path, key: str, rank: int) -> Path:
    return pred_dir / f"{key}.rank{rank}.jsonl"


def grid_name(key: str) -> str:
    return f"generations_{key}.png"


def judge_cache_path(output: Path, rank: int) -> Path:
    return output / f"judge_cache.rank{rank}.jsonl"


def _rank_files(output: Path) -> list[tuple[Path, int]]:
    found = [(p, int(m["rank"])) for p in output.glob(".shard*.done") if (m := _MARKER.match(p.name))]
    pred = output / PREDICTIONS
    if pred.is_dir():
        found += [(p, int(m["rank"])) for p in pred.iterdir() if (m := _RANK_FILE.match(p.name)) and m["key"] in TASKS_BY_KEY]
    return found


def _shared_files(output: Path) -> list[Path]:
    pred = output / PREDICTIONS
    files = [output / name for name in SHARED + (FINGERPRINT,)]
    files += [pred / f"{key}.jsonl" for key in TASKS_BY_KEY] + [output / grid_name(key) for key in TASKS_BY_KEY]
    if (pred / "images").is_dir():
        files += [p for p in (pred / "images").iterdir() if p.suffix == ".png"]
    return [p for p in files if p.is_file()]


def eval_files(output: Path, ranks: set[int] | None = None) -> list[Path]:
    """Files eval.run wrote in ``output``: every one (``ranks`` None), or only those of the given ranks
    plus, when rank 0 is among them, the shared outputs (results, merged predictions, images, fingerprint)."""
    if not output.is_dir():
        return []
    files = [p for p, rank in _rank_files(output) if ranks is None or rank in ranks]
    if ranks is None or 0 in ranks:
        files += _shared_files(output)
    return files


def clear(output: Path, ranks: set[int] | None = None) -> int:
    files = eval_files(output, ranks)
    for path in files:
        path.unlink(missing_ok=True)
    images = output / PREDICTIONS / "images"
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    if files:
        logger.info("--overwrite: removed %d files an earlier evaluation wrote in %s", len(files), output)
    return len(files)


def claim(output: Path, fp: dict, overwrite: bool, ranks: set[int] | None = None) -> None:
    """Make ``output`` this fingerprint's folder, or raise FingerprintMismatch naming what differs.

    ``ranks``: the ranks whose files this process may delete with ``overwrite`` (None: all of them; a shard
    started by hand clears only its own, and the rows other shards left carry their own fingerprint tag).
    """
    path = output / FINGERPRINT
    old = read_json(path)
    if overwrite:
        clear(output, ranks)
    elif old is None and (path.exists() or eval_files(output)):
        what = "an unreadable fingerprint.json" if path.exists() else "evaluation files but no fingerprint.json (an older version?)"
        raise FingerprintMismatch(f"--output {output} holds {what}, so its predictions cannot be matched to this model and "
                                  f"these settings; use a new --output, or --overwrite to start it afresh")
    elif old is not None and old.get("digest") != fp["digest"]:
        changes = fingerprint.describe(fingerprint.differences(old, fp))
        raise FingerprintMismatch(f"--output {output} holds predictions of another model or settings ({changes}); "
                                  f"use a new --output, or --overwrite to start it afresh")
    (output / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    if overwrite or old is None:
        write_atomic(path, json.dumps(fp, indent=2, sort_keys=True) + "\n")
