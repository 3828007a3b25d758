"""Shared tiny fixtures: a tokenizer with the real Chameleon id layout, a tiny VQGAN and a tiny model folder."""

from __future__ import annotations

import logging

import pytest
import torch

from medmax.presets import VQGAN_PRESETS, build_tiny_tokenizer, make_model_dir
from medmax.vocab import Vocabulary
from medmax.vqgan import VQGAN, save_vqgan


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tiny_tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vocab(tiny_tokenizer):
    return Vocabulary.from_tokenizer(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_vqgan():
    torch.manual_seed(1234)
    return VQGAN.from_params(VQGAN_PRESETS["tiny"])


@pytest.fixture(scope="session")
def tiny_vqgan_dir(tiny_vqgan, tmp_path_factory):
    """A folder with vqgan.yaml + vqgan.safetensors."""
    return save_vqgan(tiny_vqgan, tmp_path_factory.mktemp("vqgan"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_vqgan, tmp_path_factory):
    """A model folder as finetune.export writes it: tiny Chameleon, tokenizer.json, vqgan/."""
    return make_model_dir(tmp_path_factory.mktemp("model"), "tiny", vqgan=tiny_vqgan, seed=0)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
