"""Fixtures shared by the fine-tuning tests."""

from __future__ import annotations

import pytest

from finetune.demo_data import demo_rows
from medmax.data.shards import write_sequences


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    """A sequence folder of 16 demo rows (32 image codes each): a few training steps of the tiny model."""
    return write_sequences(tmp_path_factory.mktemp("seq"), demo_rows(tiny_tokenizer, 16, n_codes=32),
                           tiny_vocab.special_ids())
