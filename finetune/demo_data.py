"""Write a small synthetic sequence folder, so a training config can run before any real data exists.

Usage::

    python -m finetune.demo_data --output runs/demo/data --tokenizer preset:tiny --sequences 64

Each sequence is ``<s> <image: boi, random codes, eoi> question <end of turn> answer </s>`` (the one
prompt layout of ``medmax.prompting``, as generation and evaluation build prompts) where the
answer says whether the image was drawn from the "lesion" palette (codes 0..63, answer "Yes.") or
the "normal" one (codes 64..127, "No."), so a small model learns it in a few steps; loss only on the answer. With ``--image-targets`` the codes themselves carry the loss (image generation data).
The tiny tokenizer (``preset:tiny``) is written next to the data as ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from medmax.cli import program
from medmax.data.shards import write_sequences
from medmax.presets import resolve_tokenizer
from medmax.prompting import END_OF_TURN, prompt_segments
from medmax.vocab import IGNORE_INDEX, Vocabulary

logger = logging.getLogger("finetune.demo_data")

QUESTION = "Is there a lesion in the image?"


def demo_rows(tokenizer, n: int, n_codes: int = 64, seed: int = 0, image_targets: bool = False,
              lengths: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """``n`` (input_ids, labels) pairs; ``lengths`` (optional) sets each sequence's image length instead."""
    vocab = Vocabulary.from_tokenizer(tokenizer)
    rng = np.random.default_rng(seed)
    question = tokenizer.encode(QUESTION, add_special_tokens=False).ids
    answers = {0: tokenizer.encode("No.", add_special_tokens=False).ids,
               1: tokenizer.encode("Yes.", add_special_tokens=False).ids}
    rows = []
    for k in range(n):
        count = n_codes if lengths is None else max(1, lengths[k] - len(question) - 7)
        lesion = int(rng.integers(0, 2))
        codes = rng.integers(0, 64, size=count) + (0 if lesion else 64)
        image = [vocab.boi_id, *vocab.codes_to_ids(codes).tolist(), vocab.eoi_id]
        prompt = [vocab.bos_id]
        for seg in prompt_segments(QUESTION, [image], end_of_turn=True):  # the one layout: image, question, eot
            if isinstance(seg, str):
                prompt += question
            elif seg is END_OF_TURN:
                prompt.append(vocab.eot_id)
            else:
                prompt += seg
        answer = answers[lesion] + [vocab.eos_id]
        labels = [IGNORE_INDEX] * len(prompt) + (answer if not image_targets else [IGNORE_INDEX] * len(answer))
        if image_targets:  # the codes and eoi carry the loss
            start = prompt.index(vocab.boi_id) + 1
            labels[start : start + len(image) - 1] = image[1:]
        rows.append((prompt + answer, labels))
    return rows


@program("finetune.demo_data")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write (part-*.parquet + manifest.json)")
    parser.add_argument("--tokenizer", default="preset:tiny", help="tokenizer.json, or preset:tiny")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--codes", type=int, default=64, help="image codes per sequence")
    parser.add_argument("--image-targets", action="store_true", help="put the loss on the image codes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = resolve_tokenizer(args.tokenizer)
    rows = demo_rows(tokenizer, args.sequences, args.codes, args.seed, args.image_targets)
    folder = write_sequences(args.output, rows, Vocabulary.from_tokenizer(tokenizer).special_ids())
    tokenizer.save(str(Path(args.output) / "tokenizer.json"))
    logger.info("wrote %d sequences to %s", len(rows), folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
