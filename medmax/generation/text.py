"""The text decoding loop, after Chameleon's inference.

Only text tokens and end-of-sequence may be drawn (begin-of-image only in interleaved mode while
images remain and the context has room for one); greedy or temperature / top-k / top-p; repetition
penalty; stop strings; a length limit. End-of-sequence and end-of-turn both end the text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .forward import ModelRunner
from .sampling import apply_repetition_penalty, sample, text_token_mask

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .state import _Row


class TextDecoder:
    """Decodes one text run for a batch of rows (each a prompt's state, see ``state._Row``)."""

    def __init__(self, runner: ModelRunner, vocab, tokenizer, context_length: int):
        self.runner = runner
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.context_length = context_length

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, rows: list[_Row], config: GenerationConfig, rng, image_room: int) -> list[list[int]]:
        """Decode text for every row until it ends; sets each row's finish_reason; -> new ids per row.

        ``rng``: the shared generator or one per row; ``image_room``: the tokens an image needs
        (0 when begin-of-image may not be drawn).
        """
        v, run = self.vocab, self.runner
        ids, mask, positions = run.left_pad([r.context for r in rows])
        cache = run.new_cache()
        hidden = run.forward(ids, mask, positions, cache)  # (B, C)
        cols = torch.nonzero(text_token_mask(v, allow_boi=True, device=run.device)).squeeze(1)  # (n,) ids
        head_rows = run.output_rows(cols)
        seen = torch.zeros(len(rows), v.size, dtype=torch.bool, device=run.device)
        seen.scatter_(1, ids, mask.bool())
        lengths = torch.tensor([len(r.context) for r in rows], device=run.device)
        images_left = torch.tensor([r.images_left > 0 for r in rows], device=run.device)
        new = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max(r.text_left for r in rows)):
            boi_ok = images_left & (lengths + image_room <= self.context_length)  # (B,) room for boi, grid, eoi
            tokens = self.pick_tokens(hidden, cols, head_rows, seen, boi_ok, config, rng)
            seen[torch.arange(len(rows)), tokens] = True
            lengths += 1
            for r, tok in enumerate(tokens.tolist()):
                if not done[r]:
                    new[r].append(tok)
                    if rows[r].on_step:
                        rows[r].on_step(rows[r].index, tok)
                    done[r] = self._finished(rows[r], new[r], tok, len(rows[r].context) + len(new[r]), config)
            if all(done):
                break
            ids, mask, positions = run.step_inputs(tokens, mask, positions)
            hidden = run.forward(ids, mask, positions, cache)
        return new

    def pick_tokens(self, hidden, cols, head_rows, seen, boi_ok, config: GenerationConfig, rng) -> torch.Tensor:
        """One text step: (B, C) hidden -> (B,) token ids among ``cols`` (boi only where ``boi_ok``)."""
        logits = self.runner.logits(hidden, head_rows, cols)  # (B, n)
        if config.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen[:, cols], config.repetition_penalty)
        boi = cols == self.vocab.boi_id
        logits[:, boi] = logits[:, boi].masked_fill(~boi_ok[:, None], float("-inf"))
        picked = sample(logits, config.do_sample, config.temperature, config.top_p, config.top_k, rng)  # (B,)
        return cols[picked]

    def _finished(self, row: _Row, new: list[int], tok: int, length: int, config: GenerationConfig) -> bool:
        v = self.vocab
        if tok in (v.eos_id, v.eot_id):
            row.finish_reason = "eos"
        elif tok == v.boi_id:
            row.finish_reason = "image"
        elif config.stop_strings and any(s in self.decode(new) for s in config.stop_strings):
            row.finish_reason = "stop"
        elif len(new) >= row.text_left or length >= self.context_length:
            row.finish_reason = "length"
        else:
            return False
        return True

    def body(self, new: list[int], stop_strings) -> tuple[str, list[int]]:
        """A text run's ids without its end tokens, and its text cut before the first stop string."""
        v = self.vocab
        body = [t for t in new if t not in (v.eos_id, v.eot_id, v.boi_id)]
        text = self.decode(body)
        cuts = [text.find(s) for s in stop_strings if s in text]
        return (text[: min(cuts)] if cuts else text), body
