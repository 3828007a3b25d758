"""Sequence-building throughput on MedMax-format rows, against MedMax's published tokenization loop.

Usage::

    python bench/bench_build_sequences.py            # 100k rows in 4 JSONL files, 1024 codes per image
    python bench/bench_build_sequences.py --quick    # 5k rows

The input is MedMax's own format for its ``src/tokenization.py``: JSONL rows with ``text`` (one
``<image>`` placeholder and the end-of-turn), ``image_path``, ``image_tokens`` (1024 raw VQGAN codes),
``source``, ``task``; the tokenizer is a small one with Chameleon's id layout (``<image>`` = 8711 as in
MedMax's ``text_tokenizer_modified.json``). Variants, each timed from the input paths to its output on
disk, tokenizer loading included:

- *MedMax published loop*: what MedMax's ``src/tokenization.py`` (github.com/Hritikbansal/medmax) does,
  step for step: read every line, ``eval`` each, ``[bos] + encode(text).ids + [eos]``, rebuild the id
  list one token at a time (``new = new + [token]``, the image codes + 4 between boi 8197 and eoi 8196
  in place of ``<image>``), keep every row in memory, then write each row with its ``tokens`` as JSON.
  One process, one input file after another (the script takes one file).
- *MedMax loop, tuned*: the same algorithm as fast as it honestly runs in plain Python: ``json.loads``,
  one list splice per image, rows streamed to the output instead of held.
- *ours*: ``python -m tokenization.build_sequences`` (batched encoding, numpy splicing, zstd parquet
  shards with labels and a manifest), ``--workers 1`` and ``--workers 2``.

Parity: every row's ids of every variant (MedMax's ``tokens``, our ``input_ids``) are digested in order
and must be identical. MedMax's script does not build labels (its training loader does); ours does,
so ours does more work per row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from harness import Benchmark, command_line, Case, Result, Variant, add_arguments, fmt, run_benchmark, size_label, summarise  # noqa: E402

WORDS = "is there a lesion in the image which organ shown lung liver brain kidney modality ct mri x-ray upper left right".split()
EOT = "<reserved08706>"
CODE_OFFSET, BOI, EOI = 4, 8197, 8196  # MedMax's constants (Chameleon's layout)


def make_dataset(folder: Path, rows: int, shards: int, n_images: int, codes_per_image: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 8192, (n_images, codes_per_image)).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(shards):
        path = folder / f"medmax-{s:03d}.jsonl"
        with open(path, "w") as fh:
            for _ in range(rows // shards):
                question = " ".join(rng.choice(WORDS, rng.integers(5, 20)))
                answer = " ".join(rng.choice(WORDS, rng.integers(1, 30)))
                image = int(rng.integers(n_images))
                row = {"text": f"{question}?<image>{EOT}{answer}.", "image_path": f"img/{image:06d}.png",
                       "image_tokens": codes[image], "source": "synthetic", "task": "vqa"}
                fh.write(json.dumps(row) + "\n")
        files.append(path)
    return files


class IdsDigest:
    """Digest of a sequence of id lists: lengths and values hashed apart, so chunked input gives the same digest."""

    def __init__(self):
        self.lengths, self.values, self.rows, self.tokens = hashlib.sha256(), hashlib.sha256(), 0, 0

    def add(self, lengths: np.ndarray, values: np.ndarray) -> None:
        self.lengths.update(np.asarray(lengths, dtype=np.int64).tobytes())
        self.values.update(np.asarray(values, dtype=np.int64).tobytes())
        self.rows, self.tokens = self.rows + len(lengths), self.tokens + int(np.sum(lengths))

    def value(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens,
                "sha256": self.lengths.hexdigest()[:16] + self.values.hexdigest()[:16]}


def jsonl_digest(files: list[Path], key: str) -> dict:
    d = IdsDigest()
    for path in files:
        with open(path) as fh:
            for line in fh:
                ids = json.loads(line)[key]
                d.add([len(ids)], ids)
    return d.value()


def parquet_digest(folder: Path) -> dict:
    import pyarrow.parquet as pq

    d = IdsDigest()
    for path in sorted(folder.glob("part-*.parquet")):
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        d.add(np.diff(offsets), column.values.to_numpy()[offsets[0] : offsets[-1]])
    return d.value()


def _ids(tokenizer_path: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return tokenizer, vocab["<s>"], vocab["</s>"], vocab["<image>"]


def medmax_published(files: list[Path], tokenizer_path: Path, out: Path) -> list[Path]:
    """MedMax's src/tokenization.py, step for step (its eval, its token-by-token list rebuild, rows held)."""
    tokenizer, bos, eos, image_id = _ids(tokenizer_path)
    outputs = []
    for path in files:
        with open(path) as f:
            lines = list(f)
        kept = []
        for line in lines:
            instance = eval(line)  # noqa: S307 -- what the published script does; our own generated input
            image = [BOI] + [c + CODE_OFFSET for c in instance["image_tokens"]] + [EOI]
            ids = [bos] + tokenizer.encode(instance["text"]).ids + [eos]
            tokens = []
            for token in ids:
                tokens = tokens + image if token == image_id else tokens + [token]
            instance["tokens"] = tokens
            kept.append(instance)
        target = out / f"{path.stem}.tokens.jsonl"
        with open(target, "a") as f:
            for instance in kept:
                f.write(json.dumps(instance))
                f.write("\n")
        outputs.append(target)
    return outputs


