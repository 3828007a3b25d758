"""Sequence-building throughput on a synthetic MedMax-format dataset, against a MedMax-style loop.

Usage::

    .venv/bin/python bench/bench_build_sequences.py            # 100k rows, 1024 codes per image
    .venv/bin/python bench/bench_build_sequences.py --quick    # 5k rows

The dataset: JSONL shards of MedMax rows (``text`` with one ``<image>`` and the end-of-turn,
``image_path``) and an image-token folder as ``tokenization.image_tokenize`` writes it (2,000 images).
The baseline is the straightforward single-process loop MedMax's script runs (``json.loads`` instead of
its ``eval``): per row ``tokenizer.encode``, list splicing of the codes, labels, one JSON line out.
Ours is ``medmax.sequence_dataset.build_dataset`` (batched encoding, numpy splicing, parquet shards)
with 1 and 2 workers. Both run here, side by side, and their ids are compared on the first rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medmax.dataset_io import shard_paths  # noqa: E402
from medmax.presets import build_tiny_tokenizer  # noqa: E402
from medmax.sequence_dataset import BuildConfig, build_dataset  # noqa: E402

WORDS = "is there a lesion in the image which organ shown lung liver brain kidney modality ct mri x-ray upper left right".split()
EOT = "<reserved08706>"


def make_dataset(folder: Path, rows: int, shards: int, n_images: int, codes_per_image: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    tokens = folder / "image_tokens"
    tokens.mkdir(parents=True)
    paths = [f"img/{i:06d}.png" for i in range(n_images)]
    codes = rng.integers(0, 8192, (n_images, codes_per_image)).tolist()
    pq.write_table(pa.table({"img_path": paths, "img_tokens": codes}), tokens / "tokens-rank00000-part000000.parquet")
    files = []
    for s in range(shards):
        path = folder / f"medmax-{s:03d}.jsonl"
        with open(path, "w") as fh:
            for _ in range(rows // shards):
                question = " ".join(rng.choice(WORDS, rng.integers(5, 20)))
                answer = " ".join(rng.choice(WORDS, rng.integers(1, 30)))
                row = {"text": f"{question}?<image>{EOT}{answer}.", "image_path": paths[rng.integers(n_images)],
                       "source": "synthetic", "task": "vqa", "credential": "no"}
                fh.write(json.dumps(row) + "\n")
        files.append(path)
    return files


def baseline(files: list[Path], tokenizer, token_folder: Path, out: Path) -> tuple[int, int, list]:
    """The MedMax-style loop: one row at a time, Python lists, JSON lines out."""
    table = pq.read_table(next(token_folder.glob("*.parquet")))
    lookup = dict(zip(table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist()))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    bos, eos, boi, eoi, image_id, eot = (vocab[t] for t in ("<s>", "</s>", "<racm3:break>", "<eoss>", "<image>", EOT))
    n_rows = n_tokens = 0
    first = []
    with open(out, "w") as sink:
        for path in files:
            with open(path) as fh:
                for line in fh:
                    row = json.loads(line)
                    ids = [bos] + tokenizer.encode(row["text"]).ids + [eos]
                    at = ids.index(image_id)
                    ids = ids[:at] + [boi] + [c + 4 for c in lookup[row["image_path"]]] + [eoi] + ids[at + 1 :]
                    cut = ids.index(eot)
                    labels = [-100] * (cut + 1) + ids[cut + 1 :]
                    sink.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
                    n_rows += 1
                    n_tokens += len(ids)
                    if len(first) < 100:
                        first.append(ids)
    return n_rows, n_tokens, first


def ours(files, tokenizer_path, token_folder, out: Path, workers: int) -> tuple[int, int, list]:
    cfg = BuildConfig(inputs=[str(f) for f in files], tokenizer=str(tokenizer_path), output=str(out),
                      image_tokens=(str(token_folder),), workers=workers, progress=False)
    manifest = build_dataset(cfg)
    first = pq.read_table(shard_paths(out)[0], columns=["input_ids"]).slice(0, 100).column("input_ids").to_pylist()
    return manifest["counts"]["rows_written"], manifest["token_stats"]["total_tokens"], first


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5k rows instead of 100k")
    p.add_argument("--rows", type=int)
    p.add_argument("--codes-per-image", type=int, default=1024)
    p.add_argument("--shards", type=int, default=4)
    args = p.parse_args(argv)
    rows = args.rows or (5_000 if args.quick else 100_000)
    work = Path(tempfile.mkdtemp(prefix="bench_seq_"))
    try:
        files = make_dataset(work, rows, args.shards, 2000, args.codes_per_image)
        tokenizer = build_tiny_tokenizer()
        tokenizer.save(str(work / "tokenizer.json"))
        base_s, (n, tokens, base_first) = timed(baseline, files, tokenizer, work / "image_tokens", work / "baseline.jsonl")
        print(f"rows {n}, tokens {tokens}, {args.codes_per_image} codes per image, {args.shards} input shards")
        print(f"{'baseline (MedMax-style loop)':32s} {base_s:7.2f} s {n / base_s:9.0f} seq/s {tokens / base_s:11.0f} tok/s  1.00x")
        for workers in (1, 2):
            s, (m, t, first) = timed(ours, files, work / "tokenizer.json", work / "image_tokens", work / f"out{workers}", workers)
            assert (m, t) == (n, tokens) and first == base_first, "outputs differ from the baseline"
            print(f"{f'build_dataset workers={workers}':32s} {s:7.2f} s {m / s:9.0f} seq/s {t / s:11.0f} tok/s  {base_s / s:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
