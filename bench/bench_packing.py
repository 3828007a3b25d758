"""Packing vs MedMax-style padding: real (non-padding) tokens/s and memory when training the same model.

Usage::

    python bench/bench_packing.py            # preset base, 64 sequences, rows of 2048
    python bench/bench_packing.py --quick    # preset small, 32 sequences, rows of 1024

Both variants train the same freshly initialised model (same seed) with AdamW in fp32 on the same fixed,
length-skewed sequences (seeded: 70% of lengths in 64..256, 22% in 256..1024, 8% up to the maximum):
MedMax's batching (``--batch`` sequences per step, right-padded to the longest, attention mask) and
ours (``medmax.data.plans.pack_greedy`` + ``PackedCollator``: rows of up to ``--max-length`` tokens,
positions restart per sequence). Each run builds its model outside the timer and takes one untimed step
first. The figure is real tokens per second (padding excluded), so both runs are credited for the same work.

Parity: before timing, the untrained model's summed loss over every labelled token of every sequence
is computed from the padded batches and from the packed rows; the labelled-token counts must be equal
and the sums must agree to 1e-4 (relative), i.e. packing computes the same thing as padding.
Memory: the process's peak RSS during the run (model, gradients and AdamW state are the same in both,
so the difference is activations), plus the peak bytes of tensors saved for backward in one step.
The dataset is fixed; the spread of the ratio over the rounds is reported (target: under 15%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import Benchmark, command_line, Case, Result, Target, Variant, add_arguments, run_benchmark, size_label  # noqa: E402

from medmax.model import new_model  # noqa: E402
from medmax.presets import VQGAN_PRESETS, build_tiny_tokenizer  # noqa: E402
from medmax.data.loader import IGNORE_INDEX, PackedCollator, PaddingCollator, _example  # noqa: E402
from medmax.data.plans import pack_greedy  # noqa: E402
from medmax.vocab import Vocabulary  # noqa: E402
from medmax.vqgan import VQGAN  # noqa: E402

PARITY_RTOL = 1e-4
NAMES = {"padding": "padding (MedMax)", "packing": "packing (ours)"}  # plan -> variant name


def skewed_lengths(n: int, seed: int, low: int = 64, high: int = 2048) -> list[int]:
    """Mostly short: 70% in 64..256, 22% in 256..1024, 8% in 1024..high."""
    rng = np.random.default_rng(seed)
    bands = [(low, 256), (256, min(1024, high)), (min(1024, high), high)]
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
    """Peak bytes of tensors autograd saves for backward during one step (the activations)."""

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


def _inputs(batch, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "n_real_tokens"}


class Setup:
    """The model recipe and data both variants share."""

    def __init__(self, preset: str, n: int, max_length: int, rows_per_step: int, batch: int, seed: int, device):
        self.preset, self.seed, self.device = preset, seed, device
        self.tokenizer = build_tiny_tokenizer()
        vocab = Vocabulary.from_tokenizer(self.tokenizer)
        torch.manual_seed(seed)
        self.vqgan = VQGAN.from_params(VQGAN_PRESETS["tiny"])
        self.lengths = skewed_lengths(n, seed, high=max_length)
        rows = make_sequences(vocab, self.lengths, seed)
        self.plans = {"padding": padded_batches(rows, batch, vocab.pad_id),
                      "packing": packed_batches(rows, max_length, rows_per_step, vocab.pad_id)}

    def model(self):
        model = new_model(self.preset, self.tokenizer, self.vqgan, seed=self.seed).to(self.device)
        model.model.vqmodel.requires_grad_(False)
        return model

    def train(self, plan: str) -> Result:
        batches = self.plans[plan]
        model = self.model().train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        saved = SavedBytes()

        def step(batch):
            saved.reset()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = model(**_inputs(batch, self.device), use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up, not timed
        _sync(self.device)
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        _sync(self.device)
        seconds = time.perf_counter() - start
        real = sum(int(b["n_real_tokens"]) for b in batches)
        computed = sum(b["input_ids"].numel() for b in batches)
        return Result(work={"real tokens": real}, seconds=seconds,
                      figures={"steps": len(batches), "tokens computed": computed, "saved_activation_mib": saved.peak / 2**20})

    @torch.no_grad()
    def summed_loss(self, plan: str, model) -> tuple[int, float]:
        """(labelled tokens, summed loss) of the untrained model over every batch of a plan."""
        count, total = 0, 0.0
        for batch in self.plans[plan]:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = model(**_inputs(batch, self.device), use_cache=False).loss
            count, total = count + n, total + float(loss) * n
        return count, total

    def parity(self) -> dict:
        model = self.model().eval()
        return {name: self.summed_loss(plan, model) for plan, name in NAMES.items()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def same_loss(a: tuple[int, float], b: tuple[int, float]) -> float:
    return float(a[0] == b[0] and abs(a[1] - b[1]) <= PARITY_RTOL * abs(a[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="preset small, 32 sequences, max length 1024")
    parser.add_argument("--preset", default=None, help="model preset (default base; small with --quick)")
    parser.add_argument("--sequences", type=int, help="sequences in the fixed dataset (default 64; quick 32)")
    parser.add_argument("--max-length", type=int, default=None, help="longest sequence and packed row (2048; quick 1024)")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--batch", type=int, default=4, help="padded sequences per step (MedMax style)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("small" if args.quick else "base")
    max_length = args.max_length or (1024 if args.quick else 2048)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.sequences or (32 if args.quick else 64)
    setup = Setup(preset, n, max_length, args.rows, args.batch, args.seed, device)
    lengths = setup.lengths
    bench = Benchmark(
        name="packing", title="Fine-tuning: packing vs MedMax-style padding", size=size_label(args.quick, args.preset, args.max_length, args.sequences),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"preset": preset, "sequences": n, "tokens": sum(lengths),
                  "lengths": f"{min(lengths)}..{max(lengths)}, median {int(np.median(lengths))}",
                  "max_length": max_length, "packed_rows_per_step": args.rows, "padded_per_step": args.batch,
                  "dtype": "fp32", "device": device.type},
        command=command_line(argv))
    case = Case(f"{n} length-skewed sequences, preset {preset}", unit="real tokens",
                agreement=same_loss, parity=setup.parity, variants=[
                    Variant(NAMES["padding"], lambda: setup.train("padding"), warmup=lambda: None),
                    Variant(NAMES["packing"], lambda: setup.train("packing"), warmup=lambda: None)])
    targets = [Target(case.name, NAMES["packing"], "ratio", ">=", 1.5, "packing >= 1.5x real tokens/s of padding")]
    return run_benchmark(bench, [case], targets, args, notes=_spread_note)


def _spread_note(record: dict) -> list[str]:
    ratio = next(iter(record["cases"].values()))["variants"][NAMES["packing"]]["summary"]["ratio"]
    verdict = "under" if ratio["spread"] < 0.15 else "NOT under"
    return [f"Spread of the packing/padding ratio over {ratio['n']} rounds: {ratio['spread']:.1%}, {verdict} the 15% aimed for."]


if __name__ == "__main__":
    raise SystemExit(main())
