"""Build training sequences (input_ids + labels) from MedMax, conversation or pretraining rows.

Usage::

    python -m tokenization.build_sequences \\
        --input data/medmax_train.jsonl \\
        --tokenizer CKPT/tokenizer/text_tokenizer_modified.json \\
        --image-tokens runs/image_tokens \\
        --output runs/sequences --workers 4 --max-length 4096

    # conversations with image bytes in parquet (Hugging Face datasets' {"bytes", "path"} structs or a
    # binary column), tokenized on the fly with the VQGAN
    python -m tokenization.build_sequences --input data/chat/*.parquet --tokenizer CKPT \\
        --ckpt CKPT/tokenizer --attachment-token '<|reserved_special_token_0|>' --output runs/chat

Writes ``OUTPUT/part-*.parquet``, ``OUTPUT/manifest.json`` and ``OUTPUT/errors.jsonl`` (see
``medmax.data.shards``). The build runs in ``OUTPUT.partial`` beside the output and replaces ``OUTPUT``
only when complete; it deletes only files its manifest lists as its own, and refuses an ``--output``
that is or contains an input, or that holds files it did not write (``medmax.data.build_folder``).

Rows that cannot be built are listed in errors.jsonl (file, row number, the row's own id column when it
has one, kind, reason) and counted; ``--strict`` stops at the first one instead. Limits, each raisable:
``--max-length`` (default 4096 tokens, the finetune configs' length; 0 = none) truncates a longer
sequence at the end of its answer text or drops it, and the summary reports both; ``--max-row-bytes``
(default 4 MiB) makes a longer JSONL line, or parquet row's text, that row's error without reading it
whole. Invalid UTF-8 is the error of its row.

Every input column the builder does not read passes through to the shards with its type (strings,
numbers, booleans, bytes and lists of them; anything else as JSON text); ``--keep COL ...`` passes only
those columns (``--keep`` alone: none), ``--drop COL ...`` all but those.

Typed text never becomes a control token: ``</s>``, ``<racm3:break>``, ``<reserved08706>`` in a
conversation are text. The image placeholder (``<image>`` and ``--attachment-token``s) is the exception,
and in MedMax rows the end-of-turn ``<reserved08706>``; a backslash before one (``\\<image>``) writes it
literally. MedMax rows without typed control strings get MedMax's published ids exactly.

``--resume`` continues an interrupted build (or refreshes a finished one), keeping the input files
whose content, tokenizer file, image-token folders, VQGAN weights and settings are unchanged, and
rebuilding the others.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medmax.cli import program
from medmax.data.build import BuildConfig, timed_build
from medmax.data.rows import SequenceConfig
from medmax.vocab import IMAGE_PLACEHOLDER

logger = logging.getLogger("tokenization.build_sequences")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medmax-build-sequences", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL / parquet files, folders of them, or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. text_tokenizer_modified.json) or a checkpoint folder")
    p.add_argument("--output", required=True,
                   help="output folder: built beside it (OUTPUT.partial) and swapped in when complete; must not hold the inputs")
    p.add_argument("--image-tokens", nargs="*", default=[], metavar="DIR", help="folders written by tokenization.image_tokenize")
    p.add_argument("--ckpt", help="VQGAN checkpoint (or model folder) to encode image bytes in rows on the fly")
    p.add_argument("--image-root", help="with --ckpt: read image paths missing from --image-tokens under this folder")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint (runs code from it)")
    p.add_argument("--attachment-token", action="append", default=[], metavar="STR",
                   help=f"extra image placeholder in conversation / pretraining text (besides {IMAGE_PLACEHOLDER}); repeatable")
    p.add_argument("--no-image-loss", action="store_true", help="no loss on image codes inside answers")
    p.add_argument("--max-length", type=int, default=SequenceConfig.max_length,
                   help="truncate longer sequences at the end of answer text, or drop rows that cannot be cut there; 0: no limit")
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
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    sequence = SequenceConfig(
        placeholders=(IMAGE_PLACEHOLDER, *args.attachment_token),
        image_loss=not args.no_image_loss,
        max_length=args.max_length or None,
        codes_per_image=args.codes_per_image,
        codebook_size=args.codebook_size,
    )
    return BuildConfig.from_flags(args, sequence)


@program("medmax-build-sequences")
def main(argv=None) -> int:
    args = parse_args(argv)
    print(timed_build(config_from_args(args)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