def medmax_tuned(files: list[Path], tokenizer_path: Path, out: Path) -> list[Path]:
    """The same algorithm with the obvious costs removed: json.loads, one splice, rows streamed out."""
    tokenizer, bos, eos, image_id = _ids(tokenizer_path)
    outputs = []
    for path in files:
        target = out / f"{path.stem}.tokens.jsonl"
        with open(path) as src, open(target, "w") as sink:
            for line in src:
                instance = json.loads(line)
                ids = [bos] + tokenizer.encode(instance["text"]).ids + [eos]
                at = ids.index(image_id)
                ids[at : at + 1] = [BOI, *(c + CODE_OFFSET for c in instance["image_tokens"]), EOI]
                instance["tokens"] = ids
                sink.write(json.dumps(instance) + "\n")
        outputs.append(target)
    return outputs


def loop_variant(fn, files, tokenizer_path: Path, out: Path, rows: int):
    def run() -> Result:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        written = fn(files, tokenizer_path, out)
        seconds = time.perf_counter() - start
        digest = jsonl_digest(written, "tokens")
        return Result(work={"sequences": rows, "tokens": digest["tokens"]}, output=digest, seconds=seconds)

    return run


def ours_variant(files, tokenizer_path: Path, out: Path, workers: int, rows: int):
    from tokenization.build_sequences import main as build_main

    def run() -> Result:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        build_main(["--input", *map(str, files), "--tokenizer", str(tokenizer_path), "--output", str(out),
                    "--workers", str(workers), "--no-progress"])
        seconds = time.perf_counter() - start
        digest = parquet_digest(out)
        return Result(work={"sequences": rows, "tokens": digest["tokens"]}, output=digest, seconds=seconds)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5k rows instead of 100k")
    p.add_argument("--rows", type=int)
    p.add_argument("--codes-per-image", type=int, default=1024)
    p.add_argument("--shards", type=int, default=4, help="input JSONL files")
    p.add_argument("--images", type=int, default=2000, help="distinct images the rows point at")
    add_arguments(p)
    args = p.parse_args(argv)
    rows = args.rows or (5_000 if args.quick else 100_000)
    rows -= rows % args.shards
    logging.basicConfig(level=logging.WARNING)
    bench = Benchmark(
        name="build_sequences", title="Sequence building vs MedMax's published loop", size=size_label(args.quick, args.rows),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"rows": rows, "input_files": args.shards, "codes_per_image": args.codes_per_image, "images": args.images},
        command=command_line(argv))
    work = Path(tempfile.mkdtemp(prefix="bench_seq_"))
    try:
        from medmax.presets import build_tiny_tokenizer

        files = make_dataset(work / "data", rows, args.shards, args.images, args.codes_per_image)
        tokenizer_path = work / "tokenizer.json"
        build_tiny_tokenizer().save(str(tokenizer_path))
        case = Case(f"{rows:,} MedMax rows, {args.codes_per_image} codes per image", unit="sequences", variants=[
            Variant("MedMax published loop", loop_variant(medmax_published, files, tokenizer_path, work / "published", rows)),
            Variant("MedMax loop, tuned", loop_variant(medmax_tuned, files, tokenizer_path, work / "tuned", rows)),
            Variant("ours, build_sequences --workers 1", ours_variant(files, tokenizer_path, work / "ours1", 1, rows)),
            Variant("ours, build_sequences --workers 2", ours_variant(files, tokenizer_path, work / "ours2", 2, rows))])
        return run_benchmark(bench, [case], [], args, notes=_notes)  # issue 3 asks for rates, sets no ratio
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _notes(record: dict) -> list[str]:
    """Ours against the tuned loop, per round (the harness's ratio column is against the published loop)."""
    variants = next(iter(record["cases"].values()))["variants"]
    tuned = variants["MedMax loop, tuned"]["samples"]
    notes = []
    for name in ("ours, build_sequences --workers 1", "ours, build_sequences --workers 2"):
        ours = variants[name]["samples"]
        stats = summarise([o["sequences/s"] / t["sequences/s"] for o, t in zip(ours, tuned)])
        notes.append(f"{name} against the tuned MedMax loop, per round: {fmt(stats)}x; "
                     f"{variants[name]['summary']['tokens/s']['median']:,.0f} tokens/s (median).")
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
