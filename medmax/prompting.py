"""The one prompt layout: where a question's images go, for generation, evaluation and training data alike.

Training rows (ours and MedMax's ``<image>question<reserved08706>answer``), MedMax's SFT prompt processor
(``[image, question, <END-OF-TURN>]``) and its evaluation put the image *before* the question. So does every
program here: a text without ``<image>`` placeholders gets its images first, in order; a text with
placeholders gets each image where its placeholder stands (their number must match). A backslash escapes a
placeholder as it does in training rows (``medmax.vocab.split_markers``): ``\\<image>`` is the text
``<image>``, never an image's place. :func:`place_images` states that rule on text (MedMax's row format);
:func:`prompt_segments` turns it into the segment list ``medmax.generation.Generator`` takes.

The end-of-turn sentinel :data:`END_OF_TURN` (``<reserved08706>`` in the sequence) closes a prompt
the way training rows close theirs; the model answers after it.

This module imports nothing heavy, so data writers can use it without torch.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from .errors import UserError
from .vocab import IMAGE_PLACEHOLDER, escape_markers, split_markers

T = TypeVar("T")


class _EndOfTurn:
    """The end-of-turn sentinel segment (``<reserved08706>``) between a prompt and its answer."""

    def __repr__(self) -> str:
        return "END_OF_TURN"


END_OF_TURN = _EndOfTurn()


def place_images(text: str, n_images: int) -> str:
    """``text`` with one ``<image>`` placeholder per image: as given, or all of them before the text.

    >>> place_images("What is shown?", 1)
    '<image>What is shown?'
    """
    found = sum(marker is not None for _, marker in split_markers(text, (IMAGE_PLACEHOLDER,)))
    if found == 0:
        return IMAGE_PLACEHOLDER * n_images + text
    if found != n_images:
        raise UserError(f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders but {n_images} images were given")
    return text


def strip_placeholders(text: str) -> str:
    """``text`` without its ``<image>`` placeholders; an escaped ``\\<image>`` stays, as text.

    >>> strip_placeholders("<image>What is \\<image>?")
    'What is \\\\<image>?'
    """
    literal = "".join(piece for piece, marker in split_markers(text, (IMAGE_PLACEHOLDER,)) if marker is None)
    return escape_markers(literal, (IMAGE_PLACEHOLDER,))


def prompt_segments(text: str, images: Sequence[T], end_of_turn: bool = False, strip: bool = False) -> list:
    """Text and images in the one layout (module docstring): a list of ``str`` and the given image objects.

    ``images`` may be anything a consumer understands (paths, PIL images, ``ImageCodes``, token-id
    lists); they come back in order. Empty text pieces are dropped; ``strip`` also trims the whitespace
    around each piece (MedMax's evaluation strips its prompts). ``end_of_turn`` appends :data:`END_OF_TURN`.
    """
    segments: list = []
    placed = iter(images)
    for piece, marker in split_markers(place_images(text, len(images)), (IMAGE_PLACEHOLDER,)):
        if marker is not None:
            segments.append(next(placed))
        elif piece.strip() if strip else piece:
            segments.append(piece.strip() if strip else piece)
    return segments + ([END_OF_TURN] if end_of_turn else [])
