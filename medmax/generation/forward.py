"""The model's side of decoding, shared by the text and image loops: left-padded batches and single steps.

Within a batch, prompts are left-padded; the attention mask hides the padding and position ids count
only real tokens, so a row's greedy output does not depend on the batch it runs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class ModelRunner:
    """Runs a causal model over left-padded batches with a key-value cache; logits for chosen ids only."""

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def left_pad(self, seqs: list[list[int]]):
        """-> ids (B, T) long, mask (B, T) long, positions (B, T) long; padding on the left."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """One transformer pass; -> last position's hidden state (B, C)."""
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1, :]

    def output_rows(self, ids: torch.Tensor):
        """The output layer's rows for ``ids`` (n,): weight (n, C), bias (n,) or None.

        Decoding only ever needs the logits of the ids it may emit, so text skips the image-code rows
        and images compute nothing else.
        """
        head = self.model.lm_head
        return head.weight[ids], None if head.bias is None else head.bias[ids]

    def logits(self, hidden: torch.Tensor, rows, ids: torch.Tensor) -> torch.Tensor:
        """(B, C) hidden states -> (B, n) float logits of ``ids``, given their ``output_rows``."""
        return F.linear(hidden, *rows).float()

    @staticmethod
    def step_inputs(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Extend mask / positions by one real token; -> ids (B, 1), mask (B, T+1), positions (B, 1)."""
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return tokens[:, None], mask, positions[:, -1:] + 1
