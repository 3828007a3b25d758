"""Refuse an allocation that cannot fit before making it: estimated bytes against available memory.

A config file is data: ``n_embed: 1000000000`` or ``num_hidden_layers: 100000`` would make the
program hang or try a 128 GB allocation long before anything fails clearly. Code that builds a model
from a config estimates its size first and calls :func:`check_fits`::

    from medmax.memory import check_fits
    check_fits(4 * n_params, f"{path}: the VQGAN's fp32 parameters", allow=skip_check,
               override="--skip-memory-check")

Available memory is the kernel's ``MemAvailable`` (``/proc/meminfo``), lowered to what the process's
cgroup (a container or a batch job's memory limit) still allows. Where neither can be read the check
passes: it only refuses what is known not to fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

_CGROUP = Path("/sys/fs/cgroup")


class MemoryBudgetError(UserError):
    """An estimated allocation is larger than the memory available; the message names what and by how much."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _cgroup_headroom() -> int | None:
    """Bytes the process's cgroup still allows (v2 ``memory.max - memory.current``, or v1), None if unlimited."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(_CGROUP / limit_file), _read_int(_CGROUP / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
            return max(limit - usage, 0)
    return None


def available_bytes() -> int | None:
    """Memory this process can still allocate, as far as the system tells; None when it cannot be read."""
    known = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    return min(known) if known else None


def check_fits(n_bytes: int, what: str, allow: bool = False, *, override: str = "allow=True", available: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` when ``n_bytes`` exceeds the available memory.

    ``what`` names the allocation (and the file or setting it comes from); ``override`` names how the
    user skips the check (a flag), quoted in the message. ``allow=True`` logs instead of raising.
    ``available`` replaces the measured figure (tests, or a caller that knows better).
    """
    free = available_bytes() if available is None else available
    if free is None or n_bytes <= free:
        return
    message = (
        f"{what} needs about {format_bytes(n_bytes)}, but only {format_bytes(free)} of memory is available; "
        f"check the sizes it comes from, or pass {override} to try anyway"
    )
    if allow:
        logger.warning("%s (going ahead: the check was overridden)", message)
        return
    raise MemoryBudgetError(message)

