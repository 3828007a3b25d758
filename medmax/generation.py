"""Generation from one early-fusion model: text, images, and interleaved text and images.

A prompt is a list of segments: ``str`` (text), ``PIL.Image.Image`` or ``pathlib.Path`` (an image,
tokenized with the bundle's VQGAN), :class:`ImageCodes` (raw VQGAN codes) and :data:`END_OF_TURN`.
It is encoded the way training sequences are built: ``<s>``, then each segment in order (text with
special-token parsing off, so typed ``<racm3:break>`` or ``</s>`` stay text; an image as
``boi + code ids + eoi``; the end-of-turn id).

Decoding follows Chameleon's inference (DESIGN.md):

- text: only text tokens and end-of-sequence (begin-of-image only in interleaved mode while images
  remain); greedy or temperature / top-k / top-p; repetition penalty; stop strings; a length limit.
  End-of-sequence and end-of-turn both end the text.
- image: begin-of-image is forced, then exactly ``vqgan.n_codes_per_image`` codes, each drawn from the
  image codes only (logits are computed for those rows of the output layer only), then end-of-image.
  Classifier-free guidance runs Chameleon's three streams (full prompt; the prompt reduced to its image
  tokens; ``<s><racm3:break>``) as one batch of ``3B`` rows sharing one key-value cache.
- interleaved: text until the model emits begin-of-image, a full image, back to text; up to
  ``max_images`` images and ``max_new_tokens`` text tokens.

Prompts are decoded ``batch_size`` at a time, grouped by length. Within a batch they are left-padded;
the attention mask hides the padding and position ids count only real tokens, so a row's greedy
output does not depend on the batch it runs in. Each phase (a text run, an image) prefills its own
cache from the row's whole context so far.

Example::

    gen = Generator.from_dir("runs/export")
    prompt = prompt_segments("What is shown?", [Path("scan.png")], end_of_turn=True)  # image, text, end of turn
    out = gen.generate([prompt], GenerationConfig(do_sample=False))
    out[0].text

``medmax.prompting.prompt_segments`` is the one prompt layout (images first unless ``<image>``
placeholders place them), shared with evaluation and the training data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

from .model import ModelBundle, load_model_dir
from .prompting import END_OF_TURN, _EndOfTurn, prompt_segments  # noqa: F401  (re-exported)
from .sampling import apply_repetition_penalty, instruct_guidance, sample, text_token_mask
from .vocab import encode_text
from .vqgan import to_uint8

logger = logging.getLogger(__name__)

MODES = ("text", "image", "interleaved")
_ENCODE_BATCH = 8  # prompt images per VQGAN encoder call


@dataclass(frozen=True)
class ImageCodes:
    """An image given as raw VQGAN codes (row-major, 0..n_embed-1)."""

    codes: tuple[int, ...]

    def __post_init__(self):
        codes = self.codes.tolist() if hasattr(self.codes, "tolist") else list(self.codes)
        object.__setattr__(self, "codes", tuple(int(c) for c in np.asarray(codes).reshape(-1)))


Segment = Union[str, Image.Image, Path, ImageCodes, _EndOfTurn]


@dataclass
class TextOutput:
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ImageOutput:
    image: Image.Image | None  # None when GenerationConfig.decode_images is False
    codes: list[int]


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


@dataclass
class GenerationConfig:
    """How to decode. Defaults are Chameleon's inference defaults."""

    mode: str = "text"  # "text", "image" or "interleaved"
    max_new_tokens: int = 256  # text tokens (image codes are not counted)
    do_sample: bool = True  # text: sample (True) or greedy (False)
    temperature: float = 1.0  # text
    top_p: float = 0.9  # text; in [0, 1]: 1 = off, 0 = the top token only (greedy)
    top_k: int = 0  # text; 0 = off
    repetition_penalty: float = 1.2  # text; 1.0 = off
    stop_strings: tuple[str, ...] = ()  # text ends at (and is cut before) the first one it contains
    max_images: int = 1  # interleaved: images the model may draw
    image_temperature: float = 0.7  # 0 = greedy codes
    image_top_p: float = 0.9  # in [0, 1], as top_p
    image_top_k: int = 0
    guidance: bool = True  # image: three-stream classifier-free guidance
    guidance_scale_text: float = 3.0
    guidance_scale_image: float = 1.2
    seed: int | None = None  # None: a fresh random seed
    decode_images: bool = True  # False: return codes only (no VQGAN decoder work)
    batch_size: int = 16  # prompts decoded together (sorted by length to limit padding)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"GenerationConfig.mode: unknown mode {self.mode!r}; choose one of {MODES}")
        if self.max_new_tokens < 1 and self.mode != "image":
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "image_temperature", "top_p", "image_top_p"):
            if getattr(self, name) < 0:
                raise ValueError(f"GenerationConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("top_p", "image_top_p"):
            if getattr(self, name) > 1:
                raise ValueError(f"GenerationConfig.{name} must lie in [0, 1] (0 = greedy, 1 = off), got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.batch_size < 1:
            raise ValueError(f"GenerationConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_images < 0:
            raise ValueError(f"GenerationConfig.max_images must be >= 0, got {self.max_images}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)


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


class Generator:
    """Generates text, images or both from a loaded model folder (see the module docstring)."""

    def __init__(self, bundle: ModelBundle):
        self.model = bundle.model.eval()
        self.tokenizer = bundle.tokenizer
        self.vocab = bundle.vocab
        self.vqgan = bundle.vqgan
        self.device = next(self.model.parameters()).device
        self.context_length = int(self.model.config.max_position_embeddings)
        n_codes = self.vocab.n_codes if self.vqgan is None else min(self.vocab.n_codes, self.vqgan.n_embed)
        self._code_ids = self.vocab.image_id_tensor(self.device)[:n_codes]  # (n,) ids the image sampler may draw

    @classmethod
    def from_dir(cls, path: str | Path, device=None, dtype: torch.dtype | None = None,
                 skip_memory_check: bool = False) -> "Generator":
        return cls(load_model_dir(path, dtype=dtype, device=device, skip_memory_check=skip_memory_check))

    @property
    def n_image_tokens(self) -> int:
        """Tokens one image takes in a sequence: boi + grid + eoi."""
        return self._require_vqgan("images").n_codes_per_image + 2

    # ------------------------------------------------------------------------------ prompts
    def _require_vqgan(self, what: str):
        if self.vqgan is None:
            raise ValueError(f"this model folder has no vqgan/; cannot handle {what}")
        return self.vqgan

    def _check_segment(self, seg, where: str):
        """Validate one segment cheaply (no model work); images are loaded to PIL here."""
        from .images import load_image

        if isinstance(seg, (str, _EndOfTurn)):
            return seg
        if isinstance(seg, (Path, Image.Image)):
            self._require_vqgan(f"the image in {where}")
            return load_image(seg) if isinstance(seg, Path) else seg.convert("RGB")
        if isinstance(seg, ImageCodes):
            return self._check_codes(seg, where)
        raise TypeError(f"{where}: unsupported segment type {type(seg).__name__} (str, PIL image, Path, ImageCodes, END_OF_TURN)")

    def _check_codes(self, seg: ImageCodes, where: str) -> ImageCodes:
        vqgan = self._require_vqgan(f"the image codes in {where}")
        if len(seg.codes) != vqgan.n_codes_per_image:
            raise ValueError(f"{where}: {len(seg.codes)} image codes, expected {vqgan.n_codes_per_image} for a "
                             f"{vqgan.grid_shape[0]}x{vqgan.grid_shape[1]} grid")
        limit = min(vqgan.n_embed, self.vocab.n_codes)
        if seg.codes and (min(seg.codes) < 0 or max(seg.codes) >= limit):
            raise ValueError(f"{where}: image codes must lie in 0..{limit - 1}, got {min(seg.codes)}..{max(seg.codes)}")
        return seg

    def _segment_length(self, seg) -> int:
        if isinstance(seg, str):
            return len(encode_text(self.tokenizer, seg))
        if isinstance(seg, _EndOfTurn):
            return 1
        return self.n_image_tokens

    def _check_prompts(self, prompts, config: GenerationConfig) -> tuple[list[list], list[int]]:
        """Load and validate every prompt before any model work; raise naming the prompt and segment.

        -> the prompts with images loaded, and each prompt's length in tokens.
        """
        if isinstance(prompts, (str, Image.Image, Path, ImageCodes, _EndOfTurn)):
            raise TypeError("prompts must be a list of prompts, each a list of segments")
        checked, lengths = [], []
        needed = self.n_image_tokens if config.mode == "image" else 1
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, (str, Image.Image, Path, ImageCodes, _EndOfTurn)):
                prompt = [prompt]
            segs = [self._check_segment(s, f"prompt {i} segment {j}") for j, s in enumerate(prompt)]
            length = 1 + sum(self._segment_length(s) for s in segs)
            if length + needed > self.context_length:
                raise ValueError(f"prompt {i}: {length} tokens, and {config.mode} generation needs {needed} more, "
                                 f"longer than the model's context of {self.context_length}")
            checked.append(segs)
            lengths.append(length)
        return checked, lengths

    @torch.no_grad()
    def _encode_images(self, images: list[Image.Image]) -> list[list[int]]:
        from .images import preprocess

        if not images:
            return []
        vqgan = self._require_vqgan("images")
        param = next(vqgan.parameters())
        codes = []
        for start in range(0, len(images), _ENCODE_BATCH):
            pixels = torch.stack([preprocess(im, vqgan.resolution) for im in images[start : start + _ENCODE_BATCH]])
            codes += vqgan.encode_codes(pixels.to(param.device, param.dtype)).cpu().tolist()  # (N, h*w)
        return codes

    def encode_prompts(self, prompts, config: GenerationConfig | None = None) -> list[list[int]]:
        """Token ids of each prompt (validated; images tokenized with the VQGAN)."""
        return self._encode_checked(self._check_prompts(prompts, config or GenerationConfig())[0])

    def _encode_checked(self, checked: list[list]) -> list[list[int]]:
        pil = [s for segs in checked for s in segs if isinstance(s, Image.Image)]
        pil_codes = iter(self._encode_images(pil))
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

    # ------------------------------------------------------------------------------ batching helpers
    def _left_pad(self, seqs: list[list[int]]):
        """-> ids (B, T) long, mask (B, T) long, positions (B, T) long; padding on the left."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """One transformer pass; -> last position's hidden state (B, C)."""
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1, :]

    def _output_rows(self, ids: torch.Tensor):
        """The output layer's rows for ``ids`` (n,): weight (n, C), bias (n,) or None.

        Decoding only ever needs the logits of the ids it may emit, so text skips the image-code rows
        and images compute nothing else.
        """
        head = self.model.lm_head
        return head.weight[ids], None if head.bias is None else head.bias[ids]

    def _logits(self, hidden: torch.Tensor, rows, ids: torch.Tensor) -> torch.Tensor:
        """(B, C) hidden states -> (B, n) float logits of ``ids``, given their ``_output_rows``."""
        return F.linear(hidden, *rows).float()

    @staticmethod
    def _step_inputs(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Extend mask / positions by one real token; -> ids (B, 1), mask (B, T+1), positions (B, 1)."""
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return tokens[:, None], mask, positions[:, -1:] + 1

    # ------------------------------------------------------------------------------ text phase
    def _run_text(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator) -> list[list[int]]:
        """Decode text for every row until it ends; sets each row's finish_reason; -> new ids per row."""
        v = self.vocab
        ids, mask, positions = self._left_pad([r.context for r in rows])
        cache = DynamicCache(config=self.model.config)
        hidden = self._forward(ids, mask, positions, cache)  # (B, C)
        cols = torch.nonzero(text_token_mask(v, allow_boi=True, device=self.device)).squeeze(1)  # (n,) ids
        head_rows = self._output_rows(cols)
        seen = torch.zeros(len(rows), v.size, dtype=torch.bool, device=self.device)
        seen.scatter_(1, ids, mask.bool())
        lengths = torch.tensor([len(r.context) for r in rows], device=self.device)
        img_room = self.n_image_tokens if config.mode == "interleaved" else 0
        images_left = torch.tensor([r.images_left > 0 for r in rows], device=self.device)
        new = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max(r.text_left for r in rows)):
            boi_ok = images_left & (lengths + img_room <= self.context_length)  # (B,) room for boi, grid, eoi
            tokens = self._pick_text_tokens(hidden, cols, head_rows, seen, boi_ok, config, _row_rngs(rows, rng))
            seen[torch.arange(len(rows)), tokens] = True
            lengths += 1
            for r, tok in enumerate(tokens.tolist()):
                if not done[r]:
                    new[r].append(tok)
                    if rows[r].on_step:
                        rows[r].on_step(rows[r].index, tok)
                    done[r] = self._text_finished(rows[r], new[r], tok, len(rows[r].context) + len(new[r]), config)
            if all(done):
                break
            ids, mask, positions = self._step_inputs(tokens, mask, positions)
            hidden = self._forward(ids, mask, positions, cache)
        return new

    def _pick_text_tokens(self, hidden, cols, head_rows, seen, boi_ok, config: GenerationConfig, rng) -> torch.Tensor:
        """One text step: (B, C) hidden -> (B,) token ids among ``cols`` (boi only where ``boi_ok``)."""
        logits = self._logits(hidden, head_rows, cols)  # (B, n)
        if config.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen[:, cols], config.repetition_penalty)
        logits[:, cols == self.vocab.boi_id] = logits[:, cols == self.vocab.boi_id].masked_fill(
            ~boi_ok[:, None], float("-inf"))
        picked = sample(logits, config.do_sample, config.temperature, config.top_p, config.top_k, rng)  # (B,)
        return cols[picked]

    def _text_finished(self, row: _Row, new: list[int], tok: int, length: int, config: GenerationConfig) -> bool:
        v = self.vocab
        if tok in (v.eos_id, v.eot_id):
            row.finish_reason = "eos"
        elif tok == v.boi_id:
            row.finish_reason = "image"
        elif config.stop_strings and any(s in self._decode(new) for s in config.stop_strings):
            row.finish_reason = "stop"
        elif len(new) >= row.text_left or length >= self.context_length:
            row.finish_reason = "length"
        else:
            return False
        return True

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _text_segment(self, new: list[int], config: GenerationConfig) -> TextOutput:
        v = self.vocab
        body = [t for t in new if t not in (v.eos_id, v.eot_id, v.boi_id)]
        text = self._decode(body)
        cuts = [text.find(s) for s in config.stop_strings if s in text]
        return TextOutput(text=text[: min(cuts)] if cuts else text, token_ids=body)

    # ------------------------------------------------------------------------------ image phase
    def _guidance_streams(self, context: list[int]) -> list[list[int]]:
        """The three streams for one row: full prompt, prompt reduced to its image tokens, unconditional."""
        v = self.vocab
        image_only, inside = [v.bos_id], False
        for tok in context:
            if tok == v.boi_id:
                inside = True
            if inside:
                image_only.append(tok)
            if tok == v.eoi_id:
                inside = False
        return [context + [v.boi_id], image_only + [v.boi_id], [v.bos_id, v.boi_id]]

    def _stream_rows(self, contexts: list[list[int]], guidance: bool):
        """The rows to run for a batch of contexts, without duplicates.

        -> seqs (R token lists), owner (R,) the prompt each row belongs to, index (S*B,) the row that
        computes each (stream, prompt) pair, stream-major. A prompt without images has an image-only
        stream identical to its unconditional one (``<s><racm3:break>`` and the same codes after it),
        so that stream is computed once: text-to-image guidance runs 2B rows, not 3B.
        """
        streams = [self._guidance_streams(c) for c in contexts]  # B x 3
        B = len(streams)
        seqs, owner, index = [st[0] for st in streams], list(range(B)), list(range(B))
        if not guidance:
            return seqs, torch.tensor(owner, device=self.device), torch.tensor(index, device=self.device)
        with_images = [b for b in range(B) if streams[b][1] != streams[b][2]]
        image_row = {b: B + k for k, b in enumerate(with_images)}
        seqs += [streams[b][1] for b in with_images]
        first_uncond = len(seqs)
        seqs += [st[2] for st in streams]
        owner += with_images + list(range(B))
        index += [image_row.get(b, first_uncond + b) for b in range(B)] + [first_uncond + b for b in range(B)]
        return seqs, torch.tensor(owner, device=self.device), torch.tensor(index, device=self.device)

    @torch.no_grad()
    def _run_image(self, contexts: list[list[int]], config: GenerationConfig, rng: torch.Generator) -> torch.Tensor:
        """Draw one full grid of codes per context (boi is forced after it); -> (B, n_codes_per_image) codes."""
        n_steps = self._require_vqgan("image generation").n_codes_per_image
        seqs, owner, index = self._stream_rows(contexts, config.guidance)  # R rows; (R,), (3B,)
        ids, mask, positions = self._left_pad(seqs)
        cache = DynamicCache(config=self.model.config)
        rows = self._output_rows(self._code_ids)
        hidden = self._forward(ids, mask, positions, cache)  # (R, C)
        codes = torch.empty(len(contexts), n_steps, dtype=torch.long, device=self.device)
        greedy = config.image_temperature == 0.0
        for step in range(n_steps):
            logits = self._logits(hidden, rows, self._code_ids)[index]  # (3B, n), stream-major
            if config.guidance:
                full, image_only, uncond = logits.chunk(3)
                logits = instruct_guidance(full, image_only, uncond, config.guidance_scale_text,
                                           config.guidance_scale_image)  # (B, n)
            codes[:, step] = sample(logits, not greedy, config.image_temperature, config.image_top_p,
                                    config.image_top_k, rng)
            if step + 1 < n_steps:
                tokens = self._code_ids[codes[owner, step]]  # (R,)
                ids, mask, positions = self._step_inputs(tokens, mask, positions)
                hidden = self._forward(ids, mask, positions, cache)
        return codes

    @torch.no_grad()
    def _decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        pixels = self.vqgan.decode_codes(codes.to(self.vqgan.quantize.embedding.weight.device))  # (B, 3, R, R)
        return [Image.fromarray(a.numpy()) for a in to_uint8(pixels)]

    def _add_images(self, rows: list[_Row], config: GenerationConfig, rng: torch.Generator):
        """Generate one image for each row (whose context must not yet hold the boi) and append it."""
        codes = self._run_image([r.context for r in rows], config, _row_rngs(rows, rng))  # (B, n)
        images = self._decode_images(codes) if config.decode_images else [None] * len(rows)
        v = self.vocab
        for row, c, im in zip(rows, codes.cpu(), images):
            ids = [v.boi_id, *self._code_ids[c.to(self.device)].tolist(), v.eoi_id]
            row.context += ids
            row.generated += ids
            row.segments.append(ImageOutput(image=im, codes=c.tolist()))
            row.images_left -= 1
            if row.on_step:
                row.on_step(row.index, row.segments[-1])

    # ------------------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[Segment]], config: GenerationConfig | None = None, *,
                 seeds: Sequence[int] | None = None, on_step: Callable | None = None) -> list[GenerationOutput]:
        """Generate for a batch of prompts; -> one GenerationOutput per prompt, in order.

        ``seeds``: one seed per prompt (instead of ``config.seed``); each prompt then samples from its own
        generator, so its output does not depend on the other prompts of the batch.
        ``on_step(index, item)`` is called as the output grows: with each text token id the prompt
        ``index`` emits (end tokens included, before stop strings are cut) and with each drawn
        :class:`ImageOutput`; it lets a caller stream the answer.
        """
        config = config or GenerationConfig()
        if config.mode in ("image", "interleaved") and config.decode_images:
            self._require_vqgan(f"{config.mode} generation")
        checked, lengths = self._check_prompts(prompts, config)
        if seeds is not None and len(seeds) != len(checked):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(checked)} prompts")
        rng = torch.Generator(device=self.device)
        rng.manual_seed(config.seed) if config.seed is not None else rng.seed()
        order = sorted(range(len(checked)), key=lambda i: lengths[i])
        outputs: list[GenerationOutput | None] = [None] * len(checked)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            rows = [self._new_row(ids, i, config, seeds, on_step)
                    for i, ids in zip(chunk, self._encode_checked([checked[i] for i in chunk]))]
            for i, out in zip(chunk, self._generate_batch(rows, config, rng)):
                outputs[i] = out
            logger.debug("generated %d / %d prompts", min(start + config.batch_size, len(order)), len(order))
        return outputs

    def _new_row(self, ids: list[int], index: int, config: GenerationConfig, seeds, on_step) -> _Row:
        rng = None
        if seeds is not None:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(int(seeds[index]))
        return _Row(context=ids, text_left=config.max_new_tokens, images_left=config.max_images, index=index,
                    rng=rng, on_step=on_step)

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
            new = self._run_text(active, config, rng)
            for row, ids in zip(active, new):
                seg = self._text_segment(ids, config)
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

    def _continues(self, row: _Row) -> bool:
        """After an image: continue with text if budget and context remain."""
        if row.text_left <= 0 or len(row.context) >= self.context_length:
            row.finish_reason = "length"
            return False
        row.finish_reason = ""
        return True


def _row_rngs(rows: list[_Row], rng: torch.Generator):
    """The rows' own generators when they have them (``generate(seeds=...)``), else the shared one."""
    return [r.rng for r in rows] if rows and rows[0].rng is not None else rng
