"""How well a VQGAN reconstructs held-out images: PSNR, SSIM, codebook use, and whether small bright structures survive.

- PSNR and SSIM are computed on pixels mapped to [0, 1] (decoder output clamped, Chameleon's rule),
  per image, then averaged. SSIM is Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5,
  ``C1 = (0.01)^2``, ``C2 = (0.03)^2``, per channel, over the valid region.
- Codebook: how many distinct codes the images use, and the perplexity ``exp(entropy)`` of their
  code histogram (how many codes are used evenly).
- Lesion survival: on images where :func:`medmax.synthetic.locate_lesion` finds a bright blob
  (the quickstart's lesion scans), the share whose reconstruction still has it in the same quadrant
  and size class. A blurry decoder erases exactly these.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .vqgan import VQGAN, to_uint8

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
GRID_IMAGES = 8  # images in a reconstruction grid


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) PSNR in dB (capped at 100 dB for identical images)."""
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def _gaussian_window(channels: int) -> torch.Tensor:
    t = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()  # (C, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) mean SSIM; images smaller than the window use a window of their size."""
    c = x.shape[1]
    window = _gaussian_window(c).to(x)
    if min(x.shape[2:]) < SSIM_WINDOW:
        window = window[..., : min(x.shape[2:]), : min(x.shape[2:])]
        window = window / window.sum(dim=(2, 3), keepdim=True)
    blur = lambda t: F.conv2d(t, window, groups=c)  # noqa: E731  (valid region)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: 1 when one code is used, n_embed when all are used evenly."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lesion_survival(originals: torch.Tensor, recons: torch.Tensor) -> tuple[int, int]:
    """(lesions found in ``originals``, of those still found at the same quadrant and size in ``recons``)."""
    from PIL import Image

    from .synthetic import locate_lesion

    found = kept = 0
    for a, b in zip(to_uint8(originals).numpy(), to_uint8(recons).numpy()):
        where = locate_lesion(Image.fromarray(a, "RGB"))
        if where is not None:
            found += 1
            kept += locate_lesion(Image.fromarray(b, "RGB")) == where
    return found, kept


@torch.no_grad()
def reconstruct(vqgan: VQGAN, pixels: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode -> decode every image: (codes (N, h*w), reconstructions (N, 3, R, R) clamped to [-1, 1], on the CPU)."""
    codes, recons = [], []
    for i in range(0, pixels.shape[0], batch_size):
        c = vqgan.encode_codes(pixels[i:i + batch_size])
        codes.append(c.cpu())
        recons.append(vqgan.decode_codes(c).float().clamp(-1, 1).cpu())
    return torch.cat(codes), torch.cat(recons)


@torch.no_grad()
def evaluate_vqgan(vqgan: VQGAN, pixels: torch.Tensor, batch_size: int = 32) -> dict:
    """Every measure of the module docstring on (N, 3, R, R) images in [-1, 1]; the model is left as it was."""
    was_training = vqgan.training
    vqgan.eval()
    codes, recons = reconstruct(vqgan, pixels, batch_size)
    vqgan.train(was_training)
    x, y = (pixels.float().cpu() + 1) / 2, (recons + 1) / 2
    counts = torch.bincount(codes.flatten(), minlength=vqgan.n_embed)
    found, kept = lesion_survival(pixels.cpu(), recons)
    return {
        "n_images": int(pixels.shape[0]), "l1": float((recons - pixels.float().cpu()).abs().mean()),
        "psnr": float(psnr(x, y).mean()), "ssim": float(ssim(x, y).mean()),
        "codes_used": int((counts > 0).sum()), "perplexity": perplexity(counts),
        "lesions": found, "lesion_survival": kept / found if found else None,
    }


@torch.no_grad()
def save_grid(vqgan: VQGAN, pixels: torch.Tensor, path: str | Path, n: int = GRID_IMAGES) -> Path:
    """A PNG: the first ``n`` images on the top row, their encode -> decode reconstructions below."""
    from PIL import Image

    x = pixels[:n]
    was_training = vqgan.training
    recon = reconstruct(vqgan.eval(), x)[1]
    vqgan.train(was_training)
    rows = [torch.cat(list(to_uint8(t)), dim=1) for t in (x, recon)]  # each (R, n*R, 3)
    Image.fromarray(torch.cat(rows, dim=0).numpy(), "RGB").save(path)
    return Path(path)
