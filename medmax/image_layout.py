"""Images that are not square: their grid (bucket) when tokenized, and the shaped layout of their block in a sequence.

**Grids.** ``image_tokenize --aspect keep`` gives each image a grid of ``h x w`` VQGAN codes whose count stays
at most that of the square resolution (``(N / f)**2`` codes for ``--resolution N`` and a VQGAN that downsamples
by ``f``), after Lumina-mGPT's resolution buckets (Alpha-VLLM/Lumina-mGPT, ``generate_crop_size_list`` /
``var_center_crop``): the candidates are the grids on the staircase of ``h * w <= budget`` with a side ratio of
at most 4, and an image takes the one that keeps the largest fraction of it (``min(sx, sy) / max(sx, sy)`` of the
two scale factors). Lumina-mGPT counts sides in 32-pixel patches (two codes of Chameleon's VQGAN); here a side
counts codes, so any VQGAN's downsampling is the unit. The image is resized so that it covers the grid's pixels
(the larger scale factor, LANCZOS as the square path), then centre-cropped (Lumina-mGPT crops at random).

**Shaped layout.** Chameleon's checkpoint only knows 32 x 32 blocks, so a block that may have any shape says
its shape in tokens, as Lumina-mGPT does: ``boi, <height>, <width>, row 0 codes, <end-of-line>, ..., row h-1
codes, <end-of-line>, eoi``: ``h * (w + 1) + 4`` tokens. The tokens are reserved ids every Chameleon-layout
tokenizer has (``<reserved08194>`` .. ``<reserved08705>``, ids 8198..8709; README "Vocabulary"):

- end-of-line: ``<reserved08599>`` (id 8603);
- a side of ``n`` codes (1 <= n <= 105): ``<reserved{08600 + n}>`` (id 8604 + n).

Lumina-mGPT's own names (``<reserved08799>`` and ``<reserved{08800 + n}>``, n in 32-pixel patches) lie past
the ids a Chameleon-layout tokenizer fitted here holds, so the block moved down by 200 and counts codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import UserError

ASPECTS = ("square", "keep")
IMAGE_LAYOUTS = ("fixed", "shaped")
MAX_RATIO = 4.0  # Lumina-mGPT's max_ratio: no grid longer than 4 x its width
END_OF_LINE = "<reserved08599>"
SIZE_BASE = 8600  # a side of n codes is <reserved{SIZE_BASE + n:05d}>
MAX_SIDE = 105  # <reserved08705> is the last reserved name before <reserved08706> (end of turn)


class ImageLayoutError(UserError):
    """A grid, size or shaped block that cannot be used; the message names it."""


def size_token(n: int) -> str:
    return f"<reserved{SIZE_BASE + n:05d}>"


def grid_budget(resolution: int, factor: int) -> int:
    """Codes a square ``resolution`` image takes with a VQGAN downsampling by ``factor``."""
    return (resolution // factor) ** 2


def grid_candidates(budget: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """``(h, w)`` grids on the staircase ``h * w <= budget`` with side ratio <= ``max_ratio`` (Lumina-mGPT's list)."""
    out, w, h = [], budget, 1
    while w > 0:
        if max(w, h) / min(w, h) <= max_ratio:
            out.append((h, w))
        if (h + 1) * w <= budget:
            h += 1
        else:
            w -= 1
    return out


def pick_grid(width: int, height: int, budget: int) -> tuple[int, int]:
    """The ``(h, w)`` grid an image of ``width x height`` pixels takes: the candidate that keeps most of it
    (ties: more codes, then the first)."""
    def kept(grid):
        sy, sx = grid[0] / height, grid[1] / width
        return min(sx, sy) / max(sx, sy), grid[0] * grid[1]

    candidates = grid_candidates(budget)
    if not candidates:
        raise ImageLayoutError(f"a budget of {budget} codes has no grid")
    return max(candidates, key=kept)


def resize_to_grid(image: Image.Image, grid: tuple[int, int], factor: int) -> Image.Image:
    """``image`` resized to cover ``grid`` (h, w codes) of ``factor`` pixels each (LANCZOS), then its centre cut out."""
    target_w, target_h = grid[1] * factor, grid[0] * factor
    scale = max(target_w / image.width, target_h / image.height)
    image = image.resize((max(target_w, round(scale * image.width)), max(target_h, round(scale * image.height))), Image.LANCZOS)
    x0, y0 = (image.width - target_w) // 2, (image.height - target_h) // 2
    return image.crop((x0, y0, x0 + target_w, y0 + target_h))


def parse_size(text: str, factor: int | None = None) -> tuple[int, int]:
    """``"HxW"`` (pixels) -> (H, W); with ``factor``, both must be positive multiples of it (the VQGAN's tiling)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise ImageLayoutError(f"--size {text!r}: give HxW in pixels, e.g. 64x96")
    h, w = int(match.group(1)), int(match.group(2))
    if factor is not None:
        check_size((h, w), factor)
    return h, w


def check_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(H, W) pixels -> (h, w) codes; raises unless the VQGAN (downsampling ``factor``) tiles it in a shaped block."""
    h, w = size
    if h % factor or w % factor:
        raise ImageLayoutError(f"--size {h}x{w}: the VQGAN cannot tile it (each side must be a multiple of {factor} pixels)")
    if max(h, w) // factor > MAX_SIDE:
        raise ImageLayoutError(f"--size {h}x{w}: a side of more than {MAX_SIDE} codes ({MAX_SIDE * factor} px) has no size token")
    return h // factor, w // factor


@dataclass(frozen=True)
class ShapedTokens:
    """The reserved ids of the shaped layout in one tokenizer: end-of-line and the side sizes 1..MAX_SIDE."""

    eol_id: int
    size_ids: np.ndarray  # (MAX_SIDE + 1,) int64; [n] is the id of a side of n codes ([0] unused, -1)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ShapedTokens":
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        names = [END_OF_LINE] + [size_token(n) for n in range(1, MAX_SIDE + 1)]
        missing = [n for n in names if n not in vocab]
        if missing:
            raise ImageLayoutError(f"the tokenizer lacks the reserved tokens of the shaped layout ({', '.join(missing[:3])}, ...)")
        return cls(vocab[END_OF_LINE], np.array([-1] + [vocab[size_token(n)] for n in range(1, MAX_SIDE + 1)], dtype=np.int64))

    @property
    def ids(self) -> np.ndarray:
        """Every id the layout adds (end-of-line and the sizes)."""
        return np.concatenate([[self.eol_id], self.size_ids[1:]])

    def side(self, token_id: int) -> int | None:
        """The side a size id stands for, None for another id."""
        hits = np.flatnonzero(self.size_ids == token_id)
        return int(hits[0]) if len(hits) and hits[0] > 0 else None

    def block(self, vocab, grid_ids: np.ndarray) -> np.ndarray:
        """(h, w) code ids -> the block ``boi, <h>, <w>, rows each closed by end-of-line, eoi`` (int32)."""
        h, w = grid_ids.shape
        if not 1 <= h <= MAX_SIDE or not 1 <= w <= MAX_SIDE:
            raise ImageLayoutError(f"a {h}x{w} grid has a side outside 1..{MAX_SIDE} codes")
        rows = np.concatenate([grid_ids, np.full((h, 1), self.eol_id)], axis=1).reshape(-1)
        return np.concatenate([[vocab.boi_id, self.size_ids[h], self.size_ids[w]], rows, [vocab.eoi_id]]).astype(np.int32)

    def read_block(self, vocab, ids) -> tuple[int, int, np.ndarray]:
        """A shaped block (with or without boi / eoi) -> (h, w, (h, w) code ids); raises if it breaks the layout."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == vocab.boi_id:
            ids = ids[1:]
        if ids and ids[-1] == vocab.eoi_id:
            ids = ids[:-1]
        h, w = (self.side(ids[0]), self.side(ids[1])) if len(ids) >= 2 else (None, None)
        if h is None or w is None or len(ids) != 2 + h * (w + 1):
            raise ImageLayoutError(f"not a shaped image block ({len(ids)} tokens; sizes {ids[:2]})")
        grid = np.array(ids[2:], dtype=np.int64).reshape(h, w + 1)
        if (grid[:, -1] != self.eol_id).any():
            raise ImageLayoutError(f"shaped {h}x{w} block: a row does not end with end-of-line")
        return h, w, grid[:, :-1]


def grid_of(codes) -> tuple[int, int]:
    """The (h, w) grid of codes: their shape when 2-D, else a square of their count (raises when it is none)."""
    arr = np.asarray(codes)
    if arr.ndim == 2:
        return int(arr.shape[0]), int(arr.shape[1])
    side = int(round(arr.size ** 0.5))
    if side * side != arr.size:
        raise ImageLayoutError(f"{arr.size} codes without a recorded grid are not a square grid")
    return side, side
