"""LPIPS, the perceptual distance taming's VQGAN loss adds to L1, loaded from one local weights file.

The network is LPIPS v0.1 "vgg" (Zhang et al. 2018) as taming-transformers uses it
(``taming/modules/losses/lpips.py``: ``LPIPS``, ``vgg16``, ``ScalingLayer``, ``NetLinLayer``):
inputs in [-1, 1] are shifted and scaled per channel, VGG16's five ReLU stages (relu1_2 ... relu5_3)
are unit-normalised along channels, their squared differences weighted by a 1x1 linear head per
stage, averaged over space and summed. The module tree and parameter names are taming's (and the
``lpips`` package's), so their state dicts load as they are.

Nothing is downloaded. :func:`load_lpips` reads a file the user made once, on a machine with internet
(see the README, "VQGAN fine-tuning"): a safetensors file, or a ``torch.save`` file loaded with
``weights_only=True`` (never unpickled), holding

- ``net.slice{1..5}.{i}.weight|bias`` (taming / lpips layout) or ``features.{i}.weight|bias``
  (torchvision's ``vgg16().features``), and
- ``lin{0..4}.model.1.weight`` (the linear heads; lpips' duplicate ``lins.*`` keys are ignored).

The widths are read from the file, so a test can build a tiny stand-in with the same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .torch_files import CheckpointError, load_torch_file

logger = logging.getLogger(__name__)

# taming lpips.py ScalingLayer: shift and scale of the [-1, 1] input, per RGB channel
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # taming lpips.py normalize_tensor: x / (||x|| + 1e-10)
# torchvision vgg16().features indices of the 3x3 convolutions, and where taming's five slices start
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
SLICE_STARTS = (0, 4, 9, 16, 23, 30)  # slice k holds features[SLICE_STARTS[k-1]:SLICE_STARTS[k]]
VGG16_WIDTHS = (64, 128, 256, 512, 512)  # taming LPIPS.chns


def _features(widths: tuple[int, ...]) -> list[nn.Module]:
    """torchvision's VGG16 ``features`` (convs, ReLUs, max-pools), up to relu5_3, with stage widths ``widths``."""
    convs_per_stage, layers, cin = (2, 2, 3, 3, 3), [], 3
    for stage, (n, width) in enumerate(zip(convs_per_stage, widths)):
        if stage:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        for _ in range(n):
            layers += [nn.Conv2d(cin, width, kernel_size=3, padding=1), nn.ReLU()]
            cin = width
    return layers


class LPIPS(nn.Module):
    """(B, 3, H, W) x (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1) perceptual distance; frozen, eval mode."""

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        layers = _features(tuple(widths))
        self.net = nn.Module()
        for k in range(5):
            stage = nn.Sequential()
            for i in range(SLICE_STARTS[k], SLICE_STARTS[k + 1]):
                stage.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k + 1}", stage)
        for k, width in enumerate(widths):  # NetLinLayer: Dropout (eval: identity) then a 1x1 conv without bias
            head = nn.Module()
            head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(width, 1, kernel_size=1, bias=False))
            setattr(self, f"lin{k}", head)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval, as taming keeps it (LPIPS().eval())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h0, h1 = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for k in range(5):
            stage = getattr(self.net, f"slice{k + 1}")
            h0, h1 = stage(h0), stage(h1)
            diff = (_unit(h0) - _unit(h1)) ** 2  # (B, C_k, H_k, W_k)
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(h: torch.Tensor) -> torch.Tensor:
    return h / (torch.sqrt((h**2).sum(dim=1, keepdim=True)) + NORM_EPS)


def _torchvision_to_taming(key: str) -> str:
    """``features.{i}.weight`` -> ``net.slice{k}.{i}.weight``; other keys unchanged."""
    if not key.startswith("features."):
        return key
    index = int(key.split(".")[1])
    stage = next(k for k in range(5) if SLICE_STARTS[k] <= index < SLICE_STARTS[k + 1])
    return f"net.slice{stage + 1}.{key.removeprefix('features.')}"


_NEVER_UNPICKLED = ("perceptual weights are never unpickled, whatever the flags: save the state dict "
                    "as safetensors, as the README's 'VQGAN fine-tuning' shows")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"--perceptual-weights {path}: not a readable safetensors file ({exc})") from None
    try:  # weights_only: a file that needs unpickling is refused, and no flag changes that
        state = load_torch_file(path, refusal=_NEVER_UNPICKLED)
    except CheckpointError as exc:
        raise CheckpointError(f"--perceptual-weights {exc}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--perceptual-weights {path}: not a state dict of tensors")
    return state


def load_lpips(path: str | Path) -> LPIPS:
    """An :class:`LPIPS` from one local weights file (see the module docstring); a wrong file names what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--perceptual-weights {path}: no such file")
    state = {_torchvision_to_taming(k): v for k, v in _read(path).items() if not k.startswith(("lins.", "scaling_layer."))}
    try:
        widths = tuple(int(state[f"lin{k}.model.1.weight"].shape[1]) for k in range(5))
    except KeyError as exc:
        raise CheckpointError(f"--perceptual-weights {path}: no {exc.args[0]} (expected LPIPS vgg linear heads lin0..lin4)") from None
    model = LPIPS(widths)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"--perceptual-weights {path}: {' '.join(str(exc).split())[:300]}") from None
    if missing:
        raise CheckpointError(f"--perceptual-weights {path}: missing {missing[:4]} (expected VGG16 features and LPIPS heads)")
    if unexpected:
        logger.warning("--perceptual-weights %s: ignoring %d keys that are not LPIPS (%s)", path, len(unexpected), unexpected[:4])
    return model.requires_grad_(False).eval()
