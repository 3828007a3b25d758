"""The settings of one VQGAN reconstruction run (see :mod:`medmax.vqgan_training`).

A module of its own, without torch, so that ``medmax-train-vqgan --help`` can take its defaults from
:class:`VQGANTrainConfig` without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

PIXEL_LOSSES = ("l1", "mse")
PIXEL_WEIGHTS = ("none", "contrast")


@dataclass
class VQGANTrainConfig:
    """One reconstruction run. Defaults fit the tiny preset (64 px) on a CPU in about a minute."""

    steps: int = 60  # optimizer steps (the run may stop earlier at max_seconds)
    batch_size: int = 16  # images per step
    lr: float = 5e-4  # AdamW learning rate, constant (2e-3 collapsed every 64 px scan to one average image in 60 s)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never applied to the codebook)
    pixel_loss: str = "l1"  # "l1" or "mse" on pixels in [-1, 1]
    pixel_weight: str = "none"  # "none" or "contrast": see pixel_weights()
    pixel_weight_alpha: float = 0.0  # contrast weighting strength (weight = 1 + alpha * |x - image mean|)
    vq_weight: float = 1.0  # weight of the quantizer's codebook + commitment loss
    init_codebook: bool = True  # k-means++ seed the codebook from encoder outputs before step 1
    init_images: int = 128  # images encoded to draw the initial codebook from
    reseed_every: int = 10  # steps between dead-code re-seeding; 0 disables it
    max_seconds: float | None = None  # stop after this much wall time (checked after each step)
    seed: int = 0  # batch order and every random draw
    log_every: int = 5  # a history record every this many steps (and at the last step)
    device: str = "cpu"
    progress: bool = False  # tqdm bar

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.pixel_weight not in PIXEL_WEIGHTS:
            raise ValueError(f"pixel_weight must be one of {PIXEL_WEIGHTS}, got {self.pixel_weight!r}")
        if self.pixel_weight_alpha < 0:
            raise ValueError(f"pixel_weight_alpha must be >= 0, got {self.pixel_weight_alpha}")
        if self.reseed_every < 0 or self.init_images < 1 or self.log_every < 1:
            raise ValueError("reseed_every must be >= 0, init_images and log_every >= 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
