"""What trains in each mode: full, LoRA (peft), image-alignment, plus ``freeze`` patterns.

Image-alignment trains only the embedding and output rows of the image codes and boi/eoi. Those
rows live in a separate parameter (``trainable_rows``) on the embedding and on ``lm_head``; the full
``weight`` matrices stay frozen (``requires_grad=False``) and never reach the optimizer. A forward
hook substitutes the trainable rows, so no optimizer detail (AdamW's decoupled weight decay, Adam
moments, any other optimizer) can touch a frozen row. :func:`sync_trainable_rows` copies the rows
back into ``weight`` before every save, so a checkpoint's standard keys hold the trained model.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from medmax.errors import UserError
from medmax.vocab import Vocabulary

logger = logging.getLogger(__name__)

ROWS_NAME = "trainable_rows"


class NothingToTrainError(UserError):
    """A mode plus freeze patterns that leave no parameter trainable."""


def image_alignment_ids(vocab: Vocabulary) -> torch.Tensor:
    """Token ids whose rows image-alignment trains: every image code, boi and eoi.  # (n_codes + 2,)"""
    ids = torch.cat([vocab.image_id_tensor(), torch.tensor([vocab.boi_id, vocab.eoi_id])])
    return torch.unique(ids)


def _embedding_hook(module, args, output):  # output (B, T, C)
    index = module.row_lookup[args[0]]  # (B, T): row in trainable_rows, or -1
    rows = module.trainable_rows[index.clamp(min=0)].to(output.dtype)
    return torch.where((index >= 0).unsqueeze(-1), rows, output)


def _output_hook(module, args, output):  # output (B, T, V)
    rows = F.linear(args[0], module.trainable_rows).to(output.dtype)  # (B, T, n_rows)
    return output.index_copy(-1, module.row_ids, rows)


def _attach_rows(module: nn.Module, row_ids: torch.Tensor, hook) -> None:
    weight = module.weight  # (V, C)
    weight.requires_grad_(False)
    row_ids = row_ids.to(weight.device)
    lookup = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    lookup[row_ids] = torch.arange(len(row_ids), device=weight.device)
    module.register_buffer("row_ids", row_ids, persistent=False)
    module.register_buffer("row_lookup", lookup, persistent=False)
    module.register_parameter(ROWS_NAME, nn.Parameter(weight.detach()[row_ids].clone().float()))
    module.register_forward_hook(hook)


def apply_image_alignment(model, vocab: Vocabulary) -> None:
    """Freeze everything, then train only the image-code and boi/eoi rows of the embedding and lm_head."""
    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("mode=image-alignment: tied input/output embeddings are not supported")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = image_alignment_ids(vocab)
    _attach_rows(model.get_input_embeddings(), ids, _embedding_hook)
    _attach_rows(model.get_output_embeddings(), ids, _output_hook)
    logger.info("image-alignment: training %d rows of embed_tokens and lm_head", len(ids))


@torch.no_grad()
def sync_trainable_rows(model) -> None:
    """Copy trained rows into their ``weight`` (no-op outside image-alignment)."""
    for module in model.modules():
        if hasattr(module, ROWS_NAME):
            module.weight[module.row_ids] = getattr(module, ROWS_NAME).to(module.weight.dtype)


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str]):
    """Wrap ``model`` with peft LoRA adapters on the named projections; the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def apply_freeze(model, patterns: list[str]) -> int:
    """Freeze parameters whose names match any regular expression; returns how many were frozen."""
    regexes = [re.compile(p) for p in patterns]
    count = 0
    for name, p in model.named_parameters():
        if p.requires_grad and any(r.search(name) for r in regexes):
            p.requires_grad_(False)
            count += 1
    return count


def _numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (its ``numel()`` is then 0)."""
    return getattr(p, "ds_numel", p.numel())


def setup_mode(model, mode: str, vocab: Vocabulary, freeze: list[str], lora: dict | None = None):
    """Apply a mode and freeze patterns; returns the model to train (a peft model in mode lora)."""
    for p in model.model.vqmodel.parameters():  # the image encoder is unused when training on token ids
        p.requires_grad_(False)
    if mode == "lora":
        model = apply_lora(model, **(lora or {}))
    elif mode == "image-alignment":
        apply_image_alignment(model, vocab)
    elif mode != "full":
        raise ValueError(f"mode={mode!r}: unknown")
    frozen = apply_freeze(model, freeze)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    if trainable == 0:
        raise NothingToTrainError(f"mode={mode} with freeze={freeze} leaves no trainable parameter")
    logger.info("mode %s: %d of %d parameters trainable (%.2f%%); freeze patterns froze %d tensors",
                mode, trainable, total, 100 * trainable / total, frozen)
    return model
