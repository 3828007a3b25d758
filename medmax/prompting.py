"""The one prompt layout: where a question's images go, for generation, evaluation and training data alike.

Training rows (ours and MedMax's ``<image>question<reserved08706>answer``), MedMax's SFT prompt processor
(``[image, question, <END-OF-TURN>]``) and its evaluation put the image *before* the question. So does every
program here: a text without ``<image>`` placeholders gets its images first, in order; a text with
placeholders gets each image where its placeholder stands (their number must match). A backslash escapes a
placeholder as it does in training rows (``medmax.vocab.split_markers``): ``\\<image>`` is the text
``<image>``, never an image's place. :func:`place_images` states that rule on text (MedMax's row format);
:func:`prompt_segments` turns it into the segment list ``medmax.generation.Generator`` takes.

A volume (a NIfTI file, a DICOM series folder or a ``.npy`` array) fills one image's place: :func:`load_volume_input`
reads the slices the way ``image_tokenize --volume-column`` does (:mod:`medmax.volume_tokenizing`) and
:func:`expand_volumes` writes it out in the training layout (``medmax.data.rows.VOLUME_LAYOUT``): its header
text, then one greyscale image per slice, inferior to superior.

The end-of-turn sentinel :data:`END_OF_TURN` (``<reserved08706>`` in the sequence) closes a prompt
the way training rows close theirs; the model answers after it.

This module imports nothing heavy, so data writers can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class VolumeInput:
    """A volume in a prompt: its header and its slices as the model sees them (greyscale RGB, VQGAN-sized)."""

    path: str
    header: str  # e.g. "CT, 16 axial slices, 5.0 mm apart, inferior to superior:"
    slices: tuple  # PIL images, inferior to superior; the prompt encoder resizes and crops them as Chameleon does
    slice_indices: tuple[int, ...]
    window: str
    positions_mm: tuple[float, ...] | None = None  # z (LPS, mm) of each slice; None without geometry (.npy)
    skipped_files: int = 0  # files of a DICOM series folder that are not DICOM slices


def load_volume_input(path: str | Path, resolution: int | None = None, slices: str = "16", window: str = "percentile",
                      volume_index: int | None = None) -> VolumeInput:
    """Read a volume for a prompt with the same rules as its tokenization (ImageLoadError / ValueError when it cannot).

    ``resolution``: the slices' side, as ``--slice-resolution`` makes it; None keeps them as read, and the prompt
    encoder's resize to its VQGAN's side then gives the same pixels (Chameleon's resize and crop, once)."""
    from PIL import Image

    from .data.rows import volume_header
    from .images import DEFAULT_LIMITS
    from .volume_tokenizing import VolumeRule, load_volume_row
    from .volumes import Intensity

    path = Path(path).absolute()
    rule = VolumeRule(root=path.parent, slices=str(slices), resolution=resolution, intensity=Intensity.parse(window),
                      volume_index=volume_index, limits=DEFAULT_LIMITS)
    volume = load_volume_row(path.name, rule)
    images = tuple(Image.fromarray(grey, mode="L").convert("RGB") for grey in volume.pixels)
    positions = tuple(volume.positions_mm) if volume.positions_mm is not None else None
    return VolumeInput(str(path), volume_header(volume), images, tuple(volume.slice_indices), volume.window, positions,
                       int(volume.geometry.get("skipped_files") or 0))


def expand_volumes(segments: list) -> list:
    """Each :class:`VolumeInput` segment -> its header text and its slice images, in place; others as they are."""
    out: list = []
    for seg in segments:
        out += [seg.header, *seg.slices] if isinstance(seg, VolumeInput) else [seg]
    return out
