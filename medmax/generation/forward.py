"""The model's side of decoding, shared by the text and image loops: left-padded batches and single steps.

Within a batch, prompts are left-padded; the attention mask hides the padding and position ids count
only real tokens, so a row's greedy output does not depend on the batch it runs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import RowCache


class ModelRunner:
    """Runs a causal model over left-padded batches with a key-value cache; logits for chosen ids only."""

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def new_row_cache(self, mask: torch.Tensor, capacity: int) -> RowCache:
        """A :class:`RowCache` of ``capacity`` slots for a left-padded batch whose padding ``mask`` is (R, P)."""
        return RowCache(int(self.model.config.num_hidden_layers), mask.shape[1], mask.sum(dim=1), capacity)

    def forward_window(self, ids: torch.Tensor, cache: RowCache) -> torch.Tensor:
        """(R, W) ids written at each row's own cache position; -> hidden states (R, W, C)."""
        positions, visible = cache.inputs(ids.shape[1])
        dtype = self.model.get_input_embeddings().weight.dtype
        bias = torch.zeros(visible.shape, dtype=dtype, device=ids.device).masked_fill(~visible, torch.finfo(dtype).min)
        out = self.model.model(input_ids=ids, attention_mask=bias, position_ids=positions,
                               cache=cache, use_cache=True)
        return out.last_hidden_state

    def prefill_rows(self, seqs: list[list[int]], extra: int) -> tuple[torch.Tensor, RowCache]:
        """Prefill a :class:`RowCache` with ``extra`` free slots; -> last hidden state per row (R, 1, C), the cache.

        Each distinct prompt runs once (the unconditional ``<s><racm3:break>`` every guided image shares),
        and prompts run in groups of similar length, so a short prompt is not padded to a long one's width.
        """
        unique = list(dict.fromkeys(map(tuple, seqs)))
        which = torch.tensor([unique.index(tuple(s)) for s in seqs], device=self.device)  # (R,) row -> distinct prompt
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        cache = RowCache(int(self.model.config.num_hidden_layers), int(lengths.max()), lengths,
                         int(lengths.max()) + extra)
        dtype = self.model.get_input_embeddings().weight.dtype
        hidden = torch.empty(len(unique), self.model.config.hidden_size, dtype=dtype, device=self.device)
        for group in _length_groups([len(u) for u in unique]):
            ids, mask, _ = self.left_pad([list(unique[u]) for u in group])
            part = self.new_row_cache(mask, capacity=ids.shape[1])
            hidden[group] = self.forward_window(ids, part)[:, -1]
            members = [(r, group.index(u)) for r, u in enumerate(which.tolist()) if u in group]
            cache.take_prompts(torch.tensor([r for r, _ in members]), part, torch.tensor([g for _, g in members]))
        cache.advance(torch.full_like(lengths, cache.prompt_width))
        return hidden[which][:, None], cache

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


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices grouped by length so that a group's longest member is at most twice its shortest (little padding)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= 2 * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
