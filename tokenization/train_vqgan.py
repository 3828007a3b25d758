"""Train or fine-tune a VQGAN on a CSV of images: reconstruction only, or taming-transformers' full objective.

Usage::

    # reconstruction only, a tiny VQGAN from scratch (what the quickstart runs)
    python -m tokenization.train_vqgan --input data/images.csv --output data/vqgan \\
        --preset tiny --steps 300 --batch-size 16 --lr 5e-4 --seed 0 --max-seconds 60 --threads 2
    # small bright structures (lesions) kept: contrast-weighted L1
    python -m tokenization.train_vqgan --input data/images.csv --output data/vqgan --preset tiny --steps 300 \\
        --batch-size 16 --lr 5e-4 --pixel-weight contrast --pixel-weight-alpha 10 --seed 0 --max-seconds 60 --threads 2
    # taming's full objective, decoder only (codes unchanged), on a CPU: the tiny recipe
    python -m tokenization.train_vqgan --config tokenization/configs/vqgan_tiny_cpu.yaml \\
        --input data/train_images.csv --eval-input data/heldout_images.csv --output runs/vqgan_ft --init data/vqgan
    # MedMax's recipe on GPUs (Chameleon VQGAN, disc_start 25001, disc_weight 0.8, base lr 4.5e-6, batch 2)
    torchrun --nproc-per-node 8 -m tokenization.train_vqgan --config tokenization/configs/vqgan_medmax_gpu.yaml \\
        --input images.csv --eval-input heldout.csv --output runs/vqgan_medmax --init CKPT \\
        --perceptual-weights lpips_vgg16.safetensors

Settings come from the ``VQGANTrainConfig`` defaults, then ``--config YAML``, then the flags. With
``--disc-start`` (or ``disc_start`` in the YAML) the objective is taming's (``VQLPIPSWithDiscriminator``):
L1 + LPIPS, codebook loss, and a PatchGAN switched on after ``disc_start`` steps with the adaptive weight.
LPIPS needs ``--perceptual-weights FILE`` (made once, see the README); without it that term is off,
with a warning.

``--train decoder`` (the first choice for an existing Chameleon VQGAN) freezes the encoder and codebook:
every image already tokenized, and every model trained on those tokens, stays valid; only decodes
change. ``--train all`` changes the codes: the saved VQGAN's codes digest differs, and
``image_tokenize`` refuses to add its codes to a folder tokenized with the old one (use a new --output).

The CSV is read like ``image_tokenize`` reads it (``medmax.image_csv``): column ``img_path`` or
``image_path`` (or ``--column``), relative paths against ``--image-root`` (default: the CSV's folder), no
path may leave that root, a path that is not valid UTF-8 fails its row only, and the same
``--max-image-pixels`` / ``--max-aspect-ratio`` limits. Unreadable images are never replaced: each is
listed in ``OUTPUT/errors.jsonl``, counted in ``summary.json`` and logged; ``--strict`` makes any of them
an error (exit 1). Every image is held in memory (3 MB per 512 px image and process).

What is evaluated: with ``--eval-input``, held-out images; without it, the first ``--eval-images``
training images, and every report says "training-image PSNR" (``summary.json``: ``eval_images``),
since a VQGAN scores higher on images it was trained on.

Writes into ``--output``: ``vqgan.yaml`` + ``vqgan.safetensors`` (what ``image_tokenize --ckpt`` and
model folders' ``vqgan/`` read), ``history.jsonl`` (training records), ``evals.jsonl`` (PSNR, SSIM, codes
used, perplexity, lesion survival of the evaluated images: before training, every ``--eval-every`` steps,
at the end), ``eval/stepNNNNNN.png`` and ``reconstructions.png`` (inputs on top, reconstructions below),
``tensorboard/``, ``summary.json`` and ``checkpoint/trainer_state.pt``. Run the same command again
and it resumes from that checkpoint (it refuses if a setting or input differs, the images' content
included: a file replaced under the same CSV row, a starting VQGAN with other codes or other
``--perceptual-weights`` under the same path is a different input; ``--steps`` and
``--max-seconds`` may grow). ``summary.json``'s ``codes_changed`` is null from a ``--preset`` start:
no earlier codes exist.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.cli import program
from medmax.errors import UserError
from medmax.images import ImageLimits
from medmax.presets import VQGAN_PRESETS
from medmax.vqgan_train_config import (
    AUTOCASTS,
    DISC_LOSSES,
    PIXEL_LOSSES,
    PIXEL_WEIGHTS,
    TRAIN_PARTS,
    VQGANConfigError,
    VQGANTrainConfig,
    read_config_yaml,
)

if TYPE_CHECKING:  # annotations only: torch and the VQGAN load when a run starts, not for --help
    import torch

    from medmax.distributed import Dist
    from medmax.image_csv import LoadedImages
    from medmax.vqgan import VQGAN

logger = logging.getLogger("tokenization.train_vqgan")

D = VQGANTrainConfig  # the defaults, written once


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-train-vqgan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="YAML of VQGANTrainConfig settings (and init / preset); flags override it")
    p.add_argument("--input", type=Path, required=True, help="CSV with an img_path / image_path column")
    p.add_argument("--output", type=Path, required=True, help="folder for vqgan.yaml, vqgan.safetensors, reports and the checkpoint")
    p.add_argument("--eval-input", type=Path,
                   help="held-out CSV evaluated during training (default: the first --eval-images training images, labelled so)")
    p.add_argument("--eval-images", type=int, default=256, help="images evaluated (the first of the CSV)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(VQGAN_PRESETS), help="start from a randomly initialised preset (default: tiny)")
    start.add_argument("--init", type=Path, help="start from a saved VQGAN: a Chameleon release, a model folder, or a folder this program wrote")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow an --init checkpoint that needs full unpickling")
    p.add_argument("--column", help="the CSV's image-path column (default: img_path, else image_path)")
    p.add_argument("--image-root", type=Path, help="folder relative paths resolve against (default: each CSV's)")
    p.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels,
                   help="an image with more pixels (width x height, from its header) is a failed row (default: %(default)s)")
    p.add_argument("--max-aspect-ratio", type=float, default=ImageLimits.max_aspect_ratio,
                   help="an image whose long side / short side is larger is a failed row (default: %(default)s)")
    _add_objective_flags(p)
    _add_run_flags(p)
    return p


def _add_objective_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("objective (defaults: VQGANTrainConfig, then --config)")
    g.add_argument("--train", choices=TRAIN_PARTS, help=f"decoder: encoder and codebook frozen, codes unchanged (default {D.train})")
    g.add_argument("--pixel-loss", choices=PIXEL_LOSSES, help=f"default {D.pixel_loss}")
    g.add_argument("--pixel-weight", choices=PIXEL_WEIGHTS,
                   help="contrast: weight each pixel by 1 + ALPHA * |pixel - image mean| (small bright structures count more)")
    g.add_argument("--pixel-weight-alpha", type=float, help=f"ALPHA of --pixel-weight contrast (default {D.pixel_weight_alpha})")
    g.add_argument("--perceptual-weights", type=Path, help="local VGG16 + LPIPS heads file (safetensors or weights-only torch)")
    g.add_argument("--perceptual-weight", type=float, help=f"LPIPS weight (default {D.perceptual_weight}, taming's)")
    g.add_argument("--codebook-weight", type=float, help=f"default {D.codebook_weight}")
    g.add_argument("--disc-start", type=int, help="steps before the discriminator switches on (default: no discriminator)")
    g.add_argument("--disc-weight", type=float, help=f"times the adaptive weight (default {D.disc_weight})")
    g.add_argument("--disc-loss", choices=DISC_LOSSES, help=f"default {D.disc_loss}")
    g.add_argument("--reseed-every", type=int, help=f"steps between dead-code re-seeding, 0: never (default {D.reseed_every})")
    g.add_argument("--no-init-codebook", action="store_true", help="keep the starting codebook instead of k-means++ seeding it")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    g.add_argument("--steps", type=int, help=f"default {D.steps}")
    g.add_argument("--batch-size", type=int, help=f"images per step and process (default {D.batch_size})")
    g.add_argument("--lr", type=float, help=f"default {D.lr}")
    g.add_argument("--scale-lr", action="store_true", help="--lr is a base rate, times batch size times processes (taming)")
    g.add_argument("--seed", type=int, help=f"default {D.seed}")
    g.add_argument("--max-seconds", type=float, help="stop after this much wall time (this invocation)")
    g.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations, 0: before and after only (default {D.eval_every})")
    g.add_argument("--save-every", type=int, help=f"steps between checkpoints (default {D.save_every})")
    g.add_argument("--autocast", choices=AUTOCASTS, help="auto: bf16 on CUDA, none on CPU")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--device", help="cpu, cuda (one device per local rank) or cuda:N (default: cpu)")
    g.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice; under torchrun the CPUs / local processes)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--strict", action="store_true", help="exit 1 when any image could not be read")


_FLAG_FIELDS = ("train", "pixel_loss", "pixel_weight", "pixel_weight_alpha", "perceptual_weight", "codebook_weight", "disc_start",
                "disc_weight", "disc_loss", "reseed_every", "steps", "batch_size", "lr", "seed", "max_seconds", "eval_every",
                "save_every", "autocast", "device")


def resolve_settings(args: argparse.Namespace) -> tuple[VQGANTrainConfig, dict]:
    """The run's config (defaults < --config < flags) and where the VQGAN starts (``{"init": path}`` or ``{"preset": name}``)."""
    values = read_config_yaml(args.config) if args.config is not None else {}
    start = {k: values.pop(k) for k in ("init", "preset") if k in values}
    values.update({k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k) is not None})
    if args.perceptual_weights is not None:
        values["perceptual_weights"] = str(args.perceptual_weights)
    for flag, key, value in (("no_init_codebook", "init_codebook", False), ("scale_lr", "scale_lr", True),
                             ("no_tensorboard", "tensorboard", False)):
        if getattr(args, flag):
            values[key] = value
    values["progress"] = not args.no_progress
    if args.init is not None or args.preset is not None:
        start = {"init": str(args.init)} if args.init is not None else {"preset": args.preset}
    if len(start) > 1:
        raise VQGANConfigError(f"--config {args.config}: give init or preset, not both")
    source = f"--config {args.config} / flags" if args.config else "flags"
    try:
        return VQGANTrainConfig(**values), start or {"preset": "tiny"}
    except (VQGANConfigError, TypeError) as exc:
        raise VQGANConfigError(f"{source}: {exc}") from None


