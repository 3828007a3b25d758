"""Group relative policy optimisation (GRPO): group-normalised advantages, the clipped loss, rewards that may fail.

For each prompt a group of ``G`` continuations is sampled; each is scored by reward functions, and its advantage is
its reward's distance from its group's mean in units of the group's standard deviation:
``A = (r - mean_group) / (std_group + eps)`` (TRL's ``scale_rewards="group"``, eps 1e-4, unbiased std).

The loss follows TRL's ``GRPOTrainer`` (1.16, ``loss_type="grpo"``, token-level importance sampling) term by term::

    ratio  = exp(logp - logp_old)                         per generated token
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1           (k3 estimator, DeepSeekMath)
    loss   = mean over sequences of (mean over its generated tokens of (pg + beta * kl))

Per-token log-probabilities cover the generated tokens only: the prompt is never scored, and image codes are
scored like text (no image-code mask: :class:`medmax.model.MedMaxChameleon`'s head is unmasked), through
:func:`medmax.dpo.sequence_logps` with ``labels`` -100 on the prompt and on padding.

A reward that raises or returns NaN (or a non-number) is a *failure* for that sample: its value is NaN, it is
counted per reward, and the sample's total is the weighted sum of the rewards that did not fail (TRL's
``nansum``). A sample for which every reward failed is unscorable: it joins neither its group's mean nor its
standard deviation, and its advantage is 0 (TRL does the same for rewards that return ``None``).
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

ADVANTAGE_EPS = 1e-4  # TRL's


class GRPOSettingError(UserError):
    """A GRPO setting that cannot be used; the message names it."""


# ------------------------------------------------------------------------------ advantages
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards, groups of ``group_size`` consecutive samples -> (N,) advantages and (N,) group std.

    NaN rewards (unscorable samples) are left out of their group's mean and std and get advantage 0. A group of
    one sample has std 0 and advantage 0: there is nothing to compare it with.
    """
    if rewards.numel() % group_size:
        raise GRPOSettingError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)  # (P, G)
    valid = ~torch.isnan(grouped)
    count = valid.sum(-1, keepdim=True)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(-1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(valid, grouped - mean, torch.zeros_like(grouped)) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
    adv = torch.where(valid, (grouped - mean) / (std + eps), torch.zeros_like(grouped))
    return adv.view(-1).to(rewards.dtype), std.expand_as(grouped).reshape(-1).to(rewards.dtype)


# ------------------------------------------------------------------------------ the loss
@dataclass
class GRPOOutput:
    """The loss and TRL's metrics about it (``kl`` and ``clip_ratio`` as means over generated tokens)."""

    loss: torch.Tensor  # ()
    policy_loss: torch.Tensor  # () the clipped policy-gradient term alone (mean over sequences of token means)
    kl: torch.Tensor  # () mean k3 over generated tokens, detached
    clip_ratio: torch.Tensor  # () share of generated tokens whose ratio was clipped (TRL's clip_ratio/region_mean)
    per_token_kl: torch.Tensor  # (N, T-1)


@dataclass
class GRPOLoss:
    """GRPO's objective: ``beta`` (KL to the reference; 0 = none), ``epsilon`` (clip), ``epsilon_high`` (DAPO's upper
    clip; None = ``epsilon``)."""

    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None

    def __post_init__(self):
        if self.beta < 0:
            raise GRPOSettingError(f"grpo_beta={self.beta}: must not be negative")
        if not self.epsilon > 0:
            raise GRPOSettingError(f"grpo_epsilon={self.epsilon}: must be positive")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise GRPOSettingError(f"grpo_epsilon_high={self.epsilon_high}: must be positive (or null)")

    def __call__(self, logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                 mask: torch.Tensor, advantages: torch.Tensor) -> GRPOOutput:
        """``logps``, ``old_logps``, ``ref_logps``: (N, T-1) per-token log-probs (0 off the mask); ``mask`` (N, T-1)
        marks generated tokens; ``advantages`` (N,)."""
        mask = mask.to(logps.dtype)
        adv = advantages.to(logps.dtype).unsqueeze(1)  # (N, 1)
        ratio = torch.exp(logps - old_logps)
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + high)
        pg = -torch.min(ratio * adv, clipped * adv)  # (N, T-1)
        per_token = pg
        kl = torch.zeros_like(logps)
        if self.beta != 0.0 and ref_logps is not None:
            kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
            per_token = pg + self.beta * kl
        n_tokens = mask.sum(-1).clamp(min=1.0)  # (N,)
        loss = ((per_token * mask).sum(-1) / n_tokens).mean()
        policy_loss = ((pg * mask).sum(-1) / n_tokens).mean()
        region = ((ratio < 1 - self.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        total = mask.sum().clamp(min=1.0)
        return GRPOOutput(loss, policy_loss.detach(), ((kl * mask).sum() / total).detach(),
                          ((region.to(mask.dtype) * mask).sum() / total).detach(), kl.detach())


# ------------------------------------------------------------------------------ rewards
@dataclass
class Samples:
    """What reward functions see: one entry per sampled continuation (``G`` consecutive ones per prompt).

    ``prompts`` the prompt text; ``texts`` the generated text; ``images`` each sample's decoded images (PIL; an empty
    list where none was drawn); ``codes`` each drawn image's VQGAN codes (a list of lists per sample); ``generator``
    the policy as a :class:`medmax.generation.Generator` (self-consistency asks it questions).
    """

    prompts: list[str]
    texts: list[str]
    images: list[Any]
    codes: list[list[list[int]]]
    generator: Any = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Reward:
    """A reward function, its name (for ``rewards/<name>/mean``), weight and settings (keyword arguments)."""

    name: str
    function: Callable
    weight: float = 1.0
    settings: dict = field(default_factory=dict)


def load_reward(spec: str) -> Callable:
    """``module:function`` -> the callable; a bad name raises :class:`GRPOSettingError` naming it."""
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise GRPOSettingError(f"rewards: {spec!r} is not module:function")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise GRPOSettingError(f"rewards: cannot load {spec!r} ({err})") from None
    if not callable(found):
        raise GRPOSettingError(f"rewards: {spec!r} is not callable")
    return found


def score(rewards: Sequence[Reward], samples: Samples) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """-> (N, K) rewards (NaN where one failed), (N,) weighted totals (NaN where all failed), failures per name."""
    n = len(samples)
    table = torch.full((n, len(rewards)), math.nan, dtype=torch.float64)
    failures = {}
    for k, reward in enumerate(rewards):
        values = _call(reward, samples)
        for i, v in enumerate(values):
            table[i, k] = v
        failures[reward.name] = sum(1 for v in values if math.isnan(v))
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    totals = torch.where(torch.isnan(table), torch.zeros_like(table), table * weights).sum(-1)
    totals[torch.isnan(table).all(-1)] = math.nan
    return table, totals, failures


def _call(reward: Reward, samples: Samples) -> list[float]:
    """One reward function over every sample; an exception or a wrong-sized answer fails every sample, a NaN or
    non-number fails that sample. Each failure is logged with its cause."""
    n = len(samples)
    try:
        values = list(reward.function(samples, **reward.settings))
    except Exception as err:  # a reward is user code: its failure is the samples', never the run's
        logger.warning("reward %s raised %s: %s (counted as a failure for %d samples)", reward.name,
                       type(err).__name__, err, n)
        return [math.nan] * n
    if len(values) != n:
        logger.warning("reward %s returned %d values for %d samples (counted as failures)", reward.name, len(values), n)
        return [math.nan] * n
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
        if math.isnan(out[-1]) or math.isinf(out[-1]):
            logger.warning("reward %s: sample %d (prompt %r) gave %r (counted as a failure)", reward.name, i,
                           samples.prompts[i][:60], v)
            out[-1] = math.nan
    return out


def reward_metrics(rewards: Sequence[Reward], table: torch.Tensor, totals: torch.Tensor, group_std: torch.Tensor,
                   failures: dict[str, int]) -> dict[str, float]:
    """TRL's GRPO metric names: ``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std``; plus
    ``rewards/<name>/failures`` (samples whose reward failed)."""
    def nanmean(x):
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else math.nan

    def nanstd(x):
        x = x[~torch.isnan(x)]
        return float(x.std()) if x.numel() > 1 else 0.0

    out = {"reward": nanmean(totals), "reward_std": float(group_std.mean()) if group_std.numel() else 0.0}
    for k, reward in enumerate(rewards):
        out[f"rewards/{reward.name}/mean"] = nanmean(table[:, k])
        out[f"rewards/{reward.name}/std"] = nanstd(table[:, k])
        out[f"rewards/{reward.name}/failures"] = float(failures.get(reward.name, 0))
    return out
