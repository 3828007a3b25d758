"""Build training sequences (input_ids + labels) from MedMax, conversation or pretraining rows.

Usage::

    python -m tokenization.build_sequences \\
        --input data/medmax_train.jsonl \\
        --tokenizer CKPT/tokenizer/text_tokenizer_modified.json \\
        --image-tokens runs/image_tokens \\
        --output runs/sequences --workers 4 --max-length 4096

    # conversations with image bytes in parquet, tokenized on the fly with the VQGAN
    python -m tokenization.build_sequences --input data/chat/*.parquet --tokenizer CKPT \\
        --ckpt CKPT/tokenizer --attachment-token '<|reserved_special_token_0|>' --output runs/chat

Writes ``OUTPUT/part-*.parquet``, ``OUTPUT/manifest.json`` and ``OUTPUT/errors.jsonl`` (see
``medmax.dataset_io``); a rerun replaces them. Rows that cannot be built are listed in errors.jsonl and
counted; ``--strict`` stops at the first one instead. ``--resume`` continues an interrupted build,
keeping the input files it finished (unchanged inputs and settings) and rebuilding the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from medmax.dataset_io import ERRORS
from medmax.sequence_dataset import BuildConfig, build_dataset
from medmax.sequences import SequenceConfig
from medmax.vocab import IMAGE_PLACEHOLDER

logger = logging.getLogger("tokenization.build_sequences")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_sequences", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL / parquet files, folders of them, or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. text_tokenizer_modified.json) or a checkpoint folder")
    p.add_argument("--output", required=True, help="output folder (its previous shards, manifest and errors are replaced)")
    p.add_argument("--image-tokens", nargs="*", default=[], metavar="DIR", help="folders written by tokenization.image_tokenize")
    p.add_argument("--ckpt", help="VQGAN checkpoint (or model folder) to encode image bytes in rows on the fly")
    p.add_argument("--image-root", help="with --ckpt: read image paths missing from --image-tokens under this folder")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint (runs code from it)")
    p.add_argument("--attachment-token", action="append", default=[], metavar="STR",
                   help=f"extra image placeholder in conversation / pretraining text (besides {IMAGE_PLACEHOLDER}); repeatable")
    p.add_argument("--no-image-loss", action="store_true", help="no loss on image codes inside answers")
    p.add_argument("--max-length", type=int, help="truncate at the end of answer text, or drop rows that cannot be cut there")
    p.add_argument("--codes-per-image", type=int, help="codes every image must have (default: the VQGAN grid, or the images' one shared count)")
    p.add_argument("--codebook-size", type=int, help="VQGAN codebook size when --ckpt is not given (codes must lie below it)")
    p.add_argument("--keep", nargs="*", default=["source", "task", "credential"], help="passthrough columns, written as strings")
    p.add_argument("--workers", type=int, default=1, help="processes; each takes whole input files")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per tokenizer call")
    p.add_argument("--rows-per-shard", type=int, default=100_000)
    p.add_argument("--strict", action="store_true", help="fail on the first rejected row")
    p.add_argument("--resume", action="store_true", help="keep input files a previous run into OUTPUT finished; build the rest")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    sequence = SequenceConfig(
        placeholders=(IMAGE_PLACEHOLDER, *args.attachment_token),
        image_loss=not args.no_image_loss,
        max_length=args.max_length,
        codes_per_image=args.codes_per_image,
        codebook_size=args.codebook_size,
    )
    return BuildConfig(
        inputs=args.input, tokenizer=args.tokenizer, output=args.output, sequence=sequence,
        image_tokens=tuple(args.image_tokens), ckpt=args.ckpt, image_root=args.image_root,
        trust_checkpoint=args.trust_checkpoint, workers=args.workers, batch_size=args.batch_size,
        rows_per_shard=args.rows_per_shard, keep=tuple(args.keep), strict=args.strict, resume=args.resume, progress=not args.no_progress,
    )


def summary(manifest: dict, output: str, seconds: float) -> str:
    counts, stats = manifest["counts"], manifest["token_stats"]
    lines = [
        f"rows read {counts['rows_read']}, written {counts['rows_written']}, rejected {counts['rejected_total']}"
        f" {json.dumps(counts['rejected']) if counts['rejected'] else ''}, dropped for length {counts['dropped_for_length']},"
        f" truncated {counts['truncated']}",
        f"tokens {stats['total_tokens']} ({stats['trained_tokens']} with loss); length min {stats['min_length']}"
        f" mean {stats['mean_length']} max {stats['max_length']}; {len(manifest['files'])} shard(s) in {output}",
        f"{seconds:.1f} s, {counts['rows_read'] / max(seconds, 1e-9):.0f} rows/s",
    ]
    if counts["rejected_total"] or counts["dropped_for_length"]:
        lines.append(f"see {output}/{ERRORS} for the rows left out")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    config = config_from_args(args)
    start = time.perf_counter()
    manifest = build_dataset(config)
    print(summary(manifest, args.output, time.perf_counter() - start), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