def _setup_model(start: dict, seed: int, trust: bool) -> VQGAN:
    import torch

    from medmax.vqgan import VQGAN, load_vqgan

    if "init" in start:
        return load_vqgan(start["init"], trust_checkpoint=trust)
    if start["preset"] not in VQGAN_PRESETS:
        raise VQGANConfigError(f"preset {start['preset']!r} is not one of {sorted(VQGAN_PRESETS)}")
    torch.manual_seed(seed)  # the random initial weights
    return VQGAN.from_params(VQGAN_PRESETS[start["preset"]])


def _setup_device(config: VQGANTrainConfig, info: Dist, threads: int | None) -> None:
    import torch

    if config.device == "cuda" or config.device.startswith("cuda:"):
        config.device = f"cuda:{info.local_rank}" if config.device == "cuda" else config.device
        torch.cuda.set_device(torch.device(config.device))
    if threads is not None and threads < 1:
        raise VQGANConfigError(f"--threads must be >= 1, got {threads}")
    if threads is not None or info.local_world_size > 1:  # several processes share the CPUs
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // info.local_world_size))


def _load(csv: Path, args: argparse.Namespace, resolution: int, progress: bool) -> LoadedImages:
    from medmax.image_csv import load_image_csv, pick_column

    root = (args.image_root or csv.parent).resolve()
    return load_image_csv(csv, pick_column(csv, args.column), root, resolution, progress, _limits(args))


