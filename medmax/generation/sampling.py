"""Logits processing for generation: token masks, repetition penalty, guidance and sampling.

Everything works on one decoding step's logits, ``(B, V)``, so the same functions serve text and
image decoding. The order follows Chameleon's inference: repetition penalty, allowed-token mask,
(classifier-free guidance for images), temperature, top-k, top-p, then a draw from a seeded
``torch.Generator`` (or argmax when greedy).
"""

from __future__ import annotations

import torch

from ..vocab import Vocabulary


def text_token_mask(vocab: Vocabulary, allow_boi: bool, device=None) -> torch.Tensor:
    """(V,) bool: the ids text decoding may emit.

    Everything except image codes, end-of-image, begin-of-sequence and padding; begin-of-image only
    when ``allow_boi`` (interleaved mode, while images remain).
    """
    mask = torch.ones(vocab.size, dtype=torch.bool)
    mask[vocab.image_id_tensor()] = False
    for idx in (vocab.eoi_id, vocab.bos_id, vocab.pad_id):
        mask[idx] = False
    mask[vocab.boi_id] = allow_boi
    return mask.to(device)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on ids already in the sequence: positive logits / p, negative * p.

    logits (B, V) float; seen (B, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def instruct_guidance(full: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor,
                      text_scale: float, image_scale: float) -> torch.Tensor:
    """Chameleon's three-stream guidance: uncond + s_i (image - uncond) + s_t (full - image).

    Written as ``full + (s_t - 1)(full - image) + (s_i - 1)(image - uncond)`` (the same value), so
    that scales of 1.0 return the conditional logits bit for bit. All inputs (B, V).
    """
    return full + (text_scale - 1.0) * (full - image_only) + (image_scale - 1.0) * (image_only - uncond)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p``; the top token always stays.

    So ``p = 0`` keeps the top token alone: sampling becomes greedy (the limit of nucleus sampling as p -> 0).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p  # mass before this token already >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def processed_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """(N, V) logits -> (N, V) the distribution sampling draws from: temperature, top-k, top-p, softmax."""
    return _top_p(_top_k(logits.float() / temperature, top_k), top_p).softmax(dim=-1)


def multinomial(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """(B, V) or (B, m, V) probabilities -> (B,) or (B, m) draws; one generator, or one per row."""
    flat = probs.reshape(probs.shape[0], -1, probs.shape[-1])  # (B, m, V)
    if isinstance(generator, (list, tuple)):
        out = torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(flat, generator)])
    else:
        out = torch.multinomial(flat.reshape(-1, flat.shape[-1]), 1, generator=generator).view(flat.shape[:2])
    return out.view(probs.shape[:-1])


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) long token indices (into the V columns given).

    ``generator``: one for the batch, or a list with one per row (each row then draws only from its own).
    """
    logits = logits.float()
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    return multinomial(processed_probs(logits, temperature, top_p, top_k), generator)
