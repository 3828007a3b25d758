"""Image-editing tasks on the synthetic lesion scans (``medmax.synthetic``): an input scan, an instruction, a target scan.

Four edit kinds (:data:`EDITS`), each an instruction and a rule the lesion locator
(:func:`medmax.synthetic.locate_lesion`) checks on the output:

- ``remove``: "Remove the lesion." -> no lesion is found;
- ``move``: "Move the lesion to the lower left." (inputs have their lesion elsewhere) -> the lesion lies in the lower left;
- ``larger``: "Make the lesion larger." (inputs have a small lesion) -> a large lesion in the input's quadrant;
- ``invert``: "Translate the scan to the inverted contrast." (a modality translation: every grey level ``g``
  becomes ``255 - g``) -> the output's background is brighter than its body, and inverting it back shows the
  input's lesion (quadrant and size).

An input and its target share the body, its grey level and its noise (the same random draws; only the lesion
differs), so an edit changes only what its instruction names. Every input carries a lesion, so returning
the input unchanged (the no-change baseline) fails every kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .synthetic import POSITIONS, SIZES, _render, locate_lesion

EDITS = {
    "remove": "Remove the lesion.",
    "move": "Move the lesion to the lower left.",
    "larger": "Make the lesion larger.",
    "invert": "Translate the scan to the inverted contrast.",
}
MOVE_TO = "lower left"


@dataclass(frozen=True)
class EditPair:
    """One editing example: the input scan's lesion, the instruction's kind, the input and target images."""

    name: str
    kind: str  # one of EDITS
    position: str  # the input's lesion quadrant
    size: str  # the input's lesion size
    source: Image.Image
    target: Image.Image

    @property
    def instruction(self) -> str:
        return EDITS[self.kind]


def _pair_pixels(seed: int, size: int, kind: str, position: str, lesion_size: str) -> tuple[np.ndarray, np.ndarray]:
    """Input and target pixels drawn from the same random stream (same body and noise)."""
    source = _render(np.random.default_rng(seed), size, True, position, lesion_size)
    if kind == "invert":
        return source, 255 - source
    target_args = {"remove": (False, None, None), "move": (True, MOVE_TO, lesion_size),
                   "larger": (True, position, "large")}[kind]
    return source, _render(np.random.default_rng(seed), size, *target_args)


def make_edit_pairs(n_per_kind: int, seed: int = 0, size: int = 96) -> list[EditPair]:
    """``n_per_kind`` pairs of every edit kind, interleaved by kind; one seed draws them all."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_per_kind):
        for kind in EDITS:
            positions = [p for p in POSITIONS if p != MOVE_TO] if kind == "move" else list(POSITIONS)
            position = positions[int(rng.integers(len(positions)))]
            lesion_size = "small" if kind == "larger" else SIZES[int(rng.integers(2))]
            source, target = _pair_pixels(int(rng.integers(2**31)), size, kind, position, lesion_size)
            pairs.append(EditPair(f"edit_{seed}_{kind}_{i:05d}", kind, position, lesion_size,
                                  Image.fromarray(source, mode="L"), Image.fromarray(target, mode="L")))
    return pairs


def inverted_contrast(image: Image.Image) -> bool:
    """Whether the background (the four corners) is brighter than the body (the centre): the inverted contrast."""
    a = np.asarray(image.convert("L"), dtype=np.float64)
    h, w = a.shape
    ch, cw = max(1, h // 10), max(1, w // 10)
    corners = np.concatenate([a[:ch, :cw].ravel(), a[:ch, -cw:].ravel(), a[-ch:, :cw].ravel(), a[-ch:, -cw:].ravel()])
    return float(corners.mean()) > float(np.median(a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]))


def edit_success(kind: str, position: str, size: str, output: Image.Image) -> bool:
    """Whether ``output`` does what the instruction of ``kind`` asked of an input whose lesion is (position, size)."""
    if kind == "invert":
        return inverted_contrast(output) and locate_lesion(ImageOps.invert(output.convert("L"))) == (position, size)
    found = locate_lesion(output)
    if kind == "remove":
        return found is None
    if kind == "move":
        return found is not None and found[0] == MOVE_TO
    if kind == "larger":
        return found == (position, "large")
    raise ValueError(f"unknown edit kind {kind!r}; choose one of {tuple(EDITS)}")
