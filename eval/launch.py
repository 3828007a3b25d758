"""One launch of a sharded evaluation: a launch-unique run id every rank agrees on, and done-markers.

Each rank writes only its own files: ``predictions/<task>.rank<R>.jsonl``, ``judge_cache.rank<R>.jsonl``
and the marker ``.shard<R>.done`` (``{"run_id", "fingerprint", "rank"}``, written atomically when the
rank's rows are all on disk). Rank 0 merges only when every rank's marker names *this* launch's run id
and fingerprint; a marker left by another launch, or cut short, is never accepted. If a rank does not
finish within ``--merge-timeout-s``, rank 0 stops without writing results; rerunning resumes.

Where the run id comes from:
- torchrun: rank 0 draws it and broadcasts it to every rank (``torch.distributed`` over gloo), since
  torchrun's own ``TORCHELASTIC_RUN_ID`` is the same for every launch unless the user sets it;
- ``--workers N``: the parent draws it and passes it to its workers (``--run-id``);
- shards started by hand (``--shard-rank/--num-shards``): the user gives the same ``--run-id`` to each.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

from medmax.distributed import join_group, leave_group
from medmax.jsonl import read_json, write_atomic

from .errors import ShardError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def new_run_id() -> str:
    return uuid.uuid4().hex


def under_torchrun() -> bool:
    """True in a rank that torchrun (or torch.distributed.run) started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ and "RANK" in os.environ


def agree(make: Callable[[], T]) -> T:
    """Rank 0 calls ``make()``; every rank returns its result (or raises the exception it raised).

    Uses a gloo process group for the one broadcast (CPU or GPU alike), made and removed here.
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        join_group("gloo", timeout=timedelta(minutes=30))
    try:
        box: list = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", make())
            except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value
    finally:
        if created:
            leave_group()


# ------------------------------------------------------------------------------ done-markers
def marker_path(output: Path, rank: int) -> Path:
    return output / f".shard{rank}.done"


def clear_marker(output: Path, rank: int) -> None:
    marker_path(output, rank).unlink(missing_ok=True)


def write_marker(output: Path, rank: int, run_id: str, tag: str) -> None:
    write_atomic(marker_path(output, rank), json.dumps({"fingerprint": tag, "rank": rank, "run_id": run_id}))


def marker_ok(output: Path, rank: int, run_id: str, tag: str) -> bool:
    marker = read_json(marker_path(output, rank))
    return marker is not None and marker.get("run_id") == run_id and marker.get("fingerprint") == tag


def wait_for_shards(output: Path, num_shards: int, run_id: str, tag: str, timeout_s: float, poll_s: float = 0.2) -> None:
    """Return once every rank's marker names this launch; raise ShardError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        missing = [r for r in range(num_shards) if not marker_ok(output, r, run_id, tag)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise ShardError(f"shards {missing} of launch {run_id} did not finish within {timeout_s:g} s, so nothing "
                             f"was merged; rerun the same command to resume (finished rows are kept)")
        if not logged:
            logger.info("waiting for shards %s of launch %s (up to %.0f s)", missing, run_id, timeout_s)
            logged = True
        time.sleep(poll_s)
