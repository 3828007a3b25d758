"""VQGAN training: reconstruction only, or taming-transformers' full objective, on one process or many.

What is trained: encoder -> ``quant_conv`` -> nearest-code quantizer (straight-through gradients) ->
``post_quant_conv`` -> decoder. The objective (see :mod:`medmax.vqgan_objective` for each formula and
where in taming's code it comes from):

- reconstruction: L1 (or MSE) on pixels, optionally contrast-weighted, plus ``perceptual_weight`` times
  LPIPS when a perceptual network is given (:mod:`medmax.perceptual`);
- codebook: the quantizer's codebook + commitment loss (beta 0.25) times ``codebook_weight``;
- adversarial, when ``disc_start`` is set: a PatchGAN discriminator with hinge (or vanilla) loss,
  switched on once ``disc_start`` steps are done; the generator loss is weighted by taming's adaptive
  weight (ratio of the reconstruction and generator gradient norms at ``decoder.conv_out.weight``,
  clamped, times ``disc_weight``). As in taming, the discriminator's pass re-runs the autoencoder after
  its update. Before ``disc_start`` the discriminator is not run at all, so it stays as initialised.

``train="decoder"`` freezes the encoder, ``quant_conv`` and codebook: every code an image had stays its
code (and :meth:`medmax.vqgan.VQGAN.codes_digest` is unchanged), only the decoding gets better.

Two things keep the codebook in use when it is trained (``train="all"``):
- on a fresh run the codebook is drawn from encoder outputs by k-means++ seeding (``init_codebook``);
- every ``reseed_every`` steps, codes no latent picked since the last check are set to latents of the
  current batch (the ones farthest from their code first), so dead codes come back where the data is.

Running: under torchrun each process takes its own share of every global batch; the autoencoder is
wrapped in ``DistributedDataParallel``; the discriminator's gradients are averaged by hand, because
taming runs real and fake images through it in two separate forwards (so their BatchNorm statistics
stay apart), which DDP does not allow before one backward. bf16 autocast on CUDA (the quantizer always
runs in fp32). Batches are a pure function of (seed, step), and a checkpoint holds everything else
(weights, optimizers, code counts, history), so a resumed run continues the same run bit for bit on
the same machine. Everything random comes from generators seeded by ``VQGANTrainConfig.seed``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .distributed import Dist
from .vqgan import VQGAN
from .vqgan_eval import evaluate_vqgan, save_grid
from .vqgan_objective import (
    D_LOSSES,
    PatchDiscriminator,
    adaptive_weight,
    gan_active,
    generator_loss,
    init_discriminator,
    reconstruction_loss,
)
from .vqgan_train_config import (
    RESUMABLE_CHANGES,
    VQGANConfigError,
    VQGANTrainConfig,
)

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint/trainer_state.pt"
_CODE_MODULES = ("encoder", "quant_conv", "quantize")  # what decides the codes (frozen by train="decoder")


_FOREIGN_CHECKPOINT = ("this program never wrote such a file and never unpickles one, whatever the flags: "
                       "move it away, or use a new --output")


class ResumeMismatch(VQGANConfigError):
    """An output folder holds a run made with other settings or inputs; the message names each difference."""


@dataclass
class RunContext:
    """What a run needs besides the model, its images and its config."""

    output: Path | None = None  # checkpoint, TensorBoard, evaluation grids; None: nothing written
    eval_pixels: torch.Tensor | None = None  # (N, 3, R, R) images evaluated every eval_every steps
    eval_label: str = "held-out"  # what eval_pixels are, in log lines: "held-out", or "training-image" when they were trained on
    perceptual: nn.Module | None = None  # LPIPS; None: no perceptual term
    identity: dict = field(default_factory=dict)  # the inputs a resume must match (CSV digest, starting VQGAN...)
    dist: Dist = field(default_factory=Dist)


# ------------------------------------------------------------------------------------------ data


def stack_images(images: torch.Tensor | Iterable[torch.Tensor], resolution: int) -> torch.Tensor:
    """A (N, 3, R, R) tensor or an iterable of (3, R, R) tensors in [-1, 1] -> one float32 (N, 3, R, R) tensor."""
    pixels = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (resolution, resolution):
        raise ValueError(f"expected images of shape (N, 3, {resolution}, {resolution}), got {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("no images to train on")
    return pixels.float()


def batch_indices(n: int, batch_size: int, step: int, seed: int, info: Dist = Dist()) -> torch.Tensor:
    """This process's image indices for 1-based ``step``: a fresh permutation of the ``n`` images per epoch,
    cut into global batches of ``batch_size * world_size`` (wrapping around when ``n`` is smaller), rank r taking
    the r-th share. A pure function of its arguments, so a resumed run draws the batches it would have drawn."""
    global_batch = batch_size * info.world_size
    per_epoch = max(n // global_batch, 1)
    epoch, position = divmod(step - 1, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = position * global_batch + info.rank * batch_size
    return order[torch.arange(start, start + batch_size) % n]


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
    dist_ = ((points - centres[0]) ** 2).sum(1)  # (N,) squared distance to the nearest centre so far
    for _ in range(1, k):
        weights = dist_ if dist_.sum() > 0 else torch.ones_like(dist_)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres.append(points[pick])
        dist_ = torch.minimum(dist_, ((points - points[pick]) ** 2).sum(1))
    return torch.cat(centres)


@torch.no_grad()
def init_codebook(vqgan: VQGAN, pixels: torch.Tensor, n_images: int, batch_size: int, generator: torch.Generator) -> None:
    """Set the codebook to a k-means++ sample of the encoder's latents of ``n_images`` random images."""
    pick = torch.randperm(pixels.shape[0], generator=generator)[:n_images]
    device = vqgan.quantize.embedding.weight.device
    latents = torch.cat([encode_latents(vqgan, pixels[pick[i:i + batch_size]].to(device)) for i in range(0, len(pick), batch_size)])
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


