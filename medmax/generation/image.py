"""The guided image loop and decoding, after Chameleon's inference.

Begin-of-image is forced, then exactly ``vqgan.n_codes_per_image`` codes, each drawn from the image
codes only (logits are computed for those rows of the output layer only), then end-of-image.
Classifier-free guidance runs Chameleon's three streams (full prompt; the prompt reduced to its image
tokens; ``<s><racm3:break>``) as one batch sharing one key-value cache; a stream two rows share is
computed once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..vqgan import to_uint8
from .forward import ModelRunner
from .sampling import instruct_guidance, sample

if TYPE_CHECKING:
    from .config import GenerationConfig


def guidance_streams(vocab, context: list[int]) -> list[list[int]]:
    """The three streams for one row: full prompt, prompt reduced to its image tokens, unconditional."""
    v = vocab
    image_only, inside = [v.bos_id], False
    for tok in context:
        if tok == v.boi_id:
            inside = True
        if inside:
            image_only.append(tok)
        if tok == v.eoi_id:
            inside = False
    return [context + [v.boi_id], image_only + [v.boi_id], [v.bos_id, v.boi_id]]


def stream_rows(vocab, contexts: list[list[int]], guidance: bool, device=None):
    """The rows to run for a batch of contexts, without duplicates.

    -> seqs (R token lists), owner (R,) the prompt each row belongs to, index (S*B,) the row that
    computes each (stream, prompt) pair, stream-major. A prompt without images has an image-only
    stream identical to its unconditional one (``<s><racm3:break>`` and the same codes after it),
    so that stream is computed once: text-to-image guidance runs 2B rows, not 3B.
    """
    streams = [guidance_streams(vocab, c) for c in contexts]  # B x 3
    B = len(streams)
    seqs, owner, index = [st[0] for st in streams], list(range(B)), list(range(B))
    if not guidance:
        return seqs, torch.tensor(owner, device=device), torch.tensor(index, device=device)
    with_images = [b for b in range(B) if streams[b][1] != streams[b][2]]
    image_row = {b: B + k for k, b in enumerate(with_images)}
    seqs += [streams[b][1] for b in with_images]
    first_uncond = len(seqs)
    seqs += [st[2] for st in streams]
    owner += with_images + list(range(B))
    index += [image_row.get(b, first_uncond + b) for b in range(B)] + [first_uncond + b for b in range(B)]
    return seqs, torch.tensor(owner, device=device), torch.tensor(index, device=device)


class ImageDecoder:
    """Draws images as VQGAN codes (``draw``) and turns codes into pictures (``decode``)."""

    def __init__(self, runner: ModelRunner, vocab, vqgan):
        self.runner = runner
        self.vocab = vocab
        self.vqgan = vqgan
        n_codes = vocab.n_codes if vqgan is None else min(vocab.n_codes, vqgan.n_embed)
        self.code_ids = vocab.image_id_tensor(runner.device)[:n_codes]  # (n,) ids the image sampler may draw

    @torch.no_grad()
    def draw(self, contexts: list[list[int]], config: GenerationConfig, rng) -> torch.Tensor:
        """Draw one full grid of codes per context (boi is forced after it); -> (B, n_codes_per_image) codes."""
        run = self.runner
        n_steps = self.vqgan.n_codes_per_image
        seqs, owner, index = stream_rows(self.vocab, contexts, config.guidance, run.device)  # R rows; (R,), (3B,)
        ids, mask, positions = run.left_pad(seqs)
        cache = run.new_cache()
        rows = run.output_rows(self.code_ids)
        hidden = run.forward(ids, mask, positions, cache)  # (R, C)
        codes = torch.empty(len(contexts), n_steps, dtype=torch.long, device=run.device)
        greedy = config.image_temperature == 0.0
        for step in range(n_steps):
            logits = run.logits(hidden, rows, self.code_ids)[index]  # (3B, n), stream-major
            if config.guidance:
                full, image_only, uncond = logits.chunk(3)
                logits = instruct_guidance(full, image_only, uncond, config.guidance_scale_text,
                                           config.guidance_scale_image)  # (B, n)
            codes[:, step] = sample(logits, not greedy, config.image_temperature, config.image_top_p,
                                    config.image_top_k, rng)
            if step + 1 < n_steps:
                tokens = self.code_ids[codes[owner, step]]  # (R,)
                ids, mask, positions = run.step_inputs(tokens, mask, positions)
                hidden = run.forward(ids, mask, positions, cache)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        pixels = self.vqgan.decode_codes(codes.to(self.vqgan.quantize.embedding.weight.device))  # (B, 3, R, R)
        return [Image.fromarray(a.numpy()) for a in to_uint8(pixels)]

    def token_ids(self, codes: torch.Tensor) -> list[int]:
        """One image's sequence: boi, the code ids, eoi."""
        v = self.vocab
        return [v.boi_id, *self.code_ids[codes.to(self.runner.device)].tolist(), v.eoi_id]
