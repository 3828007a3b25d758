"""The settings of one VQGAN training run (see :mod:`medmax.vqgan_training`), and the YAML files that hold them.

A module of its own, without torch, so that ``medmax-train-vqgan --help`` can take its defaults from
:class:`VQGANTrainConfig` without loading torch.

The objective is taming-transformers' ``VQLPIPSWithDiscriminator``
(``taming/modules/losses/vqperceptual.py``); every default below that comes from taming names the
file and function it is read from. MedMax's recipe (its ``vqgan/config.yaml``: the Chameleon VQGAN,
``disc_start 25001``, ``disc_weight 0.8``, ``codebook_weight 1.0``, base learning rate 4.5e-6,
batch 2) is ``tokenization/configs/vqgan_medmax_gpu.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UserError

PIXEL_LOSSES = ("l1", "mse")
PIXEL_WEIGHTS = ("none", "contrast")
DISC_LOSSES = ("hinge", "vanilla")  # taming vqperceptual.py: VQLPIPSWithDiscriminator.__init__ asserts these two
TRAIN_PARTS = ("all", "decoder")
AUTOCASTS = ("auto", "bf16", "no")
# Settings a resumed run may change: how long it runs and what it reports, never what it computes.
RESUMABLE_CHANGES = ("steps", "max_seconds", "progress", "log_every", "eval_every", "save_every", "tensorboard")


class VQGANConfigError(UserError):
    """A setting that cannot work; the message names the setting (and the YAML file)."""


@dataclass
class VQGANTrainConfig:
    """One VQGAN training run. Defaults fit the tiny preset (64 px) on a CPU in about a minute.

    With ``disc_start`` unset the objective is reconstruction only (pixel loss + codebook loss); set it
    for taming's full objective. The perceptual (LPIPS) term needs ``perceptual_weights``.
    """

    steps: int = 60  # optimizer steps (the run may stop earlier at max_seconds)
    batch_size: int = 16  # images per step and per process
    lr: float = 5e-4  # Adam(W) learning rate, constant (2e-3 collapsed every 64 px scan to one average image in 60 s)
    scale_lr: bool = False  # lr is a base rate: times batch_size times processes (taming main.py: learning_rate = ngpu * bs * base_lr)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # taming's VQModel.configure_optimizers uses (0.5, 0.9) for both optimizers
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never applied to the codebook)
    train: str = "all"  # "all" (codes change) or "decoder" (encoder, quant_conv and codebook frozen: every code stays valid)
    # -- reconstruction
    pixel_loss: str = "l1"  # "l1" (taming's rec_loss) or "mse", on pixels in [-1, 1]
    pixel_weight: str = "none"  # "none" or "contrast": see pixel_weights()
    pixel_weight_alpha: float = 0.0  # contrast weighting strength (weight = 1 + alpha * |x - image mean|)
    perceptual_weight: float = 1.0  # LPIPS weight (taming VQLPIPSWithDiscriminator.__init__ perceptual_weight=1.0)
    perceptual_weights: str | None = None  # local VGG16 + LPIPS heads file; None: no perceptual term (warned once)
    # -- codebook
    codebook_weight: float = 1.0  # taming VQLPIPSWithDiscriminator.__init__ codebook_weight=1.0 (beta 0.25 is in the quantizer)
    init_codebook: bool = True  # k-means++ seed the codebook from encoder outputs before step 1 (fresh runs, train=all)
    init_images: int = 128  # images encoded to draw the initial codebook from
    reseed_every: int = 10  # steps between dead-code re-seeding; 0 disables it (always off with train=decoder)
    # -- adversarial (taming VQLPIPSWithDiscriminator.__init__ defaults)
    disc_start: int | None = None  # first step whose losses include the discriminator (taming adopt_weight: step >= disc_start); None: no GAN
    disc_weight: float = 1.0  # times the adaptive weight (taming disc_weight=1.0; MedMax 0.8)
    disc_factor: float = 1.0  # taming disc_factor=1.0: scales both GAN losses once switched on
    disc_loss: str = "hinge"  # taming disc_loss="hinge"; "vanilla" is softplus
    disc_num_layers: int = 3  # taming disc_num_layers=3 (NLayerDiscriminator n_layers)
    disc_ndf: int = 64  # taming disc_ndf=64: filters of the first discriminator layer
    # -- running
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "no"
    max_seconds: float | None = None  # stop after this much wall time (checked after each step)
    seed: int = 0  # batch order and every random draw
    log_every: int = 5  # a history record every this many steps (and at the last step)
    eval_every: int = 0  # held-out evaluation every this many steps (0: only before and after)
    save_every: int = 50  # a resumable checkpoint every this many steps (and at the end); 0: only at the end
    tensorboard: bool = True  # TensorBoard event files under OUTPUT/tensorboard
    device: str = "cpu"
    progress: bool = False  # tqdm bar

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        problems = [msg for check, msg in self._checks() if not check]
        if problems:
            raise VQGANConfigError("; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        beta = self.adam_betas
        return [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (len(beta) == 2 and all(0 <= b < 1 for b in beta), f"adam_betas must be two numbers in [0, 1), got {beta}"),
            (self.train in TRAIN_PARTS, f"train must be one of {TRAIN_PARTS}, got {self.train!r}"),
            (self.pixel_loss in PIXEL_LOSSES, f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}"),
            (self.pixel_weight in PIXEL_WEIGHTS, f"pixel_weight must be one of {PIXEL_WEIGHTS}, got {self.pixel_weight!r}"),
            (self.pixel_weight_alpha >= 0, f"pixel_weight_alpha must be >= 0, got {self.pixel_weight_alpha}"),
            (self.perceptual_weight >= 0, f"perceptual_weight must be >= 0, got {self.perceptual_weight}"),
            (self.codebook_weight >= 0, f"codebook_weight must be >= 0, got {self.codebook_weight}"),
            (self.disc_start is None or self.disc_start >= 0, f"disc_start must be >= 0 or null, got {self.disc_start}"),
            (self.disc_weight >= 0 and self.disc_factor >= 0, "disc_weight and disc_factor must be >= 0"),
            (self.disc_loss in DISC_LOSSES, f"disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}"),
            (self.disc_num_layers >= 1 and self.disc_ndf >= 1, "disc_num_layers and disc_ndf must be >= 1"),
            (self.autocast in AUTOCASTS, f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}"),
            (self.reseed_every >= 0 and self.eval_every >= 0 and self.save_every >= 0,
             "reseed_every, eval_every and save_every must be >= 0"),
            (self.init_images >= 1 and self.log_every >= 1, "init_images and log_every must be >= 1"),
            (self.max_seconds is None or self.max_seconds > 0, f"max_seconds must be > 0, got {self.max_seconds}"),
        ]

    @property
    def adversarial(self) -> bool:
        return self.disc_start is not None


def config_fields() -> set[str]:
    return {f.name for f in fields(VQGANTrainConfig)}


def read_config_yaml(path: str | Path) -> dict:
    """The settings of a VQGAN training YAML as a dict, every key checked against :class:`VQGANTrainConfig`.

    Besides the config's fields a YAML may hold ``init`` and ``preset`` (where the VQGAN starts), which
    the program reads.
    """
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VQGANConfigError(f"--config {path}: cannot be read ({' '.join(str(exc).split())})") from None
    if not isinstance(values, dict):
        raise VQGANConfigError(f"--config {path}: expected a mapping of settings")
    unknown = sorted(set(values) - config_fields() - {"init", "preset"})
    if unknown:
        raise VQGANConfigError(f"--config {path}: unknown settings {unknown}")
    return values
