"""The one command line of the folder builds, shared by ``tokenization.build_sequences`` and
``tokenization.build_preferences`` (not a program: each of those has its own usage and ``main``).

Both builds run :func:`medmax.data.build.timed_build` on a :class:`medmax.data.build.BuildConfig` whose
``layout`` says what a row becomes; their flags are the same but for ``--no-image-loss`` (sequences only:
a preference pair's loss is DPO's, over whole continuations). Each default comes from the config the flag fills.
"""

from __future__ import annotations

import argparse
import sys

from medmax.data.build import BuildConfig, timed_build
from medmax.data.rows import SequenceConfig
from medmax.vocab import IMAGE_PLACEHOLDER

ROWS = {"sequences": "JSONL / parquet files, folders of them, or globs",
        "preferences": "JSONL / parquet files of preference rows, folders of them, or globs"}
MAX_LENGTH = {"sequences": "truncate longer sequences at the end of answer text, or drop rows that cannot be cut there",
              "preferences": "drop pairs whose prompt plus longer continuation is longer (pairs are never cut)"}


def build_parser(prog: str, description: str, layout: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--input", nargs="+", required=True, help=ROWS[layout])
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. text_tokenizer_modified.json) or a checkpoint folder")
    p.add_argument("--output", required=True,
                   help="output folder: built beside it (OUTPUT.partial) and swapped in when complete; must not hold the inputs")
    p.add_argument("--image-tokens", nargs="*", default=[], metavar="DIR", help="folders written by tokenization.image_tokenize")
    p.add_argument("--ckpt", help="VQGAN checkpoint (or model folder) to encode image bytes in rows on the fly")
    p.add_argument("--image-root", help="with --ckpt: read image paths missing from --image-tokens under this folder")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint (runs code from it)")
    p.add_argument("--attachment-token", action="append", default=[], metavar="STR",
                   help=f"extra image placeholder in conversation / pretraining text (besides {IMAGE_PLACEHOLDER}); repeatable")
    if layout == "sequences":
        p.add_argument("--no-image-loss", action="store_true", help="no loss on image codes inside answers")
        p.add_argument("--image-layout", choices=("fixed", "shaped"), default=SequenceConfig.image_layout,
                       help="fixed: Chameleon's boi + codes + eoi, one square grid; shaped: blocks carry their height, width "
                            "and end-of-lines, so non-square grids (image_tokenize --aspect keep) train (README, 'Non-square images')")
    p.add_argument("--max-length", type=int, default=SequenceConfig.max_length, help=f"{MAX_LENGTH[layout]}; 0: no limit")
    p.add_argument("--max-row-bytes", type=int, default=BuildConfig.max_row_bytes,
                   help="a longer JSONL line (or parquet row's text) is that row's error, never read whole")
    p.add_argument("--codes-per-image", type=int, help="codes every image must have (default: the VQGAN grid, or the images' one shared count)")
    p.add_argument("--codebook-size", type=int, help="VQGAN codebook size when --ckpt is not given (codes must lie below it)")
    columns = p.add_mutually_exclusive_group()
    columns.add_argument("--keep", nargs="*", metavar="COL",
                         help="pass only these input columns through (default: every column the builder does not read)")
    columns.add_argument("--drop", nargs="+", default=[], metavar="COL", help="pass every unread input column through but these")
    p.add_argument("--workers", type=int, default=BuildConfig.workers, help="processes; each takes whole input files")
    p.add_argument("--batch-size", type=int, default=BuildConfig.batch_size, help="rows per tokenizer call")
    p.add_argument("--rows-per-shard", type=int, default=BuildConfig.rows_per_shard)
    p.add_argument("--strict", action="store_true", help="fail on the first rejected row")
    p.add_argument("--resume", action="store_true", help="keep input files an earlier build finished unchanged; build the rest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace, layout: str) -> BuildConfig:
    sequence = SequenceConfig(
        placeholders=(IMAGE_PLACEHOLDER, *args.attachment_token),
        image_loss=not getattr(args, "no_image_loss", False),
        max_length=args.max_length or None,
        codes_per_image=args.codes_per_image,
        codebook_size=args.codebook_size,
        image_layout=getattr(args, "image_layout", SequenceConfig.image_layout),
    )
    return BuildConfig.from_flags(args, sequence, layout=layout)


def run_build(argv: list[str] | None, prog: str, doc: str, layout: str) -> int:
    """Parse, build, and print the build's summary to stderr: the whole ``main`` of either build program."""
    args = build_parser(prog, doc.split("\n")[0], layout).parse_args(argv)
    print(timed_build(config_from_args(args, layout)), file=sys.stderr)
    return 0
