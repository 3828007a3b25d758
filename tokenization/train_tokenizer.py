"""Fit a BPE text tokenizer to your own corpus, keeping Chameleon's special-token and image-code ids.

Usage::

    # the text of MedMax rows / conversations (columns text, conversations) in JSONL, parquet or CSV files
    python -m tokenization.train_tokenizer --input data/train.jsonl --output runs/tokenizer --text-vocab-size 8000
    # reports in a CSV (column findings), plus plain text files (one text a line)
    python -m tokenization.train_tokenizer --input reports.csv notes/ --column findings --output runs/tokenizer \\
        --text-vocab-size 16000 --min-frequency 3

    # then, as any tokenizer: python -m tokenization.build_sequences ... --tokenizer runs/tokenizer/tokenizer.json

``--input`` takes files, folders (their ``.jsonl``, ``.json``, ``.parquet``, ``.csv`` and ``.txt`` files)
and glob patterns. The text is read from ``--column`` (default ``text`` and ``conversations``: a string, or
a list of strings or of role/content or from/value turns); a ``.txt`` file gives one text a line. The
``<image>`` and ``<reserved08706>`` markers are structure, not text, and are left out
(``medmax.data.corpus``).

The tokenizer (``medmax.tokenizer_training``): ids 0..8711 are Chameleon's (``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, the 8192 image codes at 4..8195, ``<eoss>`` 8196, ``<racm3:break>`` 8197, ``<reserved08706>``
8710, ``<image>`` 8711), then a byte-level BPE of at most ``--text-vocab-size`` tokens (the 256 bytes
included). A model made with it has ``8712 + text tokens`` rows of embeddings; its text ids are new, so a
model trained with another tokenizer's text ids must learn them again (README, "Your own data").

Writes into ``--output``: ``tokenizer.json``, ``summary.json`` (inputs, settings, rows, texts, sizes) and
``errors.jsonl`` (each row that gave no text: file, row, kind, reason; counted, never silently dropped;
``--strict`` stops at the first). An existing ``tokenizer.json`` is replaced only with ``--overwrite``;
an input is never an output. The fit is deterministic.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from medmax.cli import program
from medmax.errors import UserError

logger = logging.getLogger("tokenization.train_tokenizer")

OUTPUT_FILES = ("tokenizer.json", "summary.json", "errors.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-train-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="corpus files, folders or globs (.jsonl .json .parquet .csv .txt)")
    p.add_argument("--output", type=Path, required=True, help="folder for tokenizer.json, summary.json and errors.jsonl")
    p.add_argument("--column", nargs="+", help="the rows' text columns (default: text conversations)")
    p.add_argument("--text-vocab-size", type=int, default=8000,
                   help="text tokens at most, the 256 bytes included; the tokenizer has 8712 more ids (default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair seen fewer times is never merged (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT/tokenizer.json")
    p.add_argument("--strict", action="store_true", help="stop at the first row that gives no text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (there are none when stderr is not a terminal)")
    return p


def _inputs(args: argparse.Namespace) -> list[Path]:
    from medmax.data.corpus import CORPUS_SUFFIXES
    from medmax.data.inputs import find_inputs
    from medmax.tokenizer_training import BYTE_ALPHABET

    if args.text_vocab_size < BYTE_ALPHABET:
        raise UserError(f"--text-vocab-size must be at least {BYTE_ALPHABET} (the byte alphabet), got {args.text_vocab_size}")
    if args.min_frequency < 0:
        raise UserError(f"--min-frequency must be >= 0, got {args.min_frequency}")

    try:
        paths = find_inputs(args.input, CORPUS_SUFFIXES)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    outputs = {(args.output / name).resolve() for name in OUTPUT_FILES}
    clash = [p for p in paths if p.resolve() in outputs]
    if clash:
        raise UserError(f"--input {clash[0]} is an output file of --output {args.output}; write the tokenizer elsewhere")
    if (args.output / "tokenizer.json").exists() and not args.overwrite:
        raise FileExistsError(f"--output {args.output} already holds a tokenizer.json; pass --overwrite to replace it")
    return paths


def _write(args, paths: list[Path], tokenizer, counts, seconds: float) -> dict:
    from medmax.jsonl import write_atomic, write_jsonl

    args.output.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_jsonl(args.output / "errors.jsonl", counts.errors, sort_keys=False)
    summary = {"inputs": [{"path": str(p), "size": p.stat().st_size} for p in paths],
               "settings": {"columns": list(args.column), "text_vocab_size": args.text_vocab_size, "min_frequency": args.min_frequency},
               "rows": counts.rows, "texts": counts.texts, "characters": counts.characters, "rows_without_text": len(counts.errors),
               "errors_by_kind": dict(Counter(e["kind"] for e in counts.errors)), "vocab_size": tokenizer.get_vocab_size(),
               "seconds": round(seconds, 3)}
    write_atomic(args.output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _run(args: argparse.Namespace) -> int:
    from medmax.data.corpus import DEFAULT_COLUMNS
    from medmax.tokenizer_training import FIRST_TEXT_ID, fit_corpus

    args.column = tuple(args.column or DEFAULT_COLUMNS)
    paths = _inputs(args)
    logger.info("fitting a BPE of at most %d text tokens to %d file(s), columns %s", args.text_vocab_size, len(paths), list(args.column))
    start = time.perf_counter()
    bars = not args.no_progress and sys.stderr.isatty()  # tokenizers' bars leave blank lines in a log file
    tokenizer, counts = fit_corpus(paths, args.column, args.text_vocab_size, args.min_frequency, args.strict, bars)
    summary = _write(args, paths, tokenizer, counts, time.perf_counter() - start)
    if counts.errors:
        e = counts.errors[0]
        logger.warning("%d of %d rows gave no text (first: %s row %s: %s); listed in %s", len(counts.errors), counts.rows,
                       e["file"], e["row"], e["reason"], args.output / "errors.jsonl")
    logger.info("tokenizer of %d ids (%d Chameleon layout + %d text) from %d texts in %d rows, %.1f s; wrote %s",
                summary["vocab_size"], FIRST_TEXT_ID, summary["vocab_size"] - FIRST_TEXT_ID, counts.texts, counts.rows,
                summary["seconds"], args.output / "tokenizer.json")
    return 0


@program("medmax-train-tokenizer")
def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
