"""The generator: its config and outputs, batching prompts, and interleaving text and images.

Interleaved mode runs text until the model emits begin-of-image, a full image, back to text; up to
``max_images`` images and ``max_new_tokens`` text tokens. Prompts are decoded ``batch_size`` at a
time, grouped by length. Each phase (a text run, an image) prefills its own cache from the row's
whole context so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from PIL import Image

from ..model import ModelBundle, load_model_dir
from .config import GenerationConfig
from .editing import EditRegion, check_edits, forced_codes
from .forward import ModelRunner
from .image import ImageDecoder
from .prompts import PromptEncoder, Segment
from .state import _Row
from .text import TextDecoder

logger = logging.getLogger(__name__)

@dataclass
class TextOutput:
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ImageOutput:
    image: Image.Image | None  # None when GenerationConfig.decode_images is False
    codes: list[int]
    grid: tuple[int, int] | None = None  # (h, w) codes of a shaped image (row-major codes); None: the VQGAN's square


@dataclass
class GenerationOutput:
    """One prompt's result: ordered text and image segments, and every generated token id."""

    segments: list[Union[TextOutput, ImageOutput]]
    token_ids: list[int]
    finish_reason: str  # "eos" (end of sequence / turn), "stop" (a stop string), "length", "image" (image mode)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments if isinstance(s, TextOutput))

    @property
    def images(self) -> list[ImageOutput]:
        return [s for s in self.segments if isinstance(s, ImageOutput)]


