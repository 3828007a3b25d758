"""taming-transformers' VQGAN objective: reconstruction (+ LPIPS), codebook, and a PatchGAN with adaptive weight.

Written from the formulas and constants of taming's published code, each cited where it is used:

- ``taming/modules/losses/vqperceptual.py``: ``VQLPIPSWithDiscriminator`` (``forward``: the
  reconstruction term ``|x - x_rec| + perceptual_weight * LPIPS`` averaged, the generator loss
  ``-mean(D(x_rec))``, the total ``nll + d_weight * disc_factor * g_loss + codebook_weight * q_loss``;
  ``calculate_adaptive_weight``), ``adopt_weight``, ``hinge_d_loss``, ``vanilla_d_loss``;
- ``taming/modules/discriminator/model.py``: ``NLayerDiscriminator`` and ``weights_init``;
- ``taming/models/vqgan.py``: ``VQModel.get_last_layer`` (``decoder.conv_out.weight``),
  ``configure_optimizers`` (two Adams, betas (0.5, 0.9)), and ``beta=0.25`` for the quantizer
  (transformers' ``ChameleonVQVAEVectorQuantizer``, which :class:`medmax.vqgan.VQGAN` uses, has the
  same beta and taming's legacy arithmetic: ``mean((sg[q] - z)^2) + beta * mean((q - sg[z])^2)``).

:class:`PatchDiscriminator` keeps taming's module names (``main.0.weight`` ...), so a taming
discriminator's weights load into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL, PADDING = 4, 1  # NLayerDiscriminator: kw = 4, padw = 1
LEAKY_SLOPE = 0.2  # NLayerDiscriminator: nn.LeakyReLU(0.2, True)
MAX_WIDTH_MULT = 8  # NLayerDiscriminator: nf_mult = min(2 ** n, 8)
INIT_STD = 0.02  # weights_init: conv weights ~ N(0, 0.02); BatchNorm weights ~ N(1, 0.02), biases 0
ADAPTIVE_EPS = 1e-4  # calculate_adaptive_weight: norm(nll_grads) / (norm(g_grads) + 1e-4)
ADAPTIVE_MAX = 1e4  # calculate_adaptive_weight: clamp(d_weight, 0.0, 1e4)
TAMING_ADAM_BETAS = (0.5, 0.9)  # VQModel.configure_optimizers


class PatchDiscriminator(nn.Module):
    """taming's ``NLayerDiscriminator`` (pix2pix PatchGAN, BatchNorm): (B, C, H, W) -> (B, 1, h, w) logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, KERNEL, stride=2, padding=PADDING), nn.LeakyReLU(LEAKY_SLOPE, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # n_layers - 1 strided blocks, then one with stride 1
            prev, mult = mult, min(2**n, MAX_WIDTH_MULT)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, KERNEL, stride=stride, padding=PADDING, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(LEAKY_SLOPE, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


@torch.no_grad()
def init_discriminator(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """taming's ``weights_init``, drawn from ``generator`` (reproducible without touching the global seed)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.normal_(0.0, INIT_STD, generator=generator)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.normal_(1.0, INIT_STD, generator=generator)
            m.bias.zero_()
    return model


def gan_active(step: int, disc_start: int | None) -> bool:
    """Whether 1-based ``step`` includes the GAN losses: taming's ``adopt_weight`` zeroes them while
    ``global_step < disc_start``, and its ``global_step`` counts the steps done before this one."""
    return disc_start is not None and step - 1 >= disc_start


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4],
    detached, times ``disc_weight``; ``W`` is the decoder's last layer. Both graphs are kept for the backward."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + ADAPTIVE_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_MAX).detach() * disc_weight


def reconstruction_loss(pixel: torch.Tensor, perceptual: torch.Tensor | None, perceptual_weight: float) -> torch.Tensor:
    """taming's ``nll_loss``: mean(|x - x_rec| + perceptual_weight * LPIPS), i.e. the pixel mean plus the weighted LPIPS mean."""
    if perceptual is None:
        return pixel
    return pixel + perceptual_weight * perceptual.mean()
