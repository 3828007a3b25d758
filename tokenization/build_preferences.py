"""Build a preference folder (prompt / chosen / rejected token ids) for DPO from preference rows.

Usage::

    python -m tokenization.build_preferences \\
        --input runs/prefs/preferences.jsonl \\
        --tokenizer CKPT/tokenizer/text_tokenizer_modified.json \\
        --image-tokens runs/image_tokens --image-root data --ckpt runs/model/vqgan \\
        --output runs/prefs/folder --max-length 4096

    # then train on it: finetune/launch.sh finetune/configs/dpo_7b.yaml datasets=[runs/prefs/folder]

A row (JSONL or parquet)::

    {"prompt": "<image>Is there a lesion?", "images": ["images/a.png"], "chosen": "yes", "rejected": "no",
     "weight": 0.8}
    {"prompt": "Generate a scan: ...", "chosen": {"image": "images/a.png"}, "rejected": {"image_tokens": [5, 17, ...]}}

``images`` are paths (looked up in ``--image-tokens``, or read under ``--image-root`` and encoded with
``--ckpt``), image bytes, or code lists; a continuation is text, or an object with one of ``text``,
``image`` (path or bytes) or ``image_tokens`` (codes); ``weight`` (default 1) multiplies the pair's loss.
``python -m finetune.make_preferences`` writes such rows from a VQA set.

The folder is a sequence folder (``medmax.data.shards``) with ``"layout": "preferences"`` in its
manifest and shards of ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``weight``, ``length`` and
``format`` (the ids in the same vocabulary and image blocks as ``tokenization.build_sequences`` gives the
same row, see ``medmax.data.preferences``), then the passthrough columns. It is built exactly like a sequence
folder: beside itself and swapped in when complete, ``errors.jsonl`` listing each rejected row (file,
row, id, kind, reason), ``--strict`` stopping at the first, ``--resume`` keeping unchanged input files,
and the same refusals of an ``--output`` that holds inputs or foreign files. A pair longer than
``--max-length`` (prompt plus the longer continuation) is dropped and counted, never cut.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medmax.cli import program
from medmax.data.build import BuildConfig, timed_build
from medmax.data.rows import SequenceConfig

logger = logging.getLogger("tokenization.build_preferences")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medmax-build-preferences", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL / parquet files of preference rows, folders, or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a checkpoint folder")
    p.add_argument("--output", required=True, help="output folder (built beside it, swapped in when complete)")
    p.add_argument("--image-tokens", nargs="*", default=[], metavar="DIR", help="folders written by tokenization.image_tokenize")
    p.add_argument("--ckpt", help="VQGAN checkpoint (or model folder) to encode image bytes or --image-root paths")
    p.add_argument("--image-root", help="with --ckpt: read image paths missing from --image-tokens under this folder")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint (runs code from it)")
    p.add_argument("--max-length", type=int, default=SequenceConfig.max_length,
                   help="drop pairs whose prompt plus longer continuation is longer; 0: no limit")
    p.add_argument("--max-row-bytes", type=int, default=BuildConfig.max_row_bytes)
    p.add_argument("--codes-per-image", type=int, help="codes every image must have (default: the VQGAN grid or the first image)")
    p.add_argument("--codebook-size", type=int, help="VQGAN codebook size when --ckpt is not given")
    columns = p.add_mutually_exclusive_group()
    columns.add_argument("--keep", nargs="*", metavar="COL", help="pass only these input columns through")
    columns.add_argument("--drop", nargs="+", default=[], metavar="COL", help="pass every unread column through but these")
    p.add_argument("--workers", type=int, default=BuildConfig.workers, help="processes; each takes whole input files")
    p.add_argument("--batch-size", type=int, default=BuildConfig.batch_size)
    p.add_argument("--rows-per-shard", type=int, default=BuildConfig.rows_per_shard)
    p.add_argument("--strict", action="store_true", help="fail on the first rejected row")
    p.add_argument("--resume", action="store_true", help="keep input files an earlier build finished unchanged")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    sequence = SequenceConfig(max_length=args.max_length or None, codes_per_image=args.codes_per_image,
                              codebook_size=args.codebook_size)
    return BuildConfig.from_flags(args, sequence, layout="preferences")


@program("medmax-build-preferences")
def main(argv=None) -> int:
    args = parse_args(argv)
    print(timed_build(config_from_args(args)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
