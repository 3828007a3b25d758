"""Train a VQGAN to reconstruct a CSV of images for a fixed step or time budget, so its codes decode to images.

Usage::

    python -m tokenization.train_vqgan --input data/images.csv --output data/vqgan \\
        --preset tiny --steps 300 --batch-size 16 --lr 5e-4 --seed 0 --max-seconds 60 --threads 2
    # small bright structures (lesions) kept: lower lr, contrast-weighted L1 (measured on the synthetic scans:
    # lesion pixels reconstructed, linear-probe lesion presence/position 0.99/0.99 from the codes)
    python -m tokenization.train_vqgan --input data/images.csv --output data/vqgan --preset tiny --steps 300 \\
        --batch-size 16 --lr 5e-4 --pixel-weight contrast --pixel-weight-alpha 10 --seed 0 --max-seconds 60 --threads 2
    # continue from a saved VQGAN (weights only; the optimizer starts afresh)
    python -m tokenization.train_vqgan --input data/images.csv --output data/vqgan2 --init data/vqgan --steps 60

The CSV is read like ``tokenization.image_tokenize`` reads it: column ``img_path`` or ``image_path``
(or ``--column NAME``), relative paths against ``--image-root`` (default: the CSV's folder), no path
may leave that root. Unreadable images are never replaced: each is listed with its reason in
``OUTPUT/errors.jsonl``, counted in ``OUTPUT/summary.json`` and logged; ``--strict`` makes any of them
an error (exit 1).

Writes into ``--output``: ``vqgan.yaml`` + ``vqgan.safetensors`` (loadable with ``medmax.vqgan.load_vqgan``
and by ``image_tokenize --ckpt``), ``history.jsonl`` (training records), ``summary.json`` (reconstruction
L1 and codes used before and after, on up to ``--eval-images`` of the inputs; timings; failures), and
``reconstructions.png`` (inputs on the top row, their reconstructions below).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.cli import program
from medmax.presets import VQGAN_PRESETS
from medmax.vqgan_train_config import VQGANTrainConfig
from tokenization.image_tokenize import pick_column, resolve_image

if TYPE_CHECKING:  # annotations only: torch and the VQGAN load when a run starts, not for --help
    import torch

    from medmax.vqgan import VQGAN

logger = logging.getLogger("tokenization.train_vqgan")

N_SHOWN = 8  # images in reconstructions.png


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-train-vqgan", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="CSV with an img_path / image_path column")
    p.add_argument("--output", type=Path, required=True, help="folder for vqgan.yaml, vqgan.safetensors and reports")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(VQGAN_PRESETS), help="start from a randomly initialised preset (default: tiny)")
    start.add_argument("--init", type=Path, help="start from a saved VQGAN (any layout load_vqgan reads)")
    p.add_argument("--column", help="the CSV's image-path column (default: img_path, else image_path)")
    p.add_argument("--image-root", type=Path, help="folder relative paths resolve against (default: the CSV's)")
    p.add_argument("--steps", type=int, default=VQGANTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=VQGANTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=VQGANTrainConfig.lr)
    p.add_argument("--pixel-loss", choices=["l1", "mse"], default=VQGANTrainConfig.pixel_loss)
    p.add_argument("--pixel-weight", choices=["none", "contrast"], default=VQGANTrainConfig.pixel_weight,
                   help="contrast: weight each pixel by 1 + ALPHA * |pixel - image mean| (small bright structures count more)")
    p.add_argument("--pixel-weight-alpha", type=float, default=VQGANTrainConfig.pixel_weight_alpha, help="ALPHA of --pixel-weight contrast")
    p.add_argument("--reseed-every", type=int, default=VQGANTrainConfig.reseed_every, help="steps between dead-code re-seeding (0: never)")
    p.add_argument("--no-init-codebook", action="store_true", help="keep the starting codebook instead of k-means++ seeding it")
    p.add_argument("--seed", type=int, default=VQGANTrainConfig.seed)
    p.add_argument("--max-seconds", type=float, help="stop after this much wall time")
    p.add_argument("--eval-images", type=int, default=256, help="inputs on which the before / after error is measured")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any image could not be read")
    return p


def load_images(csv: Path, column: str, root: Path, resolution: int) -> tuple[torch.Tensor | None, list[dict]]:
    """Every row's image as (N, 3, R, R) in [-1, 1] (None when none loads), and the failures ``{row, img_path, error}``."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from medmax.images import ImageLoadError, load_image, preprocess

    paths = pd.read_csv(csv, usecols=[column], dtype=str, keep_default_na=False, skip_blank_lines=False)[column].tolist()
    pixels, errors = [], []
    for row, img_path in enumerate(tqdm(paths, desc="images", unit="img")):
        try:
            pixels.append(preprocess(load_image(resolve_image(img_path, root)), resolution))
        except ImageLoadError as exc:
            errors.append({"row": row, "img_path": img_path, "error": exc.reason})
            logger.warning("%s row %d: %s", csv, row, exc)
    return (torch.stack(pixels) if pixels else None), errors


