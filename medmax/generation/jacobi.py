"""Speculative Jacobi decoding (SJD) of image codes: several codes per model forward, drawn as plain sampling draws them.

Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding" (arXiv 2410.01699). Each forward takes a window of ``W`` tokens per row: the last
committed code (not yet in the cache) and ``W - 1`` draft codes. Its ``W`` output distributions
``P_0 .. P_{W-1}`` verify the drafts left to right: draft ``x_k`` (drawn from ``q_k``) is accepted with
probability ``min(1, P_{k-1}(x_k) / q_k(x_k))``; at the first rejection the code is drawn from the
normalised residual ``max(0, P_{k-1} - q_k)``, and when every draft is accepted a bonus code is drawn from
``P_{W-1}``. So every forward commits ``accepted + 1`` codes, and each code is distributed exactly as
autoregressive sampling would draw it (the speculative-sampling argument, Leviathan et al. 2023 / Chen et
al. 2023, holds for any draft drawn independently of the verification's own random numbers).

The drafts of the next window are the Jacobi update: the codes after the committed one are drawn from
this forward's distributions at their positions (``q`` = that distribution), and the positions the
forward did not reach are filled with uniformly random codes whose ``q`` is taken as one-hot on the code
drawn (acceptance probability ``P(x)``, residual ``P`` without ``x``), as the reference implementation
initialises its drafts (github.com/tyshiwo1/Accelerating-T2I-AR-with-SJD, ``test_lumina_mgpt.py``:
``max_num_new_tokens = 16`` tokens per window, ``multi_token_init_scheme = 'random'``, image top-k 2000 at
temperature 1 with guidance 3.0; its ``jacobi_loop_interval_l = 3`` starts the window after the third
image token, which this module does not need: a window starts after the first code). The default
window here is 8 (``GenerationConfig.sjd_window``): on a CPU a forward's cost grows with its tokens,
and 8 measured faster than 16 (BENCHMARKS.md); on a GPU the reference's 16 is the one to try.
Greedy decoding (temperature 0) accepts a draft when it equals the argmax, and so gives plain greedy
decoding's codes.

Under classifier-free guidance every stream of a prompt runs the same window, and acceptance uses the
guided distribution. Rows of a batch accept different counts; :class:`~medmax.generation.cache.RowCache`
keeps a write position per row. The acceptance rule is a parameter (``accept``), so a test can swap in a
wrong one and see the distribution test fail.
"""

from __future__ import annotations

from typing import Callable

import torch

from .sampling import multinomial

