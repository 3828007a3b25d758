"""``mode: dpo``: preference optimisation on preference folders, in the same run as supervised training.

The trainer is transformers' Trainer with :class:`finetune.trainer.MedMaxTrainerMixin` (checkpoints, run
record, resume checks, export) and :class:`DPOTrainerMixin`, which computes the loss of
:mod:`medmax.dpo` from one forward of the policy over the 2B rows of a batch (chosen, then rejected)
and one of the reference, and logs TRL's metrics (``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``; ``eval_`` before
each in validation) to every ``report_to`` target.

The reference is, under LoRA (``dpo_weights: lora``, ``dpo_reference: auto``), the policy itself with
its adapters disabled: the same frozen base weights, so a 7B run holds one model. Otherwise it is a
frozen copy of the starting model, moved to the training device (under ZeRO-3 it is not sharded:
use LoRA there). Dropout is switched off in both, as TRL does, so the reference of a fresh LoRA run
equals the policy and the logged loss is reproducible from the weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict

import torch
from torch import nn

from medmax.dpo import DPOLoss, sequence_logps

from .trainer import MedMaxTrainerMixin

logger = logging.getLogger(__name__)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout's probability to 0 (TRL's ``disable_dropout``), LoRA's included."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, evaluation-mode copy of ``model`` before any mode is applied: the reference."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


class DPOTrainerMixin:
    """The DPO loss and metrics in a transformers Trainer (mixed in by :func:`dpo_trainer`)."""

    def __init__(self, *args, dpo_loss: DPOLoss, ref_model: nn.Module | None = None, use_weights: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo_loss, self.use_weights = dpo_loss, use_weights
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        self.model_accepts_loss_kwargs = False  # our loss is a mean over pairs: Trainer divides it for accumulation
        self._dpo_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _reference_context(self, model):
        if self.ref_model is not None:
            return contextlib.nullcontext()
        return self.accelerator.unwrap_model(model).disable_adapter()

    def reference_logps(self, model, inputs: dict) -> torch.Tensor:
        """(2B, T-1) per-token log-probs of the continuations under the reference (no gradient)."""
        with torch.no_grad(), self._reference_context(model):
            logps, _ = sequence_logps(self.ref_model or model, inputs["input_ids"], inputs["labels"],
                                      inputs.get("attention_mask"))
        return logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weight = inputs.pop("weight", None)
        logps, mask = sequence_logps(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"))
        out = self.dpo_loss(logps, self.reference_logps(model, inputs), mask, weight if self.use_weights else None)
        if model.training:
            self.stop_if_not_finite(out.loss, lambda: torch.nonzero(~torch.isfinite(out.losses.detach())).flatten().tolist())
        self._store_metrics(out, logps, model.training)
        return (out.loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}) \
            if return_outputs else out.loss

    def _store_metrics(self, out, logps: torch.Tensor, training: bool) -> None:
        store = self._dpo_metrics["train" if training else "eval"]
        gathered = {
            "chosen": self.accelerator.gather_for_metrics(out.chosen_rewards),
            "rejected": self.accelerator.gather_for_metrics(out.rejected_rewards),
        }
        chosen_logps, rejected_logps = logps.detach().sum(-1).chunk(2)
        metrics = type(out)(out.loss, out.losses, gathered["chosen"], gathered["rejected"]).metrics()
        metrics["logps/chosen"] = self.accelerator.gather_for_metrics(chosen_logps).mean().item()
        metrics["logps/rejected"] = self.accelerator.gather_for_metrics(rejected_logps).mean().item()
        for key, value in metrics.items():
            store[key].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._dpo_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in store.items() if v})
        store.clear()
        super().log(logs, *args, **kwargs)


def dpo_trainer(**kwargs):
    """A Trainer with :class:`finetune.trainer.MedMaxTrainerMixin` and :class:`DPOTrainerMixin`."""
    from transformers import Trainer

    bases = (DPOTrainerMixin, MedMaxTrainerMixin, Trainer)
    return type("MedMaxDPOTrainer", bases, {"__module__": __name__})(**kwargs)


def setup_preference_data(cfg, vocab, vocab_size: int):
    """Training and validation preference datasets, checked against the model before any step."""
    from medmax.data.preference_loader import PreferenceDataset, load_preferences

    from .config import ConfigError

    seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    specs = cfg.dataset_specs()
    train = [_checked(load_preferences(s.path), cfg, vocab, vocab_size) for s in specs]
    val = []
    fraction = cfg.validation_fraction()
    if fraction is not None:
        pairs = [_split(d, fraction, seed) for d in train]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    elif cfg.validation:
        val = [_checked(load_preferences(cfg.validation), cfg, vocab, vocab_size)]
    if any(len(d) == 0 for d in train):
        raise ConfigError("validation: the held-out fraction leaves a folder without training pairs")
    train_set = PreferenceDataset(train, [s.weight for s in specs], seed)
    val_set = PreferenceDataset(val, None, seed) if val else None
    logger.info("preference pairs: %d for training, %d for validation", len(train_set), len(val_set or []))
    return train_set, val_set


def _checked(data, cfg, vocab, vocab_size: int):
    from medmax.data.preference_loader import check_preferences

    check_preferences(data, vocab_size, cfg.max_length, vocab.special_ids())
    return data


def _split(data, fraction: float, seed: int):
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))