def _limits(args: argparse.Namespace) -> ImageLimits:
    from medmax.images import allow_in_pillow

    try:
        limits = ImageLimits(max_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio)
    except UserError as exc:
        raise VQGANConfigError(f"--max-image-pixels / --max-aspect-ratio: {exc}") from None
    allow_in_pillow(limits)  # Pillow's own bomb check never refuses what the limits allow
    return limits


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _check_paths(args: argparse.Namespace) -> None:
    for flag, path in (("--input", args.input), ("--eval-input", args.eval_input)):
        if path is not None and not path.is_file():
            raise VQGANConfigError(f"{flag} {path}: no such file")
    if args.eval_images < 1:
        raise VQGANConfigError(f"--eval-images must be >= 1, got {args.eval_images}")
    _limits(args)


def _data(args, vqgan, progress: bool, is_main: bool) -> tuple[LoadedImages, LoadedImages | None, list[dict]]:
    """(training images, held-out images or None, failures); failures are written to errors.jsonl by rank 0."""
    train = _load(args.input, args, vqgan.resolution, progress)
    held = None if args.eval_input is None else _load(args.eval_input, args, vqgan.resolution, progress)
    errors = train.errors + [{**e, "csv": str(args.eval_input)} for e in (held.errors if held else [])]
    if is_main:
        args.output.mkdir(parents=True, exist_ok=True)
        _write_jsonl(args.output / "errors.jsonl", errors)
    for flag, csv, loaded in (("--input", args.input, train), ("--eval-input", args.eval_input, held)):
        if loaded is not None and loaded.pixels is None:
            raise VQGANConfigError(f"{flag} {csv}: none of its images could be read (see {args.output / 'errors.jsonl'})")
    return train, held, errors