def speculative_accept(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SJD's rule: accept a draft with probability min(1, p / q); all (B, K), u uniform in [0, 1)."""
    return u * q < p


def uniform(n_rows: int, width: int, rng, device) -> torch.Tensor:
    """(B, width) uniform floats in [0, 1); ``rng`` one generator or one per row (row r draws from its own)."""
    if isinstance(rng, (list, tuple)):
        return torch.stack([torch.rand(width, generator=g, device=device) for g in rng])
    return torch.rand(n_rows, width, generator=rng, device=device)


class Drafts:
    """One batch's draft codes (B, W-1) and the distributions they were drawn from (B, W-1, n)."""

    def __init__(self, n_rows: int, window: int, n_codes: int, rng, device):
        self.window, self.n_codes, self.rng = window, n_codes, rng
        self.codes = torch.zeros(n_rows, window - 1, dtype=torch.long, device=device)
        self.q = torch.zeros(n_rows, window - 1, n_codes, device=device)
        self.refill(torch.zeros(n_rows, 0, dtype=torch.long, device=device), self.q[:, :0])

    def refill(self, codes: torch.Tensor, q: torch.Tensor) -> None:
        """Next window's drafts: ``codes`` (B, W-1) where ``q`` rows are set, random codes (one-hot ``q``) after.

        ``codes`` / ``q`` may be narrower than W-1 only as a whole (the first window: width 0).
        """
        B, K = self.codes.shape
        u = uniform(B, K, self.rng, self.codes.device)  # (B, K): the random fill, one draw per slot
        random = (u * self.n_codes).long().clamp(max=self.n_codes - 1)
        known = q.sum(-1) > 0 if q.shape[1] else torch.zeros_like(random, dtype=torch.bool)  # (B, K)
        self.codes = torch.where(known, codes, random) if q.shape[1] else random
        one_hot = torch.nn.functional.one_hot(random, self.n_codes).to(self.q.dtype)
        self.q = torch.where(known[..., None], q, one_hot) if q.shape[1] else one_hot


def verify(probs: torch.Tensor, drafts: Drafts, rng, accept: Callable = speculative_accept):
    """Sampling: probs (B, W, n) from one forward -> (accepted (B,), next code (B,), next drafts set in place).

    ``accepted[r]`` drafts are kept; the code after them comes from the residual or, if all were kept, from
    ``P_{W-1}``.
    """
    B, W, n = probs.shape
    rows = torch.arange(B, device=probs.device)
    if W > 1:
        p_x = probs[:, :-1].gather(-1, drafts.codes[..., None]).squeeze(-1)  # (B, W-1)
        q_x = drafts.q.gather(-1, drafts.codes[..., None]).squeeze(-1)
        ok = accept(p_x, q_x, uniform(B, W - 1, rng, probs.device))
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,)
    else:
        accepted = torch.zeros(B, dtype=torch.long, device=probs.device)
    target = probs[rows, accepted]  # (B, n)
    rejected = accepted < W - 1
    if W > 1:
        q_at = drafts.q[rows, accepted.clamp(max=W - 2)]
        residual = (target - q_at).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        use = rejected[:, None] & (mass > 0)
        target = torch.where(use, residual / mass.clamp(min=1e-30), target)
    code = multinomial(target, rng)
    if W > 1:
        _jacobi_update(probs, drafts, accepted, rng)
    return accepted, code


def verify_greedy(logits: torch.Tensor, drafts: Drafts):
    """Greedy: logits (B, W, n) -> (accepted (B,), next code (B,)); next drafts are the argmax codes."""
    B, W, _ = logits.shape
    best = logits.argmax(dim=-1)  # (B, W)
    accepted = (drafts.codes == best[:, :-1]).long().cumprod(dim=1).sum(dim=1) if W > 1 else best.new_zeros(B)
    code = best[torch.arange(B, device=best.device), accepted]
    if W > 1:
        _shift_in(drafts, best[:, 1:, None], accepted, None)
    return accepted, code


def _jacobi_update(probs: torch.Tensor, drafts: Drafts, accepted: torch.Tensor, rng) -> None:
    """Draws from P_1 .. P_{W-1} become the next drafts (shifted past the committed code)."""
    fresh = multinomial(probs[:, 1:], rng)  # (B, W-1): a draw at each position after the first
    _shift_in(drafts, fresh[..., None], accepted, probs[:, 1:])


def _shift_in(drafts: Drafts, codes: torch.Tensor, accepted: torch.Tensor, q: torch.Tensor | None) -> None:
    """Next draft j of row r comes from window slot ``accepted[r] + j`` of ``codes`` / ``q`` (B, W-1, .); later: random."""
    B, K = drafts.codes.shape
    slot = accepted[:, None] + torch.arange(K, device=accepted.device)  # (B, K)
    inside = slot < K
    take = slot.clamp(max=K - 1)
    new_codes = codes.squeeze(-1).gather(1, take)
    if q is None:  # greedy: q is not used; mark known slots with a one-hot on their code
        new_q = torch.nn.functional.one_hot(new_codes, drafts.n_codes).to(drafts.q.dtype)
    else:
        new_q = q.gather(1, take[..., None].expand(-1, -1, q.shape[-1]))
    drafts.refill(new_codes, new_q * inside[..., None])