class Generator:
    """Generates text, images or both from a loaded model folder (see the package docstring).

    Its parts: ``prompts`` (:class:`PromptEncoder`), ``runner`` (:class:`ModelRunner`, the model's
    forward passes), ``text_decoder`` (:class:`TextDecoder`) and ``image_decoder`` (:class:`ImageDecoder`); this class
    batches the prompts and interleaves text and images.
    """

    def __init__(self, bundle: ModelBundle):
        self.model = bundle.model.eval()
        self.tokenizer = bundle.tokenizer
        self.vocab = bundle.vocab
        self.vqgan = bundle.vqgan
        self.runner = ModelRunner(self.model, self.vocab.pad_id)
        self.device = self.runner.device
        self.context_length = int(self.model.config.max_position_embeddings)
        self.prompts = PromptEncoder(self.tokenizer, self.vocab, self.vqgan, self.context_length)
        self.text_decoder = TextDecoder(self.runner, self.vocab, self.tokenizer, self.context_length)
        self.image_decoder = ImageDecoder(self.runner, self.vocab, self.vqgan)

    @classmethod
    def from_dir(cls, path: str | Path, device=None, dtype: torch.dtype | None = None,
                 skip_memory_check: bool = False) -> "Generator":
        return cls(load_model_dir(path, dtype=dtype, device=device, skip_memory_check=skip_memory_check))

    @property
    def n_image_tokens(self) -> int:
        """Tokens one image takes in a sequence: boi + grid + eoi."""
        return self.prompts.n_image_tokens

    def encode_prompts(self, prompts, config: GenerationConfig | None = None) -> list[list[int]]:
        """Token ids of each prompt (validated; images tokenized with the VQGAN)."""
        return self.prompts.encode(self.prompts.check(prompts, (config or GenerationConfig()).mode)[0])

    # ------------------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[Segment]], config: GenerationConfig | None = None, *,
                 seeds: Sequence[int] | None = None, on_step: Callable | None = None,
                 edits: Sequence[EditRegion | None] | None = None) -> list[GenerationOutput]:
        """Generate for a batch of prompts; -> one GenerationOutput per prompt, in order.

        ``seeds``: one seed per prompt (instead of ``config.seed``); each prompt then samples from its own
        generator, so its output does not depend on the other prompts of the batch.
        ``on_step(index, item)`` is called as the output grows: with each text token id the prompt
        ``index`` emits (end tokens included, before stop strings are cut) and with each drawn
        :class:`ImageOutput`; it lets a caller stream the answer.
        ``edits``: inpainting, image mode only: per prompt an :class:`~medmax.generation.editing.EditRegion`
        (draw only its codes, copy the others from the prompt's image) or None.
        """
        config = config or GenerationConfig()
        if config.mode in ("image", "interleaved") and config.decode_images:
            self.prompts.require_vqgan(f"{config.mode} generation")
        if config.mode != "text" and config.image_size is not None:
            from ..image_layout import check_size

            check_size(config.image_size, self.prompts.require_vqgan("--size").downsampling)
        checked, lengths = self.prompts.check(prompts, config.mode)
        if seeds is not None and len(seeds) != len(checked):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(checked)} prompts")
        if edits is not None:
            check_edits(edits, checked, config.mode, self.prompts.require_vqgan("inpainting").grid_shape,
                        config.image_layout)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(config.seed) if config.seed is not None else rng.seed()
        order = sorted(range(len(checked)), key=lambda i: lengths[i])
        outputs: list[GenerationOutput | None] = [None] * len(checked)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            rows = [self._new_row(ids, i, config, seeds, on_step, edits[i] if edits else None)
                    for i, ids in zip(chunk, self.prompts.encode([checked[i] for i in chunk]))]
            for i, out in zip(chunk, self._generate_batch(rows, config, rng)):
                outputs[i] = out
            logger.debug("generated %d / %d prompts", min(start + config.batch_size, len(order)), len(order))
        return outputs

    def _new_row(self, ids: list[int], index: int, config: GenerationConfig, seeds, on_step,
                 edit: EditRegion | None) -> _Row:
        rng = None
        if seeds is not None:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(int(seeds[index]))
        forced = None
        if edit is not None:
            blocks = _image_blocks(self.vocab, ids)
            forced = forced_codes(edit.region, self.vocab.ids_to_codes(blocks[edit.source]), self.vqgan.n_codes_per_image)
        return _Row(context=ids, text_left=config.max_new_tokens, images_left=config.max_images, index=index,
                    rng=rng, on_step=on_step, forced=forced)

    def _generate_batch(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator) -> list[GenerationOutput]:
        if config.mode == "image":
            self._add_images(rows, config, rng)
            for r in rows:
                r.finish_reason = "image"
        else:
            self._text_loop(rows, config, rng)
        return [GenerationOutput(segments=r.segments, token_ids=r.generated, finish_reason=r.finish_reason) for r in rows]

    def _text_loop(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator):
        """Text phases, with an image after each begin-of-image the model emits (interleaved mode)."""
        if config.mode == "text":
            for r in rows:
                r.images_left = 0
        active = list(rows)
        while active:
            image_room = self.n_image_tokens if config.mode == "interleaved" else 0
            new = self.text_decoder.run(active, config, _row_rngs(active, rng), image_room)
            for row, ids in zip(active, new):
                text, body = self.text_decoder.body(ids, config.stop_strings)
                seg = TextOutput(text=text, token_ids=body)
                if seg.token_ids:
                    row.segments.append(seg)
                row.text_left -= len(seg.token_ids)
                kept = ids[:-1] if ids and ids[-1] == self.vocab.boi_id else ids
                row.context += kept
                row.generated += kept
            drawing = [r for r in active if r.finish_reason == "image"]
            if drawing:
                self._add_images(drawing, config, rng)
            active = [r for r in drawing if self._continues(r)]

    def _add_images(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator):
        """Generate one image for each row (whose context must not yet hold the boi) and append it."""
        vqgan = self.prompts.require_vqgan("image generation")
        if config.image_layout == "fixed":
            return self._draw_images(rows, config, rng, None)
        from ..image_layout import ShapedTokens, check_size
        from .shaped import GridLayout

        tokens = ShapedTokens.from_tokenizer(self.tokenizer)
        if config.image_size is not None:
            grids = [check_size(config.image_size, vqgan.downsampling)] * len(rows)
        else:
            grids = self.image_decoder.choose_grids([r.context for r in rows], config, _row_rngs(rows, rng), tokens)
        n_codes = len(self.image_decoder.code_ids)
        for grid in dict.fromkeys(grids):  # rows that chose one grid are drawn together, in order of first choice
            group = [r for r, g in zip(rows, grids) if g == grid]
            self._draw_images(group, config, rng, GridLayout(tokens, *grid, n_codes))

    def _draw_images(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator, layout):
        """Draw one image per row, in the fixed layout (inpainting rows with their forced codes) or a shaped
        ``layout`` (its grid), and append it."""
        forced = None
        if any(r.forced for r in rows):
            n = self.vqgan.n_codes_per_image
            forced = torch.tensor([r.forced or [-1] * n for r in rows], dtype=torch.long)  # (B, n)
        codes = self.image_decoder.draw([r.context for r in rows], config, _row_rngs(rows, rng), forced=forced,
                                        layout=layout)  # (B, n)
        grid = None if layout is None else (layout.h, layout.w)
        images = self.image_decoder.decode(codes, grid) if config.decode_images else [None] * len(rows)
        for row, c, im in zip(rows, codes.cpu(), images):
            ids = self.image_decoder.token_ids(c, layout)
            row.context += ids
            row.generated += ids
            row.segments.append(ImageOutput(image=im, codes=c.tolist(), grid=grid))
            row.images_left -= 1
            if row.on_step:
                row.on_step(row.index, row.segments[-1])

    def _continues(self, row: _Row) -> bool:
        """After an image: continue with text if budget and context remain."""
        if row.text_left <= 0 or len(row.context) >= self.context_length:
            row.finish_reason = "length"
            return False
        row.finish_reason = ""
        return True


def _image_blocks(vocab, ids: list[int]) -> list[list[int]]:
    """The code ids of each image block (between begin- and end-of-image) in a prompt's ids, in order."""
    blocks, current = [], None
    for tok in ids:
        if tok == vocab.boi_id:
            current = []
        elif tok == vocab.eoi_id and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(tok)
    return blocks


def _row_rngs(rows: list[_Row], rng: torch.Generator):
    """The rows' own generators when they have them (``generate(seeds=...)``), else the shared one."""
    return [r.rng for r in rows] if rows and rows[0].rng is not None else rng