def _eval_set(args, train: LoadedImages, held: LoadedImages | None) -> tuple[torch.Tensor, str]:
    """The images evaluated during training and what they are: held-out (--eval-input) or the first training images."""
    if held is not None:
        n = min(args.eval_images, held.pixels.shape[0])
        trained_on = len(set(held.files[:n]) & set(train.files))
        if trained_on:  # the same file in both CSVs: its PSNR is not a held-out one
            logger.warning("%d of the %d --eval-input images evaluated are also --input images: the evaluation is not held out",
                           trained_on, n)
            return held.pixels[:n], f"partly training images ({trained_on} of the first {n} of --eval-input are in --input)"
        return held.pixels[:n], f"held-out images (the first {n} of --eval-input {args.eval_input})"
    n = min(args.eval_images, train.pixels.shape[0])
    return train.pixels[:n], f"training images (the first {n} of --input; not held out: give --eval-input for that)"


def _run(args: argparse.Namespace) -> int:
    config, start = resolve_settings(args)
    _check_paths(args)
    from medmax.distributed import process_group

    with process_group() as info:
        return _train(args, config, start, info)


def _train(args: argparse.Namespace, config, start: dict, info) -> int:
    """Train in this rank of the launch; rank 0 writes the folder."""
    _setup_device(config, info, args.threads)
    from medmax.data.inputs import file_digest
    from medmax.perceptual import load_lpips
    from medmax.vqgan_training import RunContext, Trainer, stack_images

    vqgan = _setup_model(start, config.seed, args.trust_checkpoint)
    digest_before = vqgan.codes_digest() if "init" in start else None  # a random start has no codes anyone tokenized with
    train, held, errors = _data(args, vqgan, config.progress and info.rank == 0, info.rank == 0)
    eval_pixels, eval_label = _eval_set(args, train, held)
    perceptual = load_lpips(config.perceptual_weights) if config.perceptual_weights else None
    identity = {"input_images": train.digest, "eval_input_images": held.digest if held else None, "eval_images": args.eval_images,
                "start": start.get("preset") or str(Path(start["init"]).resolve()), "start_codes": digest_before,
                "perceptual_weights_sha256": file_digest(Path(config.perceptual_weights)) if perceptual else None,
                "column": args.column, "image_root": str(args.image_root.resolve()) if args.image_root else None}
    label = "held-out" if eval_label.startswith("held-out") else "training-image"
    context = RunContext(output=args.output, eval_pixels=eval_pixels, eval_label=label,
                         perceptual=perceptual, identity=identity, dist=info)
    trainer = Trainer(vqgan, stack_images(train.pixels, vqgan.resolution), config, context)
    trainer.run()
    if info.rank == 0:
        _finish(args, trainer, errors, digest_before, (eval_pixels, eval_label))
    return 1 if args.strict and errors else 0


def _finish(args, trainer, errors, digest_before, evaluated) -> None:
    from medmax.vqgan import save_vqgan
    from medmax.vqgan_eval import save_grid
    from medmax.vqgan_training import config_dict

    vqgan, config, history, evals, n_images = trainer.vqgan, trainer.config, trainer.history, trainer.evals, trainer.pixels.shape[0]
    save_vqgan(vqgan, args.output)
    _write_jsonl(args.output / "history.jsonl", history)
    _write_jsonl(args.output / "evals.jsonl", evals)
    save_grid(vqgan, evaluated[0], args.output / "reconstructions.png")
    digest_after = vqgan.codes_digest()
    summary = {"n_images": n_images, "n_failed": len(errors), "steps_run": history[-1]["step"] if history else 0,
               "seconds": history[-1]["seconds"] if history else 0.0, "cpu_seconds": history[-1]["cpu_seconds"] if history else 0.0,
               "eval_images": evaluated[1], "before": evals[0] if evals else None, "after": evals[-1] if evals else None,
               "codes_digest_before": digest_before, "codes_digest_after": digest_after,
               "codes_changed": None if digest_before is None else digest_before != digest_after, "config": config_dict(config)}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    after = summary["after"] or {}
    logger.info("trained %d steps in %.1f s on %d images (%d unreadable): %s PSNR %.2f dB, SSIM %.3f, codes used %s; wrote %s",
                summary["steps_run"], summary["seconds"], n_images, len(errors), trainer.ctx.eval_label, after.get("psnr", float("nan")),
                after.get("ssim", float("nan")), after.get("codes_used"), args.output)
    if summary["codes_changed"]:
        logger.warning("the codes changed (--train all): images tokenized with the starting VQGAN must be tokenized again, "
                       "into a new image_tokenize --output")


@program("medmax-train-vqgan")
def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
