"""A training run's record, ``medmax_run.json``: ``finetune.train`` writes it, ``finetune.export`` reads it.

It sits in the run's ``output_dir`` and in every ``checkpoint-N/`` of it, beside ``tokenizer.json``
(the run's tokenizer), and says where the pieces a model folder needs came from:

- ``mode``: ``full``, ``lora`` or ``image-alignment``; ``model``: the ``model`` setting the run started from;
- ``base_model``: (LoRA) the folder whose weights the adapters go on, else null;
- ``vqgan``: the complete VQGAN (``output_dir/vqgan``);
- ``tokenizer``: ``tokenizer.json``;
- ``fingerprint``: what ``--resume`` must find unchanged (dataset content, weights, validation, tokenizer, mode,
  starting model).

``base_model`` and ``vqgan`` are written relative to the folder holding the record when they lie inside
the run (so a run folder can be moved), and read back as absolute paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "medmax_run.json"
_PATHS = ("base_model", "vqgan")


def write_run_info(folder: Path, info: dict, tokenizer) -> None:
    """Record in a checkpoint where its base model and VQGAN live (relative when inside the run), and its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    record = dict(info)
    for key in _PATHS:
        if record.get(key):
            record[key] = os.path.relpath(Path(record[key]).resolve(), folder.resolve())
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2))


def read_run_info(checkpoint: Path) -> dict:
    """The record of a run folder or checkpoint, its paths made absolute; a folder without one is refused."""
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {checkpoint} a folder written by finetune.train?")
    info = json.loads(path.read_text())
    for key in _PATHS:
        if info.get(key):
            info[key] = str((checkpoint / info[key]).resolve())
    return info
