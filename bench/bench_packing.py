"""Packing vs MedMax-style padding: real (non-padding) tokens/s and memory when training the same model.

Usage::

    .venv/bin/python bench/bench_packing.py            # preset base, 24 sequences, rows of 2048
    .venv/bin/python bench/bench_packing.py --quick    # preset small, 12 sequences, rows of 1024 (a smoke check)

Both runs train the same freshly initialised model (same seed) on the same length-skewed sequences
(64..2048 tokens, most short) with AdamW in fp32: (a) packed rows of up to ``--max-length`` tokens,
positions restarting per sequence, ``--rows`` rows per step; (b) MedMax's batching, ``--batch``
sequences per step padded to the longest in the batch, with an attention mask. Memory: on CUDA the
peak allocated bytes; on CPU the peak bytes of tensors saved for backward in one step (weights,
gradients and optimizer state are the same in both runs, so activations are what differs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medmax.model import new_model
from medmax.presets import VQGAN_PRESETS, build_tiny_tokenizer
from medmax.training_data import IGNORE_INDEX, PackedCollator, PaddingCollator, _example, pack_greedy
from medmax.vocab import Vocabulary
from medmax.vqgan import VQGAN


def skewed_lengths(n: int, seed: int, low: int = 64, high: int = 2048) -> list[int]:
    """Mostly short: 70% in 64..256, 22% in 256..1024, 8% in 1024..2048."""
    rng = np.random.default_rng(seed)
    bands = [(low, 256), (256, 1024), (1024, high)]
    picks = rng.choice(3, size=n, p=[0.70, 0.22, 0.08])
    return [int(rng.integers(*bands[b], endpoint=True)) for b in picks]


def make_sequences(vocab: Vocabulary, lengths: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random ids (image codes and text) with loss on the second half of each sequence."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(int(vocab.code_to_id[0]), vocab.size, size=n)
        labels = ids.copy()
        labels[: n // 2] = IGNORE_INDEX
        rows.append((ids, labels))
    return rows


def packed_batches(rows, max_length: int, per_step: int, pad_id: int):
    bins = pack_greedy([len(r[0]) for r in rows], max_length)
    collate = PackedCollator(pad_id)
    examples = [_example([rows[i] for i in b]) for b in bins]
    return [collate(examples[i : i + per_step]) for i in range(0, len(examples), per_step)]


def padded_batches(rows, per_step: int, pad_id: int):
    collate = PaddingCollator(pad_id)
    examples = [_example([r]) for r in rows]
    return [collate(examples[i : i + per_step]) for i in range(0, len(examples), per_step)]


class SavedBytes:
    """Peak bytes of tensors autograd saves for backward during one step (CPU memory proxy)."""

    def __init__(self):
        self.current, self.peak, self.seen = 0, 0, set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in self.seen:
            self.seen.add(key)
            self.current += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.current)
        return t

    def reset(self):
        self.current, self.seen = 0, set()


def train(model, batches, device) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    saved = SavedBytes()
    model.train()

    def step(batch):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "n_real_tokens"}
        saved.reset()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step(batches[0])  # warm-up, not timed
    if device.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    real = sum(int(b["n_real_tokens"]) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved.peak
    return {"seconds": seconds, "real_tokens": real, "total_tokens": total, "steps": len(batches),
            "tokens_per_s": real / seconds, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="preset small, 12 sequences, max length 1024")
    parser.add_argument("--preset", default=None, help="model preset (default base; small with --quick)")
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="longest sequence and packed row (2048)")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--batch", type=int, default=4, help="padded sequences per step (MedMax style)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = args.preset or ("small" if args.quick else "base")
    n = args.sequences or (12 if args.quick else 24)
    max_length = args.max_length or (1024 if args.quick else 2048)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = build_tiny_tokenizer()
    vocab = Vocabulary.from_tokenizer(tokenizer)
    torch.manual_seed(args.seed)
    vqgan = VQGAN.from_params(VQGAN_PRESETS["tiny"])
    lengths = skewed_lengths(n, args.seed, high=max_length)
    rows = make_sequences(vocab, lengths, args.seed)
    print(f"model preset {preset} on {device}; {n} sequences, {sum(lengths)} tokens, lengths "
          f"{min(lengths)}..{max(lengths)} (median {int(np.median(lengths))})")

    results = {}
    plans = {"padding": padded_batches(rows, args.batch, vocab.pad_id),
             "packing": packed_batches(rows, max_length, args.rows, vocab.pad_id)}
    for name, batches in plans.items():
        model = new_model(preset, tokenizer, vqgan, seed=args.seed).to(device)
        model.model.vqmodel.requires_grad_(False)
        results[name] = train(model, batches, device)
        del model
    base = results["padding"]
    print(f"{'':8} {'steps':>5} {'real tok':>9} {'all tok':>9} {'seconds':>8} {'real tok/s':>10} {'peak MiB':>9} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:8} {r['steps']:5d} {r['real_tokens']:9d} {r['total_tokens']:9d} {r['seconds']:8.1f} "
              f"{r['tokens_per_s']:10.1f} {r['peak_bytes'] / 2**20:9.1f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f}x")
    print(f"packing / padding real tokens/s: {results['packing']['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
          f"peak memory ratio {results['packing']['peak_bytes'] / base['peak_bytes']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
