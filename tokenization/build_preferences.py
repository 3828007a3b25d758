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

import sys

from medmax.cli import program

from .build_flags import run_build


@program("medmax-build-preferences")
def main(argv: list[str] | None = None) -> int:
    return run_build(argv, "medmax-build-preferences", __doc__, "preferences")


if __name__ == "__main__":
    sys.exit(main())