# ---------------------------------------------------------------------------------------- losses


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


class Autoencoder(nn.Module):
    """The VQGAN's training forward: (B, 3, R, R) -> (reconstruction, codebook loss, codes (N,), latents (N, D)).

    With ``train_codes=False`` the code half runs without gradients (frozen); the quantizer always runs in fp32.
    """

    def __init__(self, vqgan: VQGAN, train_codes: bool, amp: bool):
        super().__init__()
        self.vqgan, self.train_codes, self.amp = vqgan, train_codes, amp

    def forward(self, x: torch.Tensor):
        v, device = self.vqgan, x.device.type
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_codes):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.amp and self.train_codes):
                z = v.quant_conv(v.encoder(x))  # (B, D, h, w)
            with torch.autocast(device, enabled=False):
                quant, q_loss, codes = v.quantize(z.float())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.amp):
            recon = v.decoder(v.post_quant_conv(quant))  # (B, 3, R, R)
        latents = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return recon.float(), q_loss, codes, latents


# -------------------------------------------------------------------------------------- training


def train_vqgan(vqgan: VQGAN, images: torch.Tensor | Iterable[torch.Tensor], config: VQGANTrainConfig,
                context: RunContext | None = None) -> list[dict]:
    """Train ``vqgan`` in place on ``images`` ((N, 3, R, R) in [-1, 1]); returns the history records.

    Each record: ``step``, ``loss`` and its parts (``pixel_loss``, ``perceptual_loss``, ``nll_loss``,
    ``vq_loss``; with the GAN on, ``g_loss``, ``d_weight``, ``d_loss``, ``logits_real``, ``logits_fake``),
    ``codes_in_batch`` (distinct codes of the step's batch), ``reseeded`` (dead codes re-seeded since the last
    record), ``seconds`` (wall) and ``cpu_seconds`` (this process's CPU time) since the run began. With
    ``context.output`` the run checkpoints there and resumes from it. The model is left in eval mode.
    """
    return Trainer(vqgan, stack_images(images, vqgan.resolution), config, context or RunContext()).run()


