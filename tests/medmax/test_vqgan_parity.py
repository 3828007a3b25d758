"""The VQGAN against taming-transformers' modules on the same tiny weights, and checkpoint loading."""

from __future__ import annotations

import argparse
import copy
import json
import shutil

import pytest
import torch
import yaml
from torch import nn

from medmax.presets import VQGAN_PRESETS
from medmax.vqgan import VQGAN, UntrustedCheckpointError, load_vqgan

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

# The tiny preset has no attention below the middle block; this variant also covers attention in the up/down path.
TINY_WITH_ATTN = copy.deepcopy(VQGAN_PRESETS["tiny"])
TINY_WITH_ATTN["ddconfig"]["attn_resolutions"] = [16]


class TamingVQ(nn.Module):
    """taming's VQModel without its loss: the modules MedMax's reference pipeline runs."""

    def __init__(self, params: dict):
        super().__init__()
        dd = params["ddconfig"]
        self.encoder = taming_model.Encoder(**dd)
        self.decoder = taming_model.Decoder(**dd)
        self.quantize = taming_quantize.VectorQuantizer2(params["n_embed"], params["embed_dim"], beta=0.25, legacy=True)
        self.quant_conv = nn.Conv2d(dd["z_channels"], params["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(params["embed_dim"], dd["z_channels"], 1)

    def codes(self, pixels):  # (B, 3, H, W) -> (B, h*w)
        _, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(pixels)))
        return indices.view(pixels.shape[0], -1)

    def decode(self, codes, grid):  # (B, h*w) -> (B, 3, H, W)
        z = self.quantize.get_codebook_entry(codes.reshape(-1), (codes.shape[0], *grid, self.quantize.e_dim))
        return self.decoder(self.post_quant_conv(z))


def _codebook_from_encoder_outputs(model: VQGAN) -> None:
    """Random codes are all far from a random encoder's outputs (every pixel picks one code); draw the codebook
    from real encoder outputs plus noise instead, so that nearest-code search has close competitors."""
    with torch.no_grad():
        hidden = model.quant_conv(model.encoder(torch.rand(4, 3, 64, 64) * 2 - 1))  # (4, D, 8, 8)
        vectors = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
        pick = torch.randint(0, vectors.shape[0], (model.n_embed,))
        spread = vectors.std() * 0.5
        model.quantize.embedding.weight.copy_(vectors[pick] + spread * torch.randn(model.n_embed, vectors.shape[1]))


def _pair(params: dict, seed: int = 0) -> tuple[VQGAN, TamingVQ]:
    torch.manual_seed(seed)
    ours = VQGAN.from_params(params)
    _codebook_from_encoder_outputs(ours)
    reference = TamingVQ(params).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, reference


@pytest.mark.parametrize("params", [VQGAN_PRESETS["tiny"], TINY_WITH_ATTN], ids=["tiny", "tiny-attn"])
def test_codes_identical_to_taming(params):
    ours, reference = _pair(params)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = reference.codes(pixels)
    got = ours.encode_codes(pixels)
    assert got.shape == (3, 64) and got.dtype == torch.long
    assert len(set(got.flatten().tolist())) > 10  # not a degenerate all-one-code case
    assert torch.equal(got, expected)


@pytest.mark.parametrize("params", [VQGAN_PRESETS["tiny"], TINY_WITH_ATTN], ids=["tiny", "tiny-attn"])
def test_decode_matches_taming(params):
    ours, reference = _pair(params, seed=1)
    codes = torch.randint(0, params["n_embed"], (2, 64))
    with torch.no_grad():
        expected = reference.decode(codes, ours.grid_shape)
    got = ours.decode_codes(codes)
    assert got.shape == (2, 3, 64, 64)
    assert (got - expected).abs().max().item() < 1e-4


def test_prepare_for_encoding_keeps_fp32_codes_exact(tiny_vqgan):
    model = copy.deepcopy(tiny_vqgan)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = tiny_vqgan.encode_codes(pixels)
    assert torch.equal(model.prepare_for_encoding(dtype=torch.float32).encode_codes(pixels), expected)
    bf16 = copy.deepcopy(tiny_vqgan).prepare_for_encoding(dtype=torch.bfloat16)
    assert bf16.quantize.embedding.weight.dtype == torch.float32 and bf16.encoder.conv_in.weight.dtype == torch.bfloat16
    codes = bf16.encode_codes(pixels)
    assert codes.shape == expected.shape and int(codes.min()) >= 0 and int(codes.max()) < tiny_vqgan.n_embed


def _taming_state(model: VQGAN) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # taming keeps its GAN loss in the ckpt
    state["loss.logvar"] = torch.zeros(())
    return state


def _write_release_layout(root, model: VQGAN, extra=None):
    """CKPT/tokenizer/vqgan.{yaml,ckpt} as Chameleon / Anole / MedMax ship it."""
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    doc = {"model": {"target": "taming.models.vqgan.VQModel", "params": {**model.params, "lossconfig": {"target": "x"}}}}
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    torch.save({"state_dict": _taming_state(model), **(extra or {})}, folder / "vqgan.ckpt")
    return root


def test_loads_release_ckpt_ignoring_loss_keys(tiny_vqgan, tmp_path):
    loaded = load_vqgan(_write_release_layout(tmp_path / "ckpt", tiny_vqgan, {"global_step": 7}))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode_codes(pixels), tiny_vqgan.encode_codes(pixels))
    assert loaded.decoder is not None


def test_loads_hf_chameleon_folder_encoder_only(tiny_vqgan, tiny_model_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):  # without vqgan/: only model.vqmodel.* is left
        shutil.copy(tiny_model_dir / name, hf / name)
    assert "vq_config" in json.loads((hf / "config.json").read_text())
    loaded = load_vqgan(hf)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode_codes(pixels), tiny_vqgan.encode_codes(pixels))
    assert loaded.decoder is None
    with pytest.raises(RuntimeError, match="without decoder"):
        loaded.decode_codes(torch.zeros(1, 64, dtype=torch.long))


def test_pickle_needing_code_is_refused_unless_trusted(tiny_vqgan, tmp_path):
    ckpt = _write_release_layout(tmp_path / "ckpt", tiny_vqgan, {"hparams": argparse.Namespace(lr=1.0)})
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        load_vqgan(ckpt)
    loaded = load_vqgan(ckpt, trust_checkpoint=True)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode_codes(pixels), tiny_vqgan.encode_codes(pixels))


@pytest.mark.parametrize("size", [(96, 64), (40, 130)], ids=["96x64", "40x130"])
def test_non_square_codes_and_decoding_match_taming(size):
    """--aspect keep: the codes of a non-square image are taming's encoder's on the same preprocessed pixels."""
    from PIL import Image

    from medmax.image_layout import grid_budget, pick_grid
    from medmax.images import preprocess

    ours, reference = _pair(VQGAN_PRESETS["tiny"], seed=2)
    image = Image.fromarray((torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy())
    pixels = preprocess(image, 64, keep_aspect_factor=ours.downsampling)[None]  # (1, 3, H, W)
    h, w = pick_grid(*size, grid_budget(64, ours.downsampling))
    assert pixels.shape[2:] == (h * 8, w * 8) and h != w and h * w <= 64
    with torch.no_grad():
        expected = reference.codes(pixels)
        decoded = reference.decode(expected, (h, w))
    got = ours.encode_codes(pixels)
    assert got.shape == (1, h * w) and torch.equal(got, expected)
    mine = ours.decode_codes(got, (h, w))
    assert mine.shape == (1, 3, h * 8, w * 8) and (mine - decoded).abs().max().item() < 1e-4
