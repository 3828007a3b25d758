"""Direct preference optimisation (DPO): sequence log-probabilities and the loss, on token ids.

A batch holds ``2B`` rows: the ``B`` chosen continuations, then the ``B`` rejected ones, each after its
prompt (TRL's ``concatenated_forward`` order). ``labels`` hold the continuation's ids and -100 on the
prompt and on padding, so a sequence's log-probability is the sum over its continuation tokens only:
the prompt is never scored, and image codes inside a continuation are scored like text (no
image-code mask: the logits come from :class:`medmax.model.MedMaxChameleon`'s unmasked head).

The loss follows TRL's ``DPOTrainer`` (1.16) term by term, with the names of its ``loss_type``:

- ``sigmoid`` (DPO): ``-log sigmoid(beta * margin)``, ``margin = (pi_c - ref_c) - (pi_r - ref_r)``;
  ``label_smoothing`` gives conservative DPO (cDPO);
- ``hinge`` (SLiC): ``relu(1 - beta * margin)``;
- ``ipo``: ``(margin_per_token - 1 / (2 beta))**2``, log-ratios divided by the continuation length;
- ``sigmoid_norm``: sigmoid on the per-token log-ratios.

Two additions: per-pair ``weights`` (MMedPO multiplies each pair's loss by its clinical relevance)
and ``rpo_alpha``, RPO's negative log-likelihood of the chosen continuation (mean per chosen token,
TRL's ``sft`` loss term), added with that factor so chosen answers do not drift. With weights of 1
and ``rpo_alpha`` 0 the loss is TRL's number for number (``tests/finetune/test_dpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .vocab import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm")


class DPOSettingError(UserError):
    """A DPO loss setting that cannot be used; the message names it."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of each label under ``logits`` and the mask of scored tokens.

    ``logits`` (N, T, V) at position t predict label t+1; returns ``(N, T-1)`` log-probs (0 where no
    label) and the ``(N, T-1)`` bool mask of labelled positions.
    """
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return picked * mask, mask


def labelled_token_logps(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`token_logps`, running the output head only on the labelled positions (hidden (N, T, C))."""
    targets = labels[:, 1:].to(hidden.device)  # (N, T-1)
    mask = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][mask]).float()  # (M, V), M = labelled positions
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (M,)
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=hidden.device)
    out[mask] = picked
    return out, mask


@dataclass
class DPOOutput:
    """The loss and what TRL logs about it. Tensors are (B,) unless said otherwise."""

    loss: torch.Tensor  # ()
    losses: torch.Tensor  # per pair, weights applied, before the mean
    chosen_rewards: torch.Tensor  # beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """TRL's metric names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
        chosen, rejected = self.chosen_rewards, self.rejected_rewards
        return {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
        }


@dataclass
class DPOLoss:
    """The DPO objective: ``loss_type`` (one of :data:`LOSS_TYPES`), ``beta``, cDPO smoothing, RPO's NLL factor."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise DPOSettingError(f"dpo_loss_type={self.loss_type!r}: choose one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise DPOSettingError(f"dpo_beta={self.beta}: must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise DPOSettingError(f"dpo_label_smoothing={self.label_smoothing}: must lie in [0, 0.5)")
        if self.rpo_alpha < 0:
            raise DPOSettingError(f"rpo_alpha={self.rpo_alpha}: must not be negative")

    def __call__(self, policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                 weights: torch.Tensor | None = None) -> DPOOutput:
        """``policy``/``reference``: (2B, T-1) per-token log-probs, chosen rows first; ``mask`` (2B, T-1)."""
        pi_c, pi_r = policy.sum(-1).chunk(2)  # (B,) each
        ref_c, ref_r = reference.sum(-1).chunk(2)
        chosen, rejected = pi_c - ref_c, pi_r - ref_r  # log-ratios
        losses = self._pair_losses(chosen, rejected, mask)
        if weights is not None:
            losses = losses * weights.to(losses.dtype)
        loss = losses.mean()
        if self.rpo_alpha:
            chosen_mask = mask.chunk(2)[0]
            loss = loss + self.rpo_alpha * -(policy.chunk(2)[0][chosen_mask]).mean()
        return DPOOutput(loss, losses, self.beta * chosen.detach(), self.beta * rejected.detach())

    def _pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.loss_type in ("ipo", "sigmoid_norm"):
            n_c, n_r = mask.sum(-1).chunk(2)
            chosen, rejected = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)
        delta = chosen - rejected
        if self.loss_type == "hinge":
            return torch.relu(1 - self.beta * delta)
        if self.loss_type == "ipo":
            return (delta - 1 / (2 * self.beta)) ** 2
        smooth = self.label_smoothing if self.loss_type == "sigmoid" else 0.0
        return -F.logsigmoid(self.beta * delta) * (1 - smooth) - F.logsigmoid(-self.beta * delta) * smooth


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None,
                   position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled tokens, (N, T-1), and their mask, through ``model``'s own forward.

    ``model`` is a :class:`medmax.model.MedMaxChameleon`, possibly wrapped (peft, DDP, DeepSpeed): the call
    goes through the wrappers (``token_logps=True``), so their hooks run, and the head runs only on the
    labelled positions.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                token_logps=True, use_cache=False)
    return out.logps, out.mask
