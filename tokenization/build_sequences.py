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

import sys

from medmax.cli import program

from .build_flags import run_build


@program("medmax-build-sequences")
def main(argv: list[str] | None = None) -> int:
    return run_build(argv, "medmax-build-sequences", __doc__, "sequences")


if __name__ == "__main__":
    sys.exit(main())
