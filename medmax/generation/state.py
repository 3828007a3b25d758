"""One prompt's state across the phases of a generation, shared by the loops that advance it.

``generator`` makes a :class:`_Row` per prompt and hands batches of them to the text loop (``text``) and the
image loop (``image``); each loop reads and extends the row's context, counts and finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class _Row:
    """One prompt's state across the phases of a generation."""

    context: list[int]  # prompt + everything generated so far
    segments: list = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text_left: int = 0
    images_left: int = 0
    finish_reason: str = ""
    index: int = 0  # the prompt's position in ``generate``'s input
    rng: torch.Generator | None = None  # the prompt's own generator (``generate(seeds=...)``)
    on_step: Callable | None = None  # ``generate(on_step=...)``
    forced: list[int] | None = None  # inpainting: each grid place's set code, or -1 where drawn (``generate(edits=...)``)
