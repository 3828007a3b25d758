"""The shaped image layout in decoding: a block of ``h`` rows of ``w`` codes, each row closed by end-of-line.

The image loop (:class:`~medmax.generation.image.ImageDecoder`) draws from the image codes plus the end-of-line
id (its last column) and :class:`GridLayout` enforces the layout the way the fixed layout enforces its 1024
codes: at step ``t`` of ``h * (w + 1)`` only end-of-line is allowed when ``t % (w + 1) == w``, only codes
otherwise, so end-of-line comes exactly every ``w`` codes and end-of-image after ``h`` rows. With speculative
Jacobi decoding the drafts at end-of-line steps are end-of-line (one-hot ``q``: accepted with probability
``P = 1``), and the verification's distributions are masked the same way, so greedy SJD still gives plain
greedy decoding's codes and sampled SJD still draws plain sampling's distribution.

When no size is given the model picks it (``ImageDecoder.choose_grids``): the height token, then the width token (two short
passes on the same guided streams), and rows of one batch that chose different grids are drawn in groups.
The format of the block is :mod:`medmax.image_layout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..image_layout import ShapedTokens


@dataclass
class GridLayout:
    """One grid's layout in the image loop: ``h`` rows of ``w`` codes, ``n_codes`` drawable codes + end-of-line."""

    tokens: ShapedTokens
    h: int
    w: int
    n_codes: int

    @property
    def n_steps(self) -> int:
        return self.h * (self.w + 1)

    @property
    def eol(self) -> int:
        """The end-of-line column of the loop's logits (after the codes)."""
        return self.n_codes

    def prefix(self) -> list[int]:
        """The tokens after boi that say the shape: height, width."""
        return [int(self.tokens.size_ids[self.h]), int(self.tokens.size_ids[self.w])]

    def column_ids(self, code_ids: torch.Tensor) -> torch.Tensor:
        """(n,) code ids -> (n + 1,) the ids the loop may emit: the codes, then end-of-line."""
        return torch.cat([code_ids, code_ids.new_tensor([self.tokens.eol_id])])

    def line_end(self, first: torch.Tensor, width: int) -> torch.Tensor:
        """(B,) first step of a window -> (B, width) bool: which of its steps must be end-of-line."""
        steps = first[:, None] + torch.arange(width, device=first.device)
        return steps % (self.w + 1) == self.w

    def mask(self, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """(B, W, n + 1) guided logits whose window starts at step ``first`` (B,) -> only what the layout allows."""
        end = self.line_end(first, logits.shape[1])[..., None]  # (B, W, 1)
        is_eol = torch.arange(logits.shape[-1], device=logits.device) == self.eol  # (n + 1,)
        return logits.masked_fill(end != is_eol, float("-inf"))

    def force_drafts(self, drafts, done: torch.Tensor) -> None:
        """Drafts at end-of-line steps become end-of-line (one-hot q); ``done`` (B,) codes committed, so draft k is step done + k."""
        end = self.line_end(done, drafts.codes.shape[1])  # (B, K)
        drafts.codes = torch.where(end, torch.full_like(drafts.codes, self.eol), drafts.codes)
        one_hot = torch.nn.functional.one_hot(torch.tensor(self.eol, device=end.device), drafts.q.shape[-1]).to(drafts.q.dtype)
        drafts.q = torch.where(end[..., None], one_hot, drafts.q)

    def grid_codes(self, steps: torch.Tensor) -> torch.Tensor:
        """(B, h * (w + 1)) drawn columns -> (B, h * w) codes; raises if an end-of-line is out of place (cannot happen)."""
        rows = steps.view(steps.shape[0], self.h, self.w + 1)
        if not (rows[:, :, -1] == self.eol).all() or (rows[:, :, :-1] == self.eol).any():
            raise RuntimeError("shaped image loop: end-of-line out of place")
        return rows[:, :, :-1].reshape(steps.shape[0], -1)

