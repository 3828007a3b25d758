"""The epoch plan: which sequences a training row holds, from lengths alone, computed once and cached.

A plan is two steps, both deterministic in their inputs:

1. :func:`weighted_order` -- the (dataset, sequence) pairs of one epoch, sampled by weight;
2. :func:`pack_greedy` -- best-fit bins of those pairs, each bin one training row of at most ``max_length``
   tokens (or one pair per row without packing).

It needs only the sequences' lengths. :func:`cached_plan` writes it as ``.npy`` files in a folder keyed by
everything it depends on (each dataset's identity, weights, ``max_length``, packing, seed): the first process
of a node computes it under a file lock, every other one memory-maps the result, and each rank then touches
only the rows its sampler hands it.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import is_disk_refusal
from .integrity import checksums, damage

logger = logging.getLogger(__name__)

PLAN_FILES = ("order.npy", "bins.npy", "bin_starts.npy")
PLAN_META = "plan.json"  # each file's checksum; written last, so a plan without it is incomplete


def weighted_order_array(sizes: list[int], weights: list[float], seed: int) -> np.ndarray:
    """(M, 2) int64 (dataset, sequence) pairs of one epoch; :func:`weighted_order` as an array."""
    rng = np.random.default_rng(seed)
    total, weight_sum = sum(sizes), float(sum(weights))
    parts = []
    for d, (size, weight) in enumerate(zip(sizes, weights)):
        n = int(round(total * weight / weight_sum))
        reps = -(-n // size)
        index = np.concatenate([rng.permutation(size) for _ in range(max(reps, 1))])[:n]
        parts.append(np.stack([np.full(len(index), d, dtype=np.int64), index.astype(np.int64)], axis=1))
    pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return pairs[rng.permutation(len(pairs))]


def weighted_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, sequence) pairs for one epoch of multi-dataset training.

    An epoch has as many sequences as all datasets together; dataset d contributes
    ``round(total * w_d / sum(w))`` of them: a random permutation of its own when that is not more
    than it holds, otherwise whole permutations repeated (oversampling). The result is shuffled.
    """
    return [(int(d), int(i)) for d, i in weighted_order_array(sizes, weights, seed)]


def pack_greedy(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of positions into ``lengths``, in order, each bin's total at most ``max_length``.

    Best fit: each sequence goes to the open bin with the least room that still holds it (a bisect
    over the open bins sorted by room, so a million sequences pack in seconds), keeping the order of
    the already shuffled stream nearly intact while filling rows well. Bins with less room than the
    shortest sequence are closed. Every length must be at most ``max_length``.
    """
    shortest = min(lengths, default=1)
    bins: list[list[int]] = []
    open_keys: list[tuple[int, int]] = []  # (room, bin), sorted
    for i, n in enumerate(lengths):
        k = bisect.bisect_left(open_keys, (n, -1))
        if k < len(open_keys):
            room, b = open_keys.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n >= shortest:
            bisect.insort(open_keys, (room - n, b))
    return bins


@dataclass
class EpochPlan:
    """The training rows of an epoch: row ``r`` holds the pairs ``order[bins[bin_starts[r]:bin_starts[r + 1]]]``."""

    order: np.ndarray  # (M, 2) int64: (dataset, sequence)
    bins: np.ndarray  # (M,) int64: positions into order, bin after bin
    bin_starts: np.ndarray  # (R + 1,) int64

    def __len__(self) -> int:
        return len(self.bin_starts) - 1

    def row(self, r: int) -> np.ndarray:
        """(k, 2) (dataset, sequence) pairs of row ``r``."""
        return self.order[self.bins[self.bin_starts[r] : self.bin_starts[r + 1]]]


def make_plan(lengths: list[np.ndarray], weights: list[float], max_length: int, packing: bool, seed: int) -> EpochPlan:
    """The plan over datasets whose sequences have ``lengths`` (one array per dataset)."""
    order = weighted_order_array([len(x) for x in lengths], weights, seed)
    if not packing:
        return EpochPlan(order, np.arange(len(order), dtype=np.int64), np.arange(len(order) + 1, dtype=np.int64))
    stream = np.zeros(len(order), dtype=np.int64)
    for d, x in enumerate(lengths):
        mine = order[:, 0] == d
        stream[mine] = np.asarray(x)[order[mine, 1]]
    bins = pack_greedy(stream.tolist(), max_length)
    starts = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bins], out=starts[1:])
    flat = np.fromiter((k for b in bins for k in b), dtype=np.int64, count=int(starts[-1]))
    return EpochPlan(order, flat, starts)


def plan_key(identities: list[str], weights: list[float], max_length: int, packing: bool, seed: int) -> str:
    """The cache key of a plan: everything it depends on."""
    what = {"datasets": identities, "weights": [float(w) for w in weights], "max_length": max_length,
            "packing": packing, "seed": seed, "version": 2}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (created if missing) across the processes of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load(folder: Path, warn: bool = False) -> EpochPlan | None:
    """The cached plan in ``folder``, None when it is missing or fails its checksums (``warn``: say so)."""
    try:
        recorded = json.loads((folder / PLAN_META).read_text())
    except (OSError, ValueError):
        return None
    problem = damage(folder, recorded)
    if problem:
        if warn:
            logger.warning("cached packing plan %s fails its integrity check (%s); computing it again", folder, problem)
        return None
    return EpochPlan(*(np.load(folder / name, mmap_mode="r") for name in PLAN_FILES))


def cached_plan(cache: Path, key: str, compute) -> EpochPlan:
    """The plan in ``cache/key`` (memory-mapped), computed by ``compute()`` under a lock when missing.

    A cache the file system will not write (full, read-only) is skipped with a warning: the plan is used from memory.
    """
    folder = cache / key
    plan = _load(folder)
    if plan is not None:
        return plan
    try:
        with locked(cache / f"{key}.lock"):
            plan = _load(folder, warn=True)
            if plan is None:
                plan = compute()
                _save(plan, cache, key)
    except OSError as err:
        if not (is_disk_refusal(err) or isinstance(err, PermissionError)):
            raise
        logger.warning("packing plan %s: not cached in %s (%s); using it from memory", key, cache, err.strerror)
        return plan if plan is not None else compute()
    return _load(folder)


def _save(plan: EpochPlan, cache: Path, key: str) -> None:
    tmp = cache / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, array in zip(PLAN_FILES, (plan.order, plan.bins, plan.bin_starts)):
            np.save(tmp / name, np.ascontiguousarray(array))
        (tmp / PLAN_META).write_text(json.dumps(checksums(tmp, list(PLAN_FILES))))
        shutil.rmtree(cache / key, ignore_errors=True)  # one that failed its check (we hold its lock)
        tmp.rename(cache / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("packing plan %s: %d rows of %d sequences, cached in %s", key, len(plan), len(plan.order), cache / key)
