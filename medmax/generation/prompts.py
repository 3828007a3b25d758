"""Prompts: their segments, and checking and encoding them into token ids.

A prompt is a list of segments: ``str`` (text), ``PIL.Image.Image`` or ``pathlib.Path`` (an image,
tokenized with the bundle's VQGAN), :class:`ImageCodes` (raw VQGAN codes), :data:`END_OF_TURN` and
:class:`medmax.prompting.VolumeInput` (a volume: its header text, then its slices as images).
It is encoded the way training sequences are built: ``<s>``, then each segment in order (text with
special-token parsing off, so typed ``<racm3:break>`` or ``</s>`` stay text; an image as
``boi + code ids + eoi``; the end-of-turn id).

Every prompt is checked (images loaded, codes in range, the length within the context) before any
model work, and errors name the prompt and segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..prompting import _EndOfTurn, expand_volumes
from ..vocab import encode_text

_ENCODE_BATCH = 8  # prompt images per VQGAN encoder call
_SINGLE = (str, Image.Image, Path)  # with ImageCodes and _EndOfTurn: a lone segment, not a prompt


@dataclass(frozen=True)
class ImageCodes:
    """An image given as raw VQGAN codes (row-major, 0..n_embed-1)."""

    codes: tuple[int, ...]

    def __post_init__(self):
        codes = self.codes.tolist() if hasattr(self.codes, "tolist") else list(self.codes)
        object.__setattr__(self, "codes", tuple(int(c) for c in np.asarray(codes).reshape(-1)))


Segment = Union[str, Image.Image, Path, ImageCodes, _EndOfTurn]


class PromptEncoder:
    """Checks prompts and turns them into token ids (text through the tokenizer, images through the VQGAN)."""

    def __init__(self, tokenizer, vocab, vqgan, context_length: int):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.vqgan = vqgan
        self.context_length = context_length

    def require_vqgan(self, what: str):
        if self.vqgan is None:
            raise UserError(f"this model folder has no vqgan/; cannot handle {what}")
        return self.vqgan

    @property
    def n_image_tokens(self) -> int:
        """Tokens one image takes in a sequence: boi + grid + eoi."""
        return self.require_vqgan("images").n_codes_per_image + 2

    def check(self, prompts, mode: str) -> tuple[list[list], list[int]]:
        """Load and validate every prompt before any model work; raise naming the prompt and segment.

        -> the prompts with images loaded, and each prompt's length in tokens.
        """
        if isinstance(prompts, (*_SINGLE, ImageCodes, _EndOfTurn)):
            raise TypeError("prompts must be a list of prompts, each a list of segments")
        checked, lengths = [], []
        needed = self.n_image_tokens if mode == "image" else 1
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, (*_SINGLE, ImageCodes, _EndOfTurn)):
                prompt = [prompt]
            prompt = expand_volumes(prompt)  # a volume: its header, then its slices as images
            segs = [self._check_segment(s, f"prompt {i} segment {j}") for j, s in enumerate(prompt)]
            length = 1 + sum(self._segment_length(s) for s in segs)
            if length + needed > self.context_length:
                raise UserError(f"prompt {i}: {length} tokens, and {mode} generation needs {needed} more, "
                                f"longer than the model's context of {self.context_length}")
            checked.append(segs)
            lengths.append(length)
        return checked, lengths

    def _check_segment(self, seg, where: str):
        """Validate one segment cheaply (no model work); images are loaded to PIL here."""
        from ..images import load_image

        if isinstance(seg, (str, _EndOfTurn)):
            return seg
        if isinstance(seg, (Path, Image.Image)):
            self.require_vqgan(f"the image in {where}")
            return load_image(seg) if isinstance(seg, Path) else seg.convert("RGB")
        if isinstance(seg, ImageCodes):
            return self._check_codes(seg, where)
        raise TypeError(f"{where}: unsupported segment type {type(seg).__name__} (str, PIL image, Path, ImageCodes, END_OF_TURN)")

    def _check_codes(self, seg: ImageCodes, where: str) -> ImageCodes:
        vqgan = self.require_vqgan(f"the image codes in {where}")
        if len(seg.codes) != vqgan.n_codes_per_image:
            raise UserError(f"{where}: {len(seg.codes)} image codes, expected {vqgan.n_codes_per_image} for a "
                            f"{vqgan.grid_shape[0]}x{vqgan.grid_shape[1]} grid")
        limit = min(vqgan.n_embed, self.vocab.n_codes)
        if seg.codes and (min(seg.codes) < 0 or max(seg.codes) >= limit):
            raise UserError(f"{where}: image codes must lie in 0..{limit - 1}, got {min(seg.codes)}..{max(seg.codes)}")
        return seg

    def _segment_length(self, seg) -> int:
        if isinstance(seg, str):
            return len(encode_text(self.tokenizer, seg))
        if isinstance(seg, _EndOfTurn):
            return 1
        return self.n_image_tokens

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> list[list[int]]:
        """VQGAN codes of each image, ``_ENCODE_BATCH`` images per encoder call."""
        from ..images import preprocess

        if not images:
            return []
        vqgan = self.require_vqgan("images")
        param = next(vqgan.parameters())
        codes = []
        for start in range(0, len(images), _ENCODE_BATCH):
            pixels = torch.stack([preprocess(im, vqgan.resolution) for im in images[start : start + _ENCODE_BATCH]])
            codes += vqgan.encode_codes(pixels.to(param.device, param.dtype)).cpu().tolist()  # (N, h*w)
        return codes

    def encode(self, checked: list[list]) -> list[list[int]]:
        """Token ids of prompts already passed through :meth:`check`."""
        pil = [s for segs in checked for s in segs if isinstance(s, Image.Image)]
        pil_codes = iter(self.encode_images(pil))
        v = self.vocab
        out = []
        for segs in checked:
            ids = [v.bos_id]
            for s in segs:
                if isinstance(s, str):
                    ids += encode_text(self.tokenizer, s)
                elif isinstance(s, _EndOfTurn):
                    ids.append(v.eot_id)
                else:
                    codes = s.codes if isinstance(s, ImageCodes) else next(pil_codes)
                    ids += [v.boi_id, *v.codes_to_ids(list(codes)).tolist(), v.eoi_id]
            out.append(ids)
        return out