def _setup_model(args: argparse.Namespace) -> VQGAN:
    import torch

    from medmax.vqgan import VQGAN, load_vqgan

    if args.init is not None:
        return load_vqgan(args.init)
    torch.manual_seed(args.seed)  # the random initial weights
    return VQGAN.from_params(VQGAN_PRESETS[args.preset or "tiny"])


def _config(args: argparse.Namespace) -> VQGANTrainConfig:
    try:
        return VQGANTrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, pixel_loss=args.pixel_loss,
            pixel_weight=args.pixel_weight, pixel_weight_alpha=args.pixel_weight_alpha,
            init_codebook=not args.no_init_codebook, reseed_every=args.reseed_every, max_seconds=args.max_seconds,
            seed=args.seed, device=args.device, progress=True,
        )
    except ValueError as exc:
        raise SystemExit(f"invalid flags: {exc}") from exc


def save_reconstructions(vqgan: VQGAN, pixels: torch.Tensor, path: Path) -> None:
    """A PNG grid: the first images on the top row, their encode -> decode reconstructions below."""
    import torch
    from PIL import Image

    from medmax.vqgan import to_uint8

    x = pixels[:N_SHOWN]
    recon = vqgan.decode_codes(vqgan.encode_codes(x)).cpu()
    rows = [torch.cat(list(to_uint8(t)), dim=1) for t in (x, recon)]  # each (R, n*R, 3)
    Image.fromarray(torch.cat(rows, dim=0).numpy(), "RGB").save(path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.input.is_file():
        raise SystemExit(f"--input {args.input}: no such file")
    if args.eval_images < 1:
        raise SystemExit(f"--eval-images must be >= 1, got {args.eval_images}")
    config = _config(args)
    import torch  # after parsing: --help does not load torch

    from medmax.vqgan import save_vqgan
    from medmax.vqgan_training import config_dict, evaluate_reconstruction, train_vqgan

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    vqgan = _setup_model(args)
    root = (args.image_root or args.input.parent).resolve()
    pixels, errors = load_images(args.input, pick_column(args.input, args.column), root, vqgan.resolution)
    args.output.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.output / "errors.jsonl", errors)
    if pixels is None:
        raise SystemExit(f"{args.input}: none of its {len(errors)} images could be read (see {args.output / 'errors.jsonl'})")
    before = evaluate_reconstruction(vqgan, pixels[: args.eval_images])
    history = train_vqgan(vqgan, pixels, config)
    after = evaluate_reconstruction(vqgan, pixels[: args.eval_images])
    save_vqgan(vqgan, args.output)
    _write_jsonl(args.output / "history.jsonl", history)
    save_reconstructions(vqgan, pixels, args.output / "reconstructions.png")
    summary = {"n_images": int(pixels.shape[0]), "n_failed": len(errors), "steps_run": history[-1]["step"],
               "seconds": history[-1]["seconds"], "cpu_seconds": history[-1]["cpu_seconds"],
               "before": before, "after": after, "config": config_dict(config)}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("trained %d steps in %.1f s on %d images (%d unreadable): L1 %.4f -> %.4f, codes used %d -> %d; wrote %s",
                summary["steps_run"], summary["seconds"], summary["n_images"], len(errors), before["l1"], after["l1"],
                before["codes_used"], after["codes_used"], args.output)
    return 1 if args.strict and errors else 0


main = program("medmax-train-vqgan")(main)  # every program's main goes through medmax.cli

if __name__ == "__main__":
    sys.exit(main())
