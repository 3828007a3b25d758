"""taming's VQGAN objective: the adaptive weight, the discriminator and its losses, LPIPS from a local file, the metrics.

Tiny models throughout (the tiny 64 px VQGAN preset, an 8-filter discriminator, an LPIPS with 4-8 channels); the
LPIPS stand-in file is built here with the key layout of taming's ``LPIPS`` state dict
(``net.slice1.0.weight`` ..., ``lin0.model.1.weight``, ``scaling_layer.shift``), which is also the
``lpips`` package's (plus its duplicate ``lins.*`` keys), and torchvision's ``features.N.weight``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from medmax.perceptual import LPIPS, load_lpips
from medmax.presets import VQGAN_PRESETS
from medmax.torch_files import CheckpointError
from medmax.vqgan import VQGAN
from medmax.vqgan_eval import lesion_survival, perplexity, psnr, ssim
from medmax.vqgan_objective import (
    PatchDiscriminator,
    adaptive_weight,
    gan_active,
    generator_loss,
    hinge_d_loss,
    init_discriminator,
    vanilla_d_loss,
)

WIDTHS = (4, 8, 8, 8, 8)


def _vqgan(seed=0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN.from_params(VQGAN_PRESETS["tiny"]).train()


def _disc(seed=0) -> PatchDiscriminator:
    return init_discriminator(PatchDiscriminator(3, ndf=8, n_layers=2), torch.Generator().manual_seed(seed)).train()


def _losses(vqgan, disc, x):
    """nll (L1) and g_loss = -mean(D(x_rec)) of one forward."""
    quant, _, _ = vqgan.quantize(vqgan.quant_conv(vqgan.encoder(x)))
    recon = vqgan.decoder(vqgan.post_quant_conv(quant))
    return (recon - x).abs().mean(), generator_loss(disc(recon))


def test_adaptive_weight_equals_an_independent_computation():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    vqgan, disc = _vqgan(), _disc()
    nll, g = _losses(vqgan, disc, x)
    got = adaptive_weight(nll, g, vqgan.decoder.conv_out.weight, disc_weight=0.8)

    # independently: each loss's gradient at the last layer by its own backward pass on a fresh forward
    last = vqgan.decoder.conv_out.weight
    grads = []
    for pick in (0, 1):
        vqgan.zero_grad(set_to_none=True)
        _losses(vqgan, disc, x)[pick].backward()
        grads.append(last.grad.detach().clone())
    ratio = grads[0].pow(2).sum().sqrt() / (grads[1].pow(2).sum().sqrt() + 1e-4)
    expected = 0.8 * min(max(float(ratio), 0.0), 1e4)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert not got.requires_grad  # detached, as taming's


def test_adaptive_weight_is_clamped():
    w = torch.ones(3, requires_grad=True)
    nll = (w * 1e6).sum()
    g = (w * 1e-9).sum()  # a vanishing generator gradient
    assert float(adaptive_weight(nll, g, w, disc_weight=1.0)) == pytest.approx(1e4)


def test_discriminator_matches_tamings_nlayer_discriminator():
    taming = pytest.importorskip("taming.modules.discriminator.model")
    ours = _disc(3)
    theirs = taming.NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2)
    theirs.load_state_dict(ours.state_dict())  # same module names and shapes
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    assert ours(x).shape == (2, 1, 6, 6)  # a patch of logits, not one number


def test_discriminator_init_follows_tamings_weights_init():
    disc = PatchDiscriminator(3, ndf=64, n_layers=3)
    init_discriminator(disc, torch.Generator().manual_seed(0))
    conv, bn = disc.main[2].requires_grad_(False), disc.main[3].requires_grad_(False)
    assert abs(float(conv.weight.std()) - 0.02) < 0.002 and abs(float(conv.weight.mean())) < 0.002
    assert abs(float(bn.weight.mean()) - 1.0) < 0.01 and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_gan_losses_and_switch_on_step():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    sp = torch.nn.functional.softplus
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(float(0.5 * (sp(-real).mean() + sp(fake).mean())))
    # taming: adopt_weight zeroes the GAN while global_step (steps done before this one) < disc_start
    assert [gan_active(step, 3) for step in (1, 3, 4, 5)] == [False, False, True, True]
    assert gan_active(1, 0) and not gan_active(10**6, None)


# ------------------------------------------------------------------------------------------- LPIPS


def _lpips_state(seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LPIPS(WIDTHS)
    for p in model.parameters():
        p.data.uniform_(0.0, 0.2)  # the linear heads are non-negative in the released weights
    return {k: v.clone() for k, v in model.state_dict().items()}


def _tamings_keys(state: dict) -> dict:
    """The state dict as taming's (and the lpips package's) LPIPS holds it: scaling-layer buffers and lins.* too."""
    extra = {"scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None],
             "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]}
    lins = {f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"].clone() for k in range(5)}
    return {**state, **extra, **lins}


def test_lpips_loads_a_local_safetensors_file_in_tamings_layout(tmp_path):
    state = _tamings_keys(_lpips_state())
    save_file(state, str(tmp_path / "lpips.safetensors"))
    model = load_lpips(tmp_path / "lpips.safetensors")
    assert model.net.slice1[0].weight.shape == (4, 3, 3, 3)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d = model(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert torch.allclose(model(x, x), torch.zeros(2, 1, 1, 1))
    assert not any(p.requires_grad for p in model.parameters())


def test_lpips_reads_torchvision_vgg_keys_and_weights_only_torch_files(tmp_path):
    state = _lpips_state(1)
    torchvision = {}
    for key, value in state.items():
        if key.startswith("net."):
            torchvision["features." + key.split(".", 2)[2]] = value
        else:
            torchvision[key] = value
    torch.save(torchvision, tmp_path / "vgg_lpips.pth")
    save_file(state, str(tmp_path / "ref.safetensors"))
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(load_lpips(tmp_path / "vgg_lpips.pth")(x, y), load_lpips(tmp_path / "ref.safetensors")(x, y))


def test_lpips_refuses_pickles_and_incomplete_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"lin0.model.1.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_lpips(tmp_path / "evil.pth")
    state = _lpips_state()
    del state["lin3.model.1.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="lin3.model.1.weight"):
        load_lpips(tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError, match="--perceptual-weights"):
        load_lpips(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------------------- metrics


def test_psnr_ssim_and_perplexity_on_known_cases():
    x = torch.rand(2, 3, 24, 24)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert (ssim(x, (x + 0.3 * torch.rand_like(x)).clamp(0, 1)) < 0.95).all()
    assert float(psnr(x, x + 0.1)[0]) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB
    assert perplexity(torch.tensor([5, 5, 5, 5, 0])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([9, 0, 0])) == pytest.approx(1.0)


def test_lesion_survival_counts_bright_blobs_kept_in_place():
    from medmax.images import preprocess
    from medmax.synthetic import make_scans

    scans = [s for s in make_scans(12, seed=5, size=64) if s.lesion][:3]
    x = torch.stack([preprocess(s.image, 64) for s in scans])
    assert lesion_survival(x, x) == (3, 3)
    flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # a decoder that erased everything
    assert lesion_survival(x, flat) == (3, 0)
