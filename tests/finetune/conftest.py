"""Fixtures shared by the fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.demo_data import demo_rows
from medmax.data.shards import write_sequences


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    """A sequence folder of 16 demo rows (32 image codes each): a few training steps of the tiny model."""
    return write_sequences(tmp_path_factory.mktemp("seq"), demo_rows(tiny_tokenizer, 16, n_codes=32),
                           tiny_vocab.special_ids())


@pytest.fixture(scope="module")
def yes_no_preferences(tiny_tokenizer_path):
    """``make(root, n) -> folder``: a preference folder of ``n`` yes/no pairs built by build_preferences in ``root``."""
    from tokenization.build_preferences import main as build_preferences

    def make(root: Path, n: int) -> Path:
        rows = [{"prompt": f"Is there a lesion in scan {i}?", "chosen": "yes" if i % 2 else "no",
                 "rejected": "no" if i % 2 else "yes"} for i in range(n)]
        (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_preferences(["--input", str(root / "rows.jsonl"), "--tokenizer", str(tiny_tokenizer_path), "--output",
                           str(root / "prefs"), "--no-progress", "--strict"])
        return root / "prefs"

    return make
