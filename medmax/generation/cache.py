"""A key-value cache allocated once for a whole image, in which every row writes at its own position.

The image loop knows its length in advance: the prompt, the codes, and a window of draft tokens
(speculative Jacobi decoding, ``medmax.generation.jacobi``). :class:`RowCache` holds ``(R, H, capacity, D)``
keys and values per layer, allocated at the first write, so no step grows or copies the cache (what makes
a decode step compilable and CUDA-graph friendly on a GPU).

Rows advance by different amounts when they accept different numbers of drafts, so each row has its own
write position ``start``: a forward of ``W`` tokens writes row ``r``'s keys at slots
``start[r] .. start[r] + W - 1``, and :meth:`RowCache.advance` moves ``start[r]`` past the entries the row
keeps. Rejected entries stay behind ``start`` and are overwritten next time; the attention mask never shows
them. Transformers' ``StaticCache`` writes every row at the same ``cache_position``, which is why this
small class exists; it implements the one method Chameleon's attention calls, ``update``.
"""

from __future__ import annotations

import torch


class RowCache:
    """Static per-layer keys / values ``(R, H, capacity, D)``; row ``r`` writes at ``start[r]``.

    ``prompt_width`` is the left-padded prompt's width ``P`` and ``lengths`` (R,) each row's real prompt
    tokens; slots ``P - lengths[r] .. P - 1`` hold its prompt, slots from ``P`` on its generated tokens.
    """

    def __init__(self, n_layers: int, prompt_width: int, lengths: torch.Tensor, capacity: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.capacity = capacity
        self.prompt_width = prompt_width
        self.first = prompt_width - lengths  # (R,) the first real slot of each row
        self.start = torch.zeros_like(lengths)  # (R,) where the next forward writes
        self.width = 0  # tokens in the forward under way

    def inputs(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a forward of ``width`` tokens per row: -> position ids (R, W), attention mask (R, 1, W, capacity) bool.

        Query ``i`` of row ``r`` sees the row's real slots up to ``start[r] + i``: its prompt (not the
        padding), what it kept, and the window's earlier tokens. A padding query sees itself only (its
        output is never read; an empty row would give NaNs).
        """
        if int(self.start.max()) + width > self.capacity:
            raise RuntimeError(f"RowCache: {width} more tokens do not fit in {self.capacity} slots")
        self.width = width
        device = self.start.device
        step = torch.arange(width, device=device)
        slot = torch.arange(self.capacity, device=device)
        query = self.start[:, None] + step  # (R, W) the slot each query writes
        mask = (slot >= self.first[:, None, None]) & (slot <= query[:, :, None])  # (R, W, capacity)
        mask |= slot == query[:, :, None]
        positions = (query - self.first[:, None]).clamp(min=0)  # real tokens before each query
        return positions, mask[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (R, H, W, D) keys / values at each row's window slots; -> the layer's whole keys, values."""
        if self.keys[layer_idx] is None:
            R, H, _, D = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(R, H, self.capacity, D)
            self.values[layer_idx] = value_states.new_zeros(R, H, self.capacity, D)
        index = self.start[:, None] + torch.arange(self.width, device=self.start.device)  # (R, W)
        index = index[:, None, :, None].expand_as(key_states)
        self.keys[layer_idx].scatter_(2, index, key_states)
        self.values[layer_idx].scatter_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def take_prompts(self, rows: torch.Tensor, source: "RowCache", source_rows: torch.Tensor) -> None:
        """Copy prompts another cache prefilled (its rows ``source_rows``) into ``rows``, right-aligned at slot ``P``.

        Keys carry their rotary position (real tokens counted from 0), not their slot, so they move as they are.
        """
        for layer, (k, v) in enumerate(zip(source.keys, source.values)):
            if self.keys[layer] is None:
                shape = (len(self.first), k.shape[1], self.capacity, k.shape[3])
                self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
            P, Q = self.prompt_width, source.prompt_width
            for r, s in zip(rows.tolist(), source_rows.tolist()):
                n = Q - int(source.first[s])  # real prompt tokens
                self.keys[layer][r, :, P - n : P] = k[s, :, Q - n : Q]
                self.values[layer][r, :, P - n : P] = v[s, :, Q - n : Q]

    def advance(self, kept: torch.Tensor) -> None:
        """Keep the first ``kept[r]`` entries row ``r`` wrote in the last forward (R,) long."""
        self.start = self.start + kept
