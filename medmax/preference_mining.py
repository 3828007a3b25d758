"""Curating preference pairs from a VQA set the way MMedPO does: hallucinated answers and locally noised images.

MMedPO (Zhu et al., 2024, "MMedPO: Aligning Medical Vision-Language Models with Clinical-Aware
Multimodal Preference Optimization") builds its dispreferred answers two ways:

- **text hallucination**: the gold answer is preferred to a confident wrong one. Here the wrong answer is
  the model's own greedy answer when it is wrong, else one swapped in from the question's type
  (:func:`swap_answer`: yes <-> no, another option in the gold's form, another open answer of the same type);
- **local visual noising**: the lesion region of the image is noised (:func:`noise_region`, a
  diffusion-style ``sqrt(1 - s) x + sqrt(s) eps`` inside the region only), and the model's answer on the
  noised image is the dispreferred one, paired with the original image and the gold answer.

MMedPO weights each pair by the clinical relevance of the perturbed region, which it scores with
MedKLIP (a medical vision-language model's attention on the lesion). No such scorer exists for an
arbitrary early-fusion model, so the stand-in is measured in the model's own input space: the share of
the image's VQGAN codes that the noising changed (:func:`changed_share`). Both grow with how much
of the image the model *sees* altered, and both are 0 for a perturbation the model cannot tell apart;
unlike MedKLIP's score it knows nothing of anatomy, so a noised region that covers background weighs
as much as one that covers a lesion of the same size. A weight given in the row takes precedence.

For image continuations the preferred image is the row's own and the dispreferred one is a perturbed
copy: its lesion region noised, or the image mirrored (:func:`mirror`; on the synthetic scans this moves
the lesion to another quadrant, so the pair prefers "the lesion where the prompt says").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .answers import answer_letter, normalize, options_from_prompt, parse_mcq, parse_options, yes_no

YES_NO = {"yes": "no", "no": "yes"}
_OPTION = re.compile(r"(?:^|\s)([A-H])\)")


def question_type(prompt: str, answer: str) -> str:
    """closed (yes/no), mcq (a letter among ``A) .. B) ..`` options in the prompt) or open."""
    if normalize(answer) in YES_NO:
        return "closed"
    letters = _OPTION.findall(prompt)
    if len(letters) >= 2 and answer.strip().rstrip(".").upper() in letters:
        return "mcq"
    return "open"


def mcq_options(prompt: str, options) -> dict | None:
    """A question's options as eval reads them (:mod:`medmax.answers`): the row's ``options`` (a mapping or its
    JSON string), else "A: text" lines in the prompt; None when neither gives them (ValueError when malformed)."""
    return parse_options(options) or options_from_prompt(prompt)


def same_answer(kind: str, said: str, gold: str, options=None) -> bool:
    """Whether ``said`` gives the gold answer, read as eval reads it: yes / no, the option letter named, else
    equal normalised text. A right answer in other words is never a rejected one."""
    if kind == "closed" and yes_no(gold) is not None:
        return yes_no(said) == yes_no(gold)
    if kind == "mcq":
        letter = answer_letter(gold, options)
        return letter is not None and parse_mcq(said, options) == letter
    return normalize(said) == normalize(gold)


def swap_answer(kind: str, prompt: str, answer: str, rng: np.random.Generator, options=None,
                pool: list[str] = ()) -> str | None:
    """A wrong answer of the question's own type, or None when there is none to swap in.

    An MCQ's wrong answer is another option, in the gold's own form: its letter for a letter gold, its text
    for a gold given as option text (``options`` as in eval's schema: a mapping or its JSON string).
    """
    if kind == "closed":
        return YES_NO.get(normalize(answer))
    if kind == "mcq":
        return _other_option(prompt, answer, rng, mcq_options(prompt, options))
    return _pick(sorted({p for p in pool if normalize(p) != normalize(answer)}), rng)


def _other_option(prompt: str, answer: str, rng: np.random.Generator, options: dict | None) -> str | None:
    gold = answer_letter(answer, options)
    if gold is None:
        return None
    letters = list(options) if options else sorted(set(_OPTION.findall(prompt)))
    pick = _pick([x for x in letters if x != gold], rng)
    as_letter = answer.strip().strip("()[].: ").upper() == gold
    return pick if pick is None or as_letter or not options else options[pick]


def _pick(choices: list[str], rng: np.random.Generator) -> str | None:
    return str(choices[int(rng.integers(len(choices)))]) if choices else None


@dataclass(frozen=True)
class Box:
    """A region as fractions of the image's width and height: [x0, x1) x [y0, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def parse(cls, value, where: str) -> "Box":
        """``[x0, y0, x1, y1]`` in fractions of width and height (0..1), checked."""
        try:
            x0, y0, x1, y1 = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: a box is [x0, y0, x1, y1] in fractions of the image, got {value!r}") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"{where}: box {value!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return cls(x0, y0, x1, y1)

    def mask(self, height: int, width: int) -> torch.Tensor:
        """(H, W) bool."""
        ys, xs = torch.arange(height) / height, torch.arange(width) / width
        return ((ys >= self.y0) & (ys < self.y1))[:, None] & ((xs >= self.x0) & (xs < self.x1))[None, :]


def random_box(rng: np.random.Generator, side: float) -> Box:
    """A seeded square box whose side is ``side`` of the image's, placed uniformly."""
    x0, y0 = rng.uniform(0, 1 - side, size=2)
    return Box(float(x0), float(y0), float(x0 + side), float(y0 + side))


def noise_region(pixels: torch.Tensor, mask: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """``pixels`` (3, H, W) in [-1, 1] with ``sqrt(1 - level) x + sqrt(level) eps`` inside ``mask`` (H, W)."""
    eps = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    noised = (1 - level) ** 0.5 * pixels + level**0.5 * eps
    return torch.where(mask[None], noised.clamp(-1, 1), pixels)


def mirror(pixels: torch.Tensor) -> torch.Tensor:
    """The image mirrored left to right, (3, H, W)."""
    return pixels.flip(-1)


def changed_share(before, after) -> float:
    """Share of positions whose VQGAN code differs: the pair's weight (MMedPO's relevance score stand-in)."""
    before, after = np.asarray(before), np.asarray(after)
    return float((before != after).mean())


def lesion_mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a lesion mask's nonzero pixels (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    h, w = mask.shape
    return Box(xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
