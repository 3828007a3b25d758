"""Original Chameleon layout + transformers-converted model -> a model folder that keeps the VQGAN decoder."""

from __future__ import annotations

import pytest
import torch
import yaml

from finetune.convert import main as convert_main
from medmax.model import load_model_dir, new_model
from medmax.presets import VQGAN_PRESETS
from medmax.vqgan import VQGAN


def _original_layout(root, vqgan, tokenizer):
    """CKPT/tokenizer/{vqgan.yaml, vqgan.ckpt, text_tokenizer.json} as Chameleon ships them."""
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                  "params": vqgan.params}}))
    state = dict(vqgan.state_dict())
    state["loss.discriminator.weight"] = torch.zeros(2)  # training leftovers the loader ignores
    torch.save({"state_dict": state}, folder / "vqgan.ckpt")
    tokenizer.save(str(folder / "text_tokenizer.json"))
    return root


def _hf_folder(path, tokenizer, vqgan):
    """What transformers' converter writes: the transformer with the VQGAN encoder only."""
    new_model("tiny", tokenizer, vqgan, seed=1).save_pretrained(path)
    return path


def test_convert_keeps_the_decoder_and_tokenizer(tmp_path, tiny_tokenizer, tiny_vqgan):
    original = _original_layout(tmp_path / "ckpt", tiny_vqgan, tiny_tokenizer)
    hf = _hf_folder(tmp_path / "hf", tiny_tokenizer, tiny_vqgan)
    convert_main(["--original", str(original), "--hf-model", str(hf), "--output", str(tmp_path / "out"),
                  "--dtype", "float32"])
    bundle = load_model_dir(tmp_path / "out")
    for key, value in tiny_vqgan.state_dict().items():
        assert torch.equal(bundle.vqgan.state_dict()[key], value), key  # decoder included
    assert bundle.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()


def test_convert_refuses_a_model_from_another_vqgan(tmp_path, tiny_tokenizer, tiny_vqgan):
    original = _original_layout(tmp_path / "ckpt", tiny_vqgan, tiny_tokenizer)
    torch.manual_seed(99)
    other = VQGAN.from_params(VQGAN_PRESETS["tiny"])
    hf = _hf_folder(tmp_path / "hf", tiny_tokenizer, other)
    with pytest.raises(ValueError, match="model.vqmodel differs"):
        convert_main(["--original", str(original), "--hf-model", str(hf), "--output", str(tmp_path / "out")])
