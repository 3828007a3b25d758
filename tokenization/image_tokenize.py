"""Tokenize a CSV of images into VQGAN code grids, on one CPU or many GPUs.

Usage::

    # one process
    python -m tokenization.image_tokenize --input data/images.csv --output data/image_tokens --ckpt CKPT
    # N processes (CPU: gloo; GPU: nccl, one device per local rank)
    torchrun --nproc-per-node N -m tokenization.image_tokenize --input data/images.csv \\
        --output data/image_tokens --ckpt CKPT --batch-size 16 --workers 4 --dtype bf16
    # images larger than the default limits (64 Mpx, aspect ratio 20)
    python -m tokenization.image_tokenize ... --max-image-pixels 200000000 --max-aspect-ratio 50
    # volumes (NIfTI, DICOM series folders, .npy): 16 axial slices each at 256 px, CT abdomen window
    python -m tokenization.image_tokenize --input data/ct.csv --volume-column volume --output data/volume_tokens \
        --ckpt CKPT --slices 16 --slice-resolution 256 --window abdomen

``--batch-size`` defaults per device: 1 on CPU, where batches of 4 or 8 are no faster and take 2.5x the
memory (measured in BENCHMARKS.md), and 16 on CUDA. fp32 codes do not depend on it.

The CSV column ``img_path`` (MedMax) or ``image_path`` (or ``--column NAME``) names each image;
relative paths resolve against ``--image-root`` (default: the CSV's folder) and no path may leave it.
``--ckpt`` is a MedMax / Chameleon / Anole folder (``tokenizer/vqgan.{yaml,ckpt}``), a folder holding
``vqgan.yaml`` and ``vqgan.ckpt`` (or ``.safetensors``), or a Hugging Face Chameleon checkpoint.

Every CSV row ends as exactly one of: written (its codes are in a partition), failed (listed in
``errors/part*.jsonl`` with the reason: unreadable, over a limit, not valid UTF-8, out of memory...)
or skipped as a duplicate (an earlier row has the same path; its codes are that row's). The closing
line and ``summary.json`` count all three, and they add up to the CSV's rows. A failed row never
takes down its batch or a later partition; the run exits 0 unless ``--strict`` is given and a row failed.

Limits (see ``medmax.images.ImageLimits``): an image whose header says more than ``--max-image-pixels``
(default 67,108,864 = 8192 x 8192) or an aspect ratio over ``--max-aspect-ratio`` (default 20) is a
failed row, checked before it is decoded. A VQGAN config whose weights would not fit in the memory
available is refused before anything is allocated (``--skip-memory-check`` to try anyway).

Volumes (``--volume-column NAME``): each row names a NIfTI file, a folder holding one DICOM series or a
``.npy`` array (:mod:`medmax.volumes`: read slice by slice, reoriented to LPS, slices along z inferior to
superior). ``--slices K`` takes K evenly spaced slices (``all``: every slice), or ``--slice-column`` gives a
row's own list; ``--slice-resolution R`` (a multiple of 16 for Chameleon's VQGAN: 256 px is 256 codes a slice)
and ``--window`` (``lung``, ``mediastinum``, ``bone``, ``brain``, ``abdomen``, ``W/L`` in HU, or
``percentile`` for MRI) decide the pixels. A volume is one row of the folder, with its slices' codes,
indices, positions in mm, grid, window and spacing (:mod:`medmax.image_tokens`). A row naming a volume in
an image run fails, telling you to use ``--volume-column``.

The engine is :mod:`medmax.image_tokenizing` (how the work is split over ranks and partitions, and why a
rerun cannot lose, repeat or mix a row); the folder's format is :mod:`medmax.image_tokens`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medmax.cli import program
from medmax.distributed import process_group
from medmax.image_tokenizing import DEFAULT_BATCH_SIZE, TokenizeConfig, summary_line, tokenize_images
from medmax.images import allow_in_pillow


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-image-tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="CSV with one image path per row")
    p.add_argument("--output", required=True, type=Path, help="folder for the parquet partitions")
    p.add_argument("--ckpt", required=True, type=Path, help="VQGAN checkpoint (see the module docstring)")
    p.add_argument("--column", help="image-path column (default: img_path, else image_path)")
    p.add_argument("--image-root", type=Path, help="folder relative paths resolve against (default: the CSV's)")
    p.add_argument("--partition-size", type=int, default=TokenizeConfig.partition_size,
                   help="CSV rows per output file (also the most work a kill can lose)")
    p.add_argument("--batch-size", type=int,
                   help="images per VQGAN forward pass (default: %s)" % ", ".join(f"{n} on {d}" for d, n in DEFAULT_BATCH_SIZE.items()))
    p.add_argument("--workers", type=int, default=TokenizeConfig.workers, help="DataLoader processes that decode and preprocess")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=TokenizeConfig.dtype, help="fp32 is code-exact; bf16 is faster")
    p.add_argument("--channels-last", action="store_true",
                   help="fp32 in channels-last layout: ~15%% faster on CPU, but codes may differ from taming's at near-ties")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / local processes)")
    p.add_argument("--resolution", type=int, metavar="N",
                   help="tokenize at N px: square N x N, or with --aspect keep about N*N pixels (default: the VQGAN's resolution)")
    p.add_argument("--aspect", choices=("square", "keep"), default=TokenizeConfig.aspect,
                   help="square: MedMax's centre crop (code-exact with the reference); keep: the image's aspect on a grid of "
                        "about as many codes (README, 'Non-square images')")
    p.add_argument("--frame", type=int, default=TokenizeConfig.frame, help="frame of multi-frame images (DICOM, TIFF) to take")
    p.add_argument("--max-image-pixels", type=int, default=TokenizeConfig.max_image_pixels,
                   help="an image with more pixels (width x height, from its header) is a failed row (default: %(default)s)")
    p.add_argument("--max-aspect-ratio", type=float, default=TokenizeConfig.max_aspect_ratio,
                   help="an image whose long side / short side is larger is a failed row (default: %(default)s)")
    v = p.add_argument_group("volumes")
    v.add_argument("--volume-column", help="rows are volumes (NIfTI, DICOM series folder, .npy) named in this column")
    v.add_argument("--slices", default=TokenizeConfig.slices, help="slices per volume, evenly spaced along z, or all (default: %(default)s)")
    v.add_argument("--slice-column", help="a column holding a row's own slice list, e.g. '3 7 12' (empty: --slices)")
    v.add_argument("--slice-resolution", type=int, help="slice side in pixels, a multiple of the VQGAN's 16 (default: its resolution)")
    v.add_argument("--window", default=TokenizeConfig.window,
                   help="lung | mediastinum | bone | brain | abdomen | W/L in HU | percentile (MRI) (default: %(default)s)")
    v.add_argument("--volume-index", type=int, help="which volume of a 4D file")
    p.add_argument("--skip-memory-check", action="store_true", help="load a VQGAN even if its weights seem not to fit in memory")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint that needs full unpickling")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any image failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("strict", "no_progress")}
    return TokenizeConfig(**flags, progress=not args.no_progress)


@program("medmax-image-tokenize")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    allow_in_pillow(cfg.limits)
    with process_group() as info:  # after parsing: --help does not load torch
        result = tokenize_images(cfg, info)
    if result.summary is not None:
        print(summary_line(result.summary, cfg.output))
    return 1 if args.strict and result.failed > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
