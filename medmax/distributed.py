"""Where this process stands in a torchrun launch, and the process group (gloo on CPU, nccl on GPU).

Join the group with :func:`process_group` (or :func:`join_group` and :func:`leave_group`), never with a bare
``init_process_group``: ``torch.distributed.fsdp``, imported for the first time *after* the group exists (as
transformers' Chameleon model does), keeps a reference to the default group, so ``destroy_process_group``
cannot join gloo's threads. They are then destroyed while still running when the interpreter exits, which
aborts the process ("terminate called without an active exception", SIGABRT) after its work is done:
torchrun reports the run as failed. It happened to about 1 torchrun run in 20 on a loaded 2-core machine.
Importing it first costs about 0.8 s per rank, and only in multi-process launches. What else holds the group
(fine-tuning's meshes, DeepSpeed's groups) is handled at exit by :func:`exit_process`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def _import_group_holders() -> None:
    """Import, before the group exists, a module that would otherwise keep it alive past its destruction."""
    import torch.distributed.fsdp  # noqa: F401


def join_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``init_process_group`` after importing what would keep the group alive (see the module's docstring)."""
    import torch
    import torch.distributed as dist

    _import_group_holders()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))


def leave_group() -> None:
    """Destroy the process group, if there is one, so that its threads end here, not at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def group_threads() -> list[str]:
    """The names of this process's gloo threads still running (Linux; an empty list elsewhere)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return [name for name in names if "gloo" in name]


def exit_process(code: int) -> None:
    """End a program run as ``python -m``: ``sys.exit(code)``, unless gloo's threads outlived
    :func:`leave_group`; then flush and end the process without the interpreter's teardown, which would
    destroy them while they run and abort a run that has finished its work.

    Needed by fine-tuning, where the group accelerate makes outlives its destruction: after a 2-rank FSDP2 run
    its device meshes are still referred to from DTensor specs that torch keeps (emptying DTensor's caches did
    not free them all), and DeepSpeed's groups hold it too."""
    import logging
    import sys

    left = group_threads()
    if not left:
        sys.exit(code)
    logging.getLogger(__name__).debug("process group threads %s outlived it; ending without interpreter teardown", left)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def setup_distributed() -> Dist:
    """Read torchrun's environment (one process when it is absent) and join the process group when there are several.
    The caller leaves it with :func:`leave_group`; :func:`process_group` does both."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if world > 1 and not dist.is_initialized():
        join_group()
    return info


@contextlib.contextmanager
def process_group():
    """``with process_group() as info:`` joins the group when torchrun started several processes and always leaves it."""
    try:
        yield setup_distributed()
    finally:
        leave_group()
