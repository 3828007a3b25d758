"""Short reconstruction training of a VQGAN, so that the codes an image model draws decode to images.

What is trained: encoder -> ``quant_conv`` -> nearest-code quantizer (straight-through gradients) ->
``post_quant_conv`` -> decoder, on an L1 (or MSE) pixel loss plus the quantizer's own codebook /
commitment loss (transformers' ``ChameleonVQVAEVectorQuantizer`` returns both). No GAN or perceptual
loss: those need downloaded networks, and a few hundred steps on small images do not need them.

Two things keep the codebook in use, which plain VQ training on a few hundred steps does not:
- before the first step the codebook is drawn from encoder outputs by k-means++ seeding (each new code is
  a latent sampled with probability proportional to its squared distance to the codes already chosen);
- every ``reseed_every`` steps, codes no latent picked since the last check are set to latents of the
  current batch (the ones farthest from their code first), so dead codes come back where the data is.

Everything random (batch order, seeding draws) comes from one ``torch.Generator`` seeded by
``VQGANTrainConfig.seed``; on one CPU thread count the run is reproducible bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from .vqgan import VQGAN
from .vqgan_train_config import PIXEL_LOSSES, PIXEL_WEIGHTS, VQGANTrainConfig  # noqa: F401  (this module's API)

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ data


def stack_images(images: torch.Tensor | Iterable[torch.Tensor], resolution: int) -> torch.Tensor:
    """A (N, 3, R, R) tensor or an iterable of (3, R, R) tensors in [-1, 1] -> one float32 (N, 3, R, R) tensor."""
    pixels = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (resolution, resolution):
        raise ValueError(f"expected images of shape (N, 3, {resolution}, {resolution}), got {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("no images to train on")
    return pixels.float()


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless random batches of indices: a fresh permutation per epoch, the last short batch dropped if n allows."""
    while True:
        order = torch.randperm(n, generator=generator)
        usable = max(n - n % batch_size, min(n, batch_size))
        for start in range(0, usable, batch_size):
            yield order[start:start + batch_size]


# -------------------------------------------------------------------------------------- codebook


def encode_latents(vqgan: VQGAN, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) -> (B*h*w, embed_dim) pre-quantization latents (``quant_conv`` output), row-major."""
    z = vqgan.quant_conv(vqgan.encoder(pixels))  # (B, D, h, w)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (N, D) points -> (k, D) centres; repeats points only when N < k."""
    n = points.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centres = [points[first]]
    dist = ((points - centres[0]) ** 2).sum(1)  # (N,) squared distance to the nearest centre so far
    for _ in range(1, k):
        weights = dist if dist.sum() > 0 else torch.ones_like(dist)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres.append(points[pick])
        dist = torch.minimum(dist, ((points - points[pick]) ** 2).sum(1))
    return torch.cat(centres)


@torch.no_grad()
def init_codebook(vqgan: VQGAN, pixels: torch.Tensor, n_images: int, batch_size: int, generator: torch.Generator) -> None:
    """Set the codebook to a k-means++ sample of the encoder's latents of ``n_images`` random images."""
    pick = torch.randperm(pixels.shape[0], generator=generator)[:n_images]
    latents = torch.cat([encode_latents(vqgan, pixels[pick[i:i + batch_size]]) for i in range(0, len(pick), batch_size)])
    weight = vqgan.quantize.embedding.weight
    weight.copy_(kmeans_plus_plus(latents.float().cpu(), vqgan.n_embed, generator).to(weight))


@torch.no_grad()
def reseed_dead_codes(vqgan: VQGAN, counts: torch.Tensor, latents: torch.Tensor, codes: torch.Tensor) -> int:
    """Codes with ``counts == 0`` get the batch latents farthest from their own code; returns how many."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    weight = vqgan.quantize.embedding.weight  # (n_embed, D)
    error = ((latents - weight[codes]) ** 2).sum(1)  # (N,) quantization error of each latent
    donors = error.argsort(descending=True)[: dead.numel()]
    dead = dead[: donors.numel()]
    weight[dead] = latents[donors].to(weight.dtype)
    return int(dead.numel())


# -------------------------------------------------------------------------------------- training


def pixel_weights(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Contrast weights (B, 1, R, R) = 1 + alpha * |x - the image's mean|, averaged over channels.

    Small bright (or dark) structures, which a plain mean loss lets the decoder smooth away because they
    are a few percent of the pixels, count up to ``1 + 2 * alpha`` times as much as the background.
    """
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return 1.0 + alpha * (x - mean).abs().mean(dim=1, keepdim=True)


def pixel_loss(recon: torch.Tensor, x: torch.Tensor, config: VQGANTrainConfig) -> torch.Tensor:
    """The config's L1 or MSE between (B, 3, R, R) tensors, weighted per pixel when ``pixel_weight`` asks."""
    error = (recon - x).abs() if config.pixel_loss == "l1" else (recon - x) ** 2  # (B, 3, R, R)
    if config.pixel_weight == "none":
        return error.mean()
    weight = pixel_weights(x, config.pixel_weight_alpha).expand_as(error)  # no gradient: x is data
    return (weight * error).sum() / weight.sum()  # a weighted mean: the same scale as the unweighted loss


