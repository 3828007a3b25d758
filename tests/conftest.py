"""Shared tiny fixtures: a tokenizer with the real Chameleon id layout, a tiny VQGAN and a tiny model folder; random
Inception-v3 weights in torch-fidelity's layout."""

from __future__ import annotations

import importlib.util
import logging
from unittest import mock

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


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A .pth file in the layout of torch-fidelity's Inception-v3 weights (its own module's state dict), seeded random
    values: convolutions He-initialised and batch norms given random statistics, so that pool3 features stay of order
    one through the network's depth (the default initialisation shrinks them towards zero). Nothing is downloaded: the
    constructor's loading is bypassed while the network is built. Full size (the layout is fixed): 96 MB, about 0.5 s."""
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (make install adds it with --no-deps)")
    from medmax.image_metrics import INCEPTION_LAYER, INCEPTION_NAME, torch_fidelity_inception

    module = torch_fidelity_inception()
    cls = module.FeatureExtractorInceptionV3
    with mock.patch.object(module, "load_state_dict_from_url", return_value={}), mock.patch.object(cls, "load_state_dict"):
        net = cls(INCEPTION_NAME, [INCEPTION_LAYER])
    g = torch.Generator().manual_seed(0)
    for layer in net.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=g)
        elif isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.normal_(0, 0.1, generator=g)
            layer.running_var.uniform_(0.5, 1.5, generator=g)
            layer.weight.data.uniform_(0.5, 1.5, generator=g)
            layer.bias.data.normal_(0, 0.1, generator=g)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