class Trainer:
    """One training run: the setup, the two steps (autoencoder, discriminator), evaluation and checkpoints."""

    def __init__(self, vqgan: VQGAN, pixels: torch.Tensor, config: VQGANTrainConfig, ctx: RunContext):
        if vqgan.decoder is None:
            raise ValueError("this VQGAN has no decoder (an encoder-only checkpoint); training it needs one")
        self.vqgan, self.pixels, self.config, self.ctx, self.info = vqgan, pixels, config, ctx, ctx.dist
        self.device = torch.device(config.device)
        self.amp = config.autocast == "bf16" or (config.autocast == "auto" and self.device.type == "cuda")
        self.train_codes = config.train == "all"
        self.step, self.history, self.evals, self.seconds_before, self.cpu_before = 0, [], [], 0.0, 0.0
        self.evaluated_at = None  # the step of the last evaluation, on every process
        self.counts = torch.zeros(vqgan.n_embed, dtype=torch.long, device=self.device)  # code use since the last re-seeding
        self._setup_model()
        self._setup_optimizers()
        self.writer = None

    # -- setup
    def _setup_model(self) -> None:
        v, c = self.vqgan, self.config
        v.to(device=self.device, dtype=torch.float32).train()
        v.requires_grad_(True)
        for name in _CODE_MODULES if not self.train_codes else ():
            getattr(v, name).requires_grad_(False)
        self.autoencoder = Autoencoder(v, self.train_codes, self.amp)
        self.disc = None
        if c.adversarial:
            check_discriminator_fits(c.disc_num_layers, v.resolution)
            with torch.random.fork_rng(devices=[]):  # conv biases keep PyTorch's default init, as in taming: seed it
                torch.manual_seed(c.seed + 1)
                disc = PatchDiscriminator(3, c.disc_ndf, c.disc_num_layers)
            init_discriminator(disc, torch.Generator().manual_seed(c.seed + 1))
            self.disc = disc.to(self.device).train()
        if self.ctx.perceptual is not None:
            self.ctx.perceptual.to(self.device)
        elif c.perceptual_weight > 0 and self.is_main:
            logger.warning("no perceptual weights given (--perceptual-weights): the LPIPS term (perceptual_weight %s) is off; "
                           "see the README, 'VQGAN fine-tuning', for how to make the file", c.perceptual_weight)

    def _lr(self) -> float:
        return self.config.lr * (self.config.batch_size * self.info.world_size if self.config.scale_lr else 1)

    def _setup_optimizers(self) -> None:
        c, codebook = self.config, self.vqgan.quantize.embedding.weight
        rest = [p for p in self.vqgan.parameters() if p.requires_grad and p is not codebook]
        groups = [{"params": rest, "weight_decay": c.weight_decay}]
        if codebook.requires_grad:
            groups.append({"params": [codebook], "weight_decay": 0.0})
        self.opt_ae = torch.optim.AdamW(groups, lr=self._lr(), betas=c.adam_betas)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=self._lr(), betas=c.adam_betas, weight_decay=0.0) if self.disc else None

    def _wrap_ddp(self) -> nn.Module:
        if self.info.world_size == 1:
            return self.autoencoder
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.autoencoder, device_ids=ids)

    def _start_fresh(self) -> None:
        c = self.config
        if c.init_codebook and self.train_codes:
            init_codebook(self.vqgan, self.pixels, c.init_images, c.batch_size, torch.Generator().manual_seed(c.seed))
            self._broadcast(self.vqgan.quantize.embedding.weight)
        elif c.init_codebook:
            logger.info("train=decoder: the codebook is frozen, so it is not re-seeded by k-means++")
        self._evaluate()

    # -- the loop
    def run(self) -> list[dict]:
        resumed = self._resume()
        self._open_writer()
        if not resumed:
            self._start_fresh()
        self.model = self._wrap_ddp()
        start, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(total=self.config.steps, initial=self.step, desc="vqgan", unit="step", disable=not (self.config.progress and self.is_main))
        reseeded, stopped = 0, False
        while self.step < self.config.steps and not stopped:
            self.step += 1
            parts = self._train_step()
            reseeded += self._maybe_reseed(parts.pop("_latents"), parts.pop("_codes"))
            seconds = time.perf_counter() - start
            stopped = self._out_of_time(seconds)
            last = stopped or self.step == self.config.steps
            if self.step % self.config.log_every == 0 or last:
                self._record(parts, reseeded, self.seconds_before + seconds, self.cpu_before + time.process_time() - cpu_start, bar)
                reseeded = 0
            if self.config.eval_every and self.step % self.config.eval_every == 0 and not last:
                self._evaluate()
            if self.config.save_every and self.step % self.config.save_every == 0 and not last:
                self._save(self.seconds_before + seconds, self.cpu_before + time.process_time() - cpu_start)
            bar.update(1)
        bar.close()
        if stopped:
            logger.info("stopping after step %d of %d: max_seconds=%s reached", self.step, self.config.steps, self.config.max_seconds)
        if self.evaluated_at != self.step:
            self._evaluate()
        seconds = self.history[-1]["seconds"] if self.history else self.seconds_before
        self._save(seconds, self.history[-1]["cpu_seconds"] if self.history else self.cpu_before)
        self._close_writer()
        self.vqgan.eval()
        return self.history

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def _batch(self) -> torch.Tensor:
        idx = batch_indices(self.pixels.shape[0], self.config.batch_size, self.step, self.config.seed, self.info)
        return self.pixels[idx].to(self.device)

    def _train_step(self) -> dict:
        x = self._batch()
        gan = self.disc is not None and gan_active(self.step, self.config.disc_start)
        parts = self._autoencoder_step(x, gan)
        if gan:
            parts.update(self._discriminator_step(x))
        return parts

    def _autoencoder_step(self, x: torch.Tensor, gan: bool) -> dict:
        c = self.config
        recon, q_loss, codes, latents = self.model(x)
        pixel = pixel_loss(recon, x, c)
        perceptual = self._perceptual(recon, x)
        nll = reconstruction_loss(pixel, perceptual, c.perceptual_weight)
        loss = nll + c.codebook_weight * q_loss
        parts = {"pixel_loss": float(pixel.detach()), "perceptual_loss": float(perceptual.detach().mean()) if perceptual is not None else 0.0,
                 "nll_loss": float(nll.detach()), "vq_loss": float(q_loss.detach())}
        if gan:
            g_loss, d_weight = self._generator_terms(recon, nll)
            loss = loss + d_weight * c.disc_factor * g_loss
            parts.update(g_loss=float(g_loss.detach()), d_weight=float(d_weight))
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        return {"loss": float(loss.detach()), **parts, "codes_in_batch": int(codes.unique().numel()), "_latents": latents, "_codes": codes}

    def _perceptual(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self.ctx.perceptual is None or self.config.perceptual_weight == 0:
            return None
        with self._autocast():
            return self.ctx.perceptual(x, recon).float()  # (B, 1, 1, 1)

    def _generator_terms(self, recon: torch.Tensor, nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """taming's g_loss = -mean(D(x_rec)) and its adaptive weight; D's own weights get no gradient here."""
        self.disc.requires_grad_(False)
        with self._autocast():
            g_loss = generator_loss(self.disc(recon).float())
        self.disc.requires_grad_(True)
        return g_loss, adaptive_weight(nll, g_loss, self.vqgan.decoder.conv_out.weight, self.config.disc_weight)

    def _discriminator_step(self, x: torch.Tensor) -> dict:
        with torch.no_grad():  # taming's discriminator pass re-runs the autoencoder, after its update
            recon = self.autoencoder(x)[0]
        with self._autocast():
            logits_real, logits_fake = self.disc(x).float(), self.disc(recon).float()
        d_loss = self.config.disc_factor * D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self._average_grads(self.disc)
        self.opt_d.step()
        return {"d_loss": float(d_loss.detach()), "logits_real": float(logits_real.detach().mean()),
                "logits_fake": float(logits_fake.detach().mean())}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    # -- codebook upkeep, across processes
    def _maybe_reseed(self, latents: torch.Tensor, codes: torch.Tensor) -> int:
        if not self.train_codes:
            return 0
        self.counts += torch.bincount(codes, minlength=self.vqgan.n_embed)
        every = self.config.reseed_every
        if not every or self.step % every or self.step >= self.config.steps:
            return 0
        self._all_reduce(self.counts)
        n = reseed_dead_codes(self.vqgan, self.counts, latents, codes) if self.is_main else 0
        self._broadcast(self.vqgan.quantize.embedding.weight)
        self.counts.zero_()
        return n

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if self.info.world_size > 1:
            dist.all_reduce(tensor)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.info.world_size > 1:
            with torch.no_grad():
                dist.broadcast(tensor.data, src=0)

    def _average_grads(self, module: nn.Module) -> None:
        for p in module.parameters():
            if p.grad is not None and self.info.world_size > 1:
                dist.all_reduce(p.grad)
                p.grad /= self.info.world_size

    # -- records, evaluation, TensorBoard
    def _out_of_time(self, seconds: float) -> bool:
        """Rank 0's clock decides for every process, so that all stop after the same step."""
        if self.config.max_seconds is None:
            return False
        flag = torch.tensor([float(seconds >= self.config.max_seconds)], device=self.device)
        self._broadcast(flag)
        return bool(flag.item())

    def _mean_over_processes(self, parts: dict) -> dict:
        """Each loss averaged over the processes: the loss of the global batch (codes_in_batch: the mean per process)."""
        if self.info.world_size == 1:
            return parts
        values = torch.tensor([float(v) for v in parts.values()], dtype=torch.float64, device=self.device)
        self._all_reduce(values)
        return dict(zip(parts, (values / self.info.world_size).tolist()))

    def _record(self, parts: dict, reseeded: int, seconds: float, cpu_seconds: float, bar) -> None:
        parts = self._mean_over_processes(parts)
        record = {"step": self.step, **parts, "reseeded": reseeded, "seconds": seconds, "cpu_seconds": cpu_seconds}
        self.history.append(record)
        shown = {k: f"{record[k]:.4f}" for k in ("loss", "nll_loss", "g_loss", "d_loss") if k in record}
        bar.set_postfix(shown)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, self.step)

    def _evaluate(self) -> None:
        self.evaluated_at = self.step
        pixels = self.ctx.eval_pixels
        if pixels is None or not self.is_main:
            self._barrier()
            return
        record = {"step": self.step, **evaluate_vqgan(self.vqgan, pixels)}
        self.evals.append(record)
        logger.info("step %d: %s PSNR %.2f dB, SSIM %.3f, codes %d, perplexity %.1f, lesions kept %s of %d", self.step,
                    self.ctx.eval_label, record["psnr"], record["ssim"], record["codes_used"], record["perplexity"], _share(record), record["lesions"])
        if self.ctx.output is not None:
            (self.ctx.output / "eval").mkdir(parents=True, exist_ok=True)
            save_grid(self.vqgan, pixels, self.ctx.output / "eval" / f"step{self.step:06d}.png")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(f"eval/{key}", value, self.step)
        self._barrier()

    def _barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    def _open_writer(self) -> None:
        if self.config.tensorboard and self.ctx.output is not None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.ctx.output / "tensorboard"), purge_step=self.step + 1)

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- checkpoints
    def _identity(self) -> dict:
        settings = {k: v for k, v in asdict(self.config).items() if k not in RESUMABLE_CHANGES}
        settings["adam_betas"] = list(settings["adam_betas"])
        return {"settings": settings, "inputs": self.ctx.identity, "world_size": self.info.world_size}

    def _save(self, seconds: float, cpu_seconds: float) -> None:
        if self.ctx.output is None or not self.is_main:
            self._barrier()
            return
        state = {"step": self.step, "identity": self._identity(), "vqgan": self.vqgan.state_dict(),
                 "opt_ae": self.opt_ae.state_dict(), "counts": self.counts.cpu(), "history": self.history, "evals": self.evals,
                 "seconds": seconds, "cpu_seconds": cpu_seconds, "evaluated_at": self.evaluated_at}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        path = self.ctx.output / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        self._barrier()

    def _resume(self) -> bool:
        path = None if self.ctx.output is None else self.ctx.output / CHECKPOINT
        if path is None or not path.is_file():
            return False
        from .torch_files import load_torch_file

        state = load_torch_file(path, map_location=self.device, refusal=_FOREIGN_CHECKPOINT)  # weights_only: tensors, numbers, lists
        check_same_run(state["identity"], self._identity(), path)
        self.vqgan.load_state_dict(state["vqgan"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.counts.copy_(state["counts"])
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        self.evaluated_at = state["evaluated_at"]
        self.seconds_before, self.cpu_before = state["seconds"], state["cpu_seconds"]
        logger.info("%s: resuming the run at step %d of %d", path, self.step, self.config.steps)
        return True


def check_discriminator_fits(n_layers: int, resolution: int) -> None:
    """The PatchGAN halves the image ``n_layers`` times, then two 4x4 convolutions each take one pixel off."""
    side = resolution // 2**n_layers - 2
    if side < 1:
        raise VQGANConfigError(f"disc_num_layers {n_layers} is too many for {resolution} px images (its patch map would be "
                               f"{side}x{side}); use at most {max(n for n in range(1, 12) if resolution // 2**n - 2 >= 1)}")


def check_same_run(saved: dict, now: dict, path: Path) -> None:
    """Refuse to resume a checkpoint made with other settings, inputs or process count, naming each difference."""
    changed = [f"{key} was {saved['settings'].get(key)!r}, now {value!r}" for key, value in now["settings"].items()
               if saved["settings"].get(key) != value]
    changed += [f"{key} was {saved['inputs'].get(key)!r}, now {value!r}" for key, value in now["inputs"].items()
                if saved["inputs"].get(key) != value]
    if saved["world_size"] != now["world_size"]:
        changed.append(f"processes (torchrun --nproc-per-node) was {saved['world_size']}, now {now['world_size']}")
    if changed:
        raise ResumeMismatch(f"{path} is a run made with other settings: {'; '.join(changed)}. "
                             "Resume with the same settings (only steps, max_seconds and what is logged may change) or use a new --output")


def _share(record: dict) -> str:
    return "n/a" if not record["lesions"] else f"{record['lesion_survival']:.0%}"


# ------------------------------------------------------------------------------------ evaluation


def evaluate_reconstruction(vqgan: VQGAN, images: torch.Tensor, batch_size: int = 32) -> dict:
    """:func:`medmax.vqgan_eval.evaluate_vqgan`: l1 (in [-1, 1] units), PSNR, SSIM, codes used, perplexity, lesion survival."""
    return evaluate_vqgan(vqgan, stack_images(images, vqgan.resolution), batch_size)


def config_dict(config: VQGANTrainConfig) -> dict:
    d = asdict(config)
    d["adam_betas"] = list(d["adam_betas"])
    return d