def _forward(vqgan: VQGAN, x: torch.Tensor, config: VQGANTrainConfig) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One training forward: (loss, its parts, detached latents (N, D), codes (N,))."""
    z = vqgan.quant_conv(vqgan.encoder(x))  # (B, D, h, w)
    quant, vq_loss, codes = vqgan.quantize(z)  # straight-through quantized latents, codebook + commitment loss
    recon = vqgan.decoder(vqgan.post_quant_conv(quant))  # (B, 3, R, R)
    pixel = pixel_loss(recon, x, config)
    loss = pixel + config.vq_weight * vq_loss
    latents = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return loss, {"pixel_loss": float(pixel.detach()), "vq_loss": float(vq_loss.detach())}, latents, codes


def _optimizer(vqgan: VQGAN, config: VQGANTrainConfig) -> torch.optim.AdamW:
    codebook = vqgan.quantize.embedding.weight
    rest = [p for p in vqgan.parameters() if p is not codebook]
    groups = [{"params": rest, "weight_decay": config.weight_decay}, {"params": [codebook], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def train_vqgan(vqgan: VQGAN, images: torch.Tensor | Iterable[torch.Tensor], config: VQGANTrainConfig) -> list[dict]:
    """Train ``vqgan`` in place to reconstruct ``images`` ((N, 3, R, R) in [-1, 1]); returns the history records.

    Each record: ``step``, ``loss``, ``pixel_loss``, ``vq_loss``, ``codes_in_batch`` (distinct codes the
    step's batch used), ``reseeded`` (dead codes re-seeded since the last record), ``seconds`` (wall) and
    ``cpu_seconds`` (this process's CPU time) since the start. The model is left in eval mode.
    """
    if vqgan.decoder is None:
        raise ValueError("this VQGAN has no decoder (an encoder-only checkpoint); reconstruction training needs one")
    device = torch.device(config.device)
    pixels = stack_images(images, vqgan.resolution)
    generator = torch.Generator().manual_seed(config.seed)
    vqgan.to(device=device, dtype=torch.float32).requires_grad_(True).train()
    if config.init_codebook:
        init_codebook(vqgan, pixels.to(device), config.init_images, config.batch_size, generator)
    optimizer = _optimizer(vqgan, config)
    history = _run_steps(vqgan, pixels, optimizer, config, generator, device)
    vqgan.eval()
    return history


def _run_steps(vqgan, pixels, optimizer, config: VQGANTrainConfig, generator, device) -> list[dict]:
    counts = torch.zeros(vqgan.n_embed, dtype=torch.long, device=device)  # code use since the last re-seeding
    history, reseeded = [], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = _batches(pixels.shape[0], config.batch_size, generator)
    bar = tqdm(total=config.steps, desc="vqgan", unit="step", disable=not config.progress)
    for step in range(1, config.steps + 1):
        x = pixels[next(batches)].to(device)
        loss, parts, latents, codes = _forward(vqgan, x, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts += torch.bincount(codes, minlength=vqgan.n_embed)
        if config.reseed_every and step % config.reseed_every == 0 and step < config.steps:
            reseeded += reseed_dead_codes(vqgan, counts, latents, codes)
            counts.zero_()
        seconds = time.perf_counter() - start
        out_of_time = config.max_seconds is not None and seconds >= config.max_seconds
        if step % config.log_every == 0 or step == config.steps or out_of_time:
            history.append({"step": step, "loss": float(loss.detach()), **parts, "codes_in_batch": int(codes.unique().numel()),
                            "reseeded": reseeded, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_start})
            reseeded = 0
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        bar.update(1)
        if out_of_time:
            logger.info("stopping after %d of %d steps: max_seconds=%s reached", step, config.steps, config.max_seconds)
            break
    bar.close()
    return history


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_reconstruction(vqgan: VQGAN, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean absolute pixel error (in [-1, 1] units, decoder output clamped) of encode -> decode, and codes used."""
    pixels = stack_images(images, vqgan.resolution)
    total, used = 0.0, torch.zeros(vqgan.n_embed, dtype=torch.bool)
    for i in range(0, pixels.shape[0], batch_size):
        x = pixels[i:i + batch_size]
        codes = vqgan.encode_codes(x)  # (B, h*w)
        recon = vqgan.decode_codes(codes).clamp(-1, 1).to(x)
        total += float((recon - x).abs().sum())
        used[codes.flatten().cpu()] = True
    return {"l1": total / pixels.numel(), "codes_used": int(used.sum()), "n_images": int(pixels.shape[0])}


def config_dict(config: VQGANTrainConfig) -> dict:
    return asdict(config)
