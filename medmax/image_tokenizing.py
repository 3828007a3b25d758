"""Image tokenization's engine: a CSV of images -> an image-token folder (:mod:`medmax.image_tokens`), on one
process or every rank of a torchrun launch. ``tokenization.image_tokenize`` is its program (flags, usage).

:class:`TokenizeConfig` holds one run's settings, checked when made; :func:`tokenize_images` runs it on this
rank (the process group joined by the caller, :func:`medmax.distributed.process_group`). The parts, in the
order a run takes them: the settings that decide a code and the manifest that records them (:class:`Settings`,
:func:`_check_manifest`), the CSV cut into partitions and this rank's plan (:func:`iter_partitions`,
:class:`PartitionPlan`), the row loader (:class:`ImageRows`), the partition writer (:class:`PartitionWriter`),
and the coordination between ranks (rank 0 checks and closes the folder, :func:`_share`).

Every CSV row ends as exactly one of: written (its codes are in a partition), failed (listed in
``errors/part*.jsonl`` with the reason: unreadable, over a limit, not valid UTF-8, out of memory...)
or skipped as a duplicate (an earlier row has the same path; its codes are that row's). The closing
line and ``summary.json`` count all three, and they add up to the CSV's rows. A failed row never
takes down its batch or a later partition.

How the work is split, and why it cannot lose, repeat or mix a row:
- CSV rows are cut into global partitions of ``--partition-size`` consecutive rows; partition ``k``
  belongs to rank ``k % world_size``. Every row is in exactly one partition, for any world size,
  batch size or worker count (no sampler padding).
- A partition is written as ``.tmp`` and renamed to ``tokens-rank{R}-part{K}.parquet`` only when all
  of its rows are written, failed or skipped; the file records a digest of its rows (their paths and
  duplicate flags).
- A rerun is keyed on content, not paths: each partition of the CSV as it is now is compared with the
  digest of the finished file; an unchanged partition is kept, a changed one (rows appended, edited
  or removed before it) is redone, and partitions past the CSV's end are removed. So appended rows
  are tokenized, and rows edited out of a half-done run leave nothing stale and lose nothing.
- ``manifest.json`` records every setting that can change a code (``--dtype``, ``--channels-last``,
  ``--frame``, the limits, the device type, the partition cut, the column and image root) and a
  content digest of the VQGAN's encoder and codebook weights. A rerun with any difference stops
  before any work and names it; use a new ``--output``. When the run completes, the manifest also
  gets the row counts and a digest of the CSV's image paths, which ``build_sequences`` fingerprints.
- The CSV is streamed one partition at a time; memory grows only by a hash per distinct path (about
  100 bytes each, to find duplicates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from . import image_csv
from .distributed import Dist
from .errors import UserError
from .image_csv import display_path, path_bytes, resolve_image
from .image_tokens import (
    FORMAT,
    MANIFEST,
    PARTITION_GLOB,
    READABLE_VERSIONS,
    SUMMARY,
    VERSION,
    VolumeCodes,
    error_path,
    grid_counts,
    partition_index,
    partition_info,
    partition_path,
    partition_table,
    read_image_token_manifest,
    write_errors,
    write_json,
    write_partition,
    volume_table,
)
from .image_layout import ASPECTS
from .images import ImageLimits, ImageLoadError, load_image, preprocess
from .memory import MemoryBudgetError
from .volume_tokenizing import VolumeRule, VolumeSlices, encode_volume, load_volume_row, row_key, split_key
from .volumes import Intensity, is_volume_path

if TYPE_CHECKING:  # annotations only: torch, pandas and the VQGAN load in the functions that run, not for --help
    import torch

    from .vqgan import VQGAN

logger = logging.getLogger(__name__)

_PROGRESS_KEY = "medmax_image_tokenize_done"
_CSV_OPTIONS = dict(dtype=object, keep_default_na=False, encoding_errors="surrogateescape")  # bad bytes become one row's error


@dataclass(frozen=True)
class Settings:
    """Everything that decides a code or whether a row fails: a rerun into the same folder must agree on all of it."""

    vqgan_digest: str  # VQGAN.codes_digest(): the encoder, quant_conv and codebook weights, not their path
    resolution: int  # the square side images are tokenized at (--resolution; default: the VQGAN's)
    aspect: str  # square (MedMax's centre crop) or keep (medmax.image_layout's grids of about resolution**2 pixels)
    downsampling: int  # pixels per code along a side, from the checkpoint
    n_embed: int  # codebook size, from the checkpoint
    dtype: str  # fp32 (code-exact) or bf16
    channels_last: bool  # memory layout of the encoder (bf16 implies it); changes float rounding
    device_type: str  # cpu or cuda: different kernels, different rounding at near-ties
    frame: int  # frame of multi-frame images
    max_image_pixels: int  # images over it are failed rows
    max_aspect_ratio: float  # images over it are failed rows
    column: str  # the CSV's image-path column
    image_root: str  # relative paths resolve here; no path may leave it
    partition_size: int  # CSV rows per output partition
    kind: str = "images"  # "images" or "volumes" (--volume-column); the rest is None for images
    slices: str | None = None  # K evenly spaced slices, or "all"
    slice_column: str | None = None  # the CSV column with a row's own slice list
    slice_resolution: int | None = None  # slice side given to the VQGAN
    window: str | None = None  # CT window name, W/L, or percentile
    volume_index: int | None = None  # the volume of a 4D file

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_image_pixels, max_aspect_ratio=self.max_aspect_ratio)


FLAGS = {  # how a user changes each setting, for the message naming a difference
    "vqgan_digest": "--ckpt (the VQGAN's weights)", "resolution": "--resolution", "aspect": "--aspect",
    "downsampling": "--ckpt (the VQGAN's downsampling)",
    "n_embed": "--ckpt (the VQGAN's codebook size)", "dtype": "--dtype", "channels_last": "--channels-last",
    "device_type": "--device", "frame": "--frame", "max_image_pixels": "--max-image-pixels",
    "max_aspect_ratio": "--max-aspect-ratio", "column": "--column", "image_root": "--image-root",
    "partition_size": "--partition-size", "kind": "--volume-column", "slices": "--slices", "slice_column": "--slice-column",
    "slice_resolution": "--slice-resolution", "window": "--window", "volume_index": "--volume-index",
}
# What a version-2 manifest (written before volumes) means by the settings it lacks.
_V2_SETTINGS = {"kind": "images", "slices": None, "slice_column": None, "slice_resolution": None, "window": None, "volume_index": None}


# ------------------------------------------------------------------------------------------- the run's config


# Images per VQGAN forward pass when --batch-size is not given, by device type. On CPU the convolutions
# already keep every core busy at batch 1: at 512 px on 2 cores, batches of 1, 4 and 8 ran at the same
# images/s (ratios 0.99 and 1.01, 3 interleaved rounds), while peak RSS went from 1.3 GB to 3.3 GB
# (bench/results/startup-batch-full-*.json: `python bench/bench_startup.py --only batch --dtype fp32
# --batch-sizes 1,4,8`). On CUDA a batch is what fills the device; 16 is MedMax's order of magnitude (its
# default is 64) kept small enough to share a GPU. Not measured here: no GPU.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 16}


class TokenizeError(UserError):
    """An image-tokenization setting, input or output folder that cannot be used; the message names the flag."""


@dataclass
class TokenizeConfig:
    """One run (``tokenization.image_tokenize`` fills it from its flags, which share these names); checked when made."""

    input: Path  # CSV with one image path per row
    output: Path  # the image-token folder
    ckpt: Path  # the VQGAN: a MedMax / Chameleon / Anole folder, a vqgan.yaml folder or a Hugging Face checkpoint
    column: str | None = None  # image-path column (default: img_path, else image_path)
    image_root: Path | None = None  # relative paths resolve here (default: the CSV's folder)
    partition_size: int = 2_000  # CSV rows per output file (also the most work a kill can lose)
    batch_size: int | None = None  # images per VQGAN forward pass (default: DEFAULT_BATCH_SIZE of the device)
    workers: int = 2  # DataLoader processes that decode and preprocess
    dtype: str = "fp32"  # fp32 (code-exact) or bf16
    channels_last: bool = False  # fp32 in channels-last layout (bf16 implies it)
    device: str | None = None  # cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available, else cpu)
    threads: int | None = None  # torch CPU threads per process (default: cores / local processes)
    frame: int = 0  # frame of multi-frame images
    resolution: int | None = None  # square side whose code count the images get (default: the VQGAN's resolution)
    aspect: str = "square"  # square: MedMax's centre crop; keep: the aspect, on a grid of about as many codes
    max_image_pixels: int = ImageLimits.max_pixels
    max_aspect_ratio: float = ImageLimits.max_aspect_ratio
    skip_memory_check: bool = False  # load a VQGAN even if its weights seem not to fit in memory
    trust_checkpoint: bool = False  # allow a checkpoint that needs full unpickling
    progress: bool = True  # a progress bar on rank 0
    volume_column: str | None = None  # rows are volumes (NIfTI, DICOM series folder, .npy) named in this column
    slices: str = "16"  # volumes: K slices evenly spaced along z, or "all"
    slice_column: str | None = None  # volumes: a column holding a row's own slice list (empty: --slices)
    slice_resolution: int | None = None  # volumes: slice side, a multiple of the VQGAN's downsampling (default: its resolution)
    window: str = "percentile"  # volumes: lung | mediastinum | bone | brain | abdomen | W/L in HU | percentile
    volume_index: int | None = None  # volumes: which volume of a 4D file

    def __post_init__(self):
        self.input, self.output, self.ckpt = Path(self.input), Path(self.output), Path(self.ckpt)
        self.image_root = None if self.image_root is None else Path(self.image_root)
        if not self.input.is_file():
            raise TokenizeError(f"--input {self.input}: no such CSV file")
        for flag in ("partition_size", "batch_size"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise TokenizeError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(self, flag)}")
        if self.workers < 0:
            raise TokenizeError(f"--workers must be >= 0, got {self.workers}")
        if self.frame < 0:
            raise TokenizeError(f"--frame must be >= 0, got {self.frame}")
        if self.aspect not in ASPECTS:
            raise TokenizeError(f"--aspect {self.aspect!r}: choose one of {', '.join(ASPECTS)}")
        if self.resolution is not None and self.resolution < 1:
            raise TokenizeError(f"--resolution must be at least 1, got {self.resolution}")
        if self.dtype not in ("fp32", "bf16"):
            raise TokenizeError(f"--dtype {self.dtype!r}: choose fp32 or bf16")
        self.limits  # noqa: B018 - validates the limits
        self._check_volume_flags()

    def _check_volume_flags(self) -> None:
        from .volumes import Intensity

        self.slices = str(self.slices).strip().lower()
        if self.slices != "all" and not (self.slices.isdigit() and int(self.slices) >= 1):
            raise TokenizeError(f"--slices {self.slices!r}: give a number of slices (at least 1) or all")
        try:
            self.window = Intensity.parse(self.window).spec
        except ValueError as exc:
            raise TokenizeError(f"--window: {exc}") from None
        if self.volume_index is not None and self.volume_index < 0:
            raise TokenizeError(f"--volume-index must be >= 0, got {self.volume_index}")
        if self.slice_resolution is not None and self.slice_resolution < 1:
            raise TokenizeError(f"--slice-resolution must be positive, got {self.slice_resolution}")

    @property
    def limits(self) -> ImageLimits:
        try:
            return ImageLimits(max_pixels=self.max_image_pixels, max_aspect_ratio=self.max_aspect_ratio)
        except ValueError as exc:
            raise TokenizeError(f"--max-image-pixels / --max-aspect-ratio: {exc}") from None


# ----------------------------------------------------------------------------------- CSV and partitions


@dataclass(frozen=True)
class Source:
    """Where the rows come from: the CSV and how it is read and cut."""

    csv: str
    column: str
    partition_size: int
    slice_column: str | None = None  # volumes: a row's own slice list, part of its key (medmax.volume_tokenizing)


def iter_partitions(source: Source) -> Iterator[tuple[int, list[str]]]:
    """Stream the CSV as ``(partition index, the paths of its rows)``, one partition in memory at a time.

    Bytes that are not UTF-8 become lone surrogates (``surrogateescape``), so such a row fails alone.
    """
    import pandas as pd

    columns = [source.column] + ([source.slice_column] if source.slice_column not in (None, source.column) else [])
    reader = pd.read_csv(source.csv, usecols=columns, skip_blank_lines=False, chunksize=source.partition_size, **_CSV_OPTIONS)
    try:
        with reader:
            for k, frame in enumerate(reader):
                paths = [str(p) for p in frame[source.column].tolist()]
                if source.slice_column is not None:
                    paths = [row_key(p, str(s)) for p, s in zip(paths, frame[source.slice_column].tolist())]
                yield k, paths
    except pd.errors.ParserError as exc:
        raise TokenizeError(f"--input {source.csv}: cannot be parsed as CSV ({exc})") from None


def rows_digest(paths: list[str], duplicates: frozenset[int]) -> str:
    """sha256 of a partition's rows: each path (length-prefixed) and whether it repeats an earlier row."""
    digest = hashlib.sha256()
    for row, img_path in enumerate(paths):
        data = path_bytes(img_path)
        digest.update(len(data).to_bytes(8, "little") + data + (b"D" if row in duplicates else b"-"))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PartitionPlan:
    """What this rank must do, from the CSV as it is now and the partitions already in the folder."""

    n_rows: int  # rows in the CSV
    digests: list[str]  # rows_digest of every partition
    todo: dict[int, frozenset[int]]  # this rank's partitions to (re)write -> their duplicate rows
    done_rows: int  # rows in partitions already finished with the right digest (any rank)


def finished_files(output: Path) -> dict[int, list[tuple[Path, dict]]]:
    """Partition index -> its finished files (any rank, any run) with their metadata."""
    found: dict[int, list[tuple[Path, dict]]] = {}
    for path in sorted(output.glob(PARTITION_GLOB)):
        try:
            info = partition_info(path)
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("%s: unreadable (%s); its partition is redone", path, exc)
            continue
        if info is None:
            raise TokenizeError(f"{path}: not written by this version of image_tokenize (no partition metadata); use a new --output")
        found.setdefault(partition_index(path), []).append((path, info))
    return found


def make_plan(source: Source, output: Path, info: Dist) -> PartitionPlan:
    """Stream the CSV once: each partition's digest and duplicate rows; keep what matches, plan the rest."""
    finished, seen = finished_files(output), set()
    plan = PartitionPlan(n_rows=0, digests=[], todo={}, done_rows=0)
    for k, paths in iter_partitions(source):
        duplicates = frozenset(_mark_duplicates(paths, seen))
        plan.digests.append(rows_digest(paths, duplicates))
        plan.n_rows += len(paths)
        good = [path for path, meta in finished.get(k, []) if meta.get("digest") == plan.digests[k]]
        if good:
            plan.done_rows += len(paths)
        elif k % info.world_size == info.rank:
            plan.todo[k] = duplicates
        if k % info.world_size == info.rank:  # this rank looks after its partitions' leftovers
            _remove([path for path, _ in finished.get(k, []) if path not in good[:1]])
    return plan


def _mark_duplicates(paths: list[str], seen: set[bytes]) -> Iterator[int]:
    """Rows whose path an earlier row of the CSV had (``seen`` holds 16-byte hashes of every path so far)."""
    for row, img_path in enumerate(paths):
        key = hashlib.blake2b(path_bytes(img_path), digest_size=16).digest()
        if key in seen:
            yield row
        seen.add(key)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        logger.info("removing %s: its rows are no longer the CSV's", path.name)
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- loading


class ImageRows:
    """This rank's partitions to do, row by row: ``(k, row, n_rows, img_path, pixels | None, error | None, duplicate)``.

    Rows are dealt to DataLoader workers round-robin; each item says how many rows its partition has,
    so the main process knows when a partition is complete. A row's failure, whatever it is, is that
    row's error: it never ends the batch, the partition or the run. A torch ``IterableDataset`` (registered as
    one in :func:`run`, so that importing this module for --help does not load torch).
    """

    def __init__(self, source: Source, settings: Settings, plan: PartitionPlan):
        self.source, self.settings, self.plan = source, settings, plan

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        seen = 0
        for k, paths in iter_partitions(self.source):
            if k not in self.plan.todo:
                continue
            duplicates = self.plan.todo[k]
            if rows_digest(paths, duplicates) != self.plan.digests[k]:
                raise RuntimeError(f"--input {self.source.csv} changed while it was being tokenized (partition {k}); run again")
            for row, img_path in enumerate(paths):
                if seen % n_workers == worker:
                    loaded = (None, None) if row in duplicates else self._load(img_path)
                    yield (k, row, len(paths), img_path, *loaded, row in duplicates)
                seen += 1

    def _load(self, img_path: str) -> tuple[torch.Tensor | VolumeSlices | None, str | None]:
        limits = self.settings.limits
        try:
            if self.settings.kind == "volumes":
                return load_volume_row(img_path, _volume_rule(self.settings)), None
            if is_volume_path(resolve_image(Path(self.settings.image_root), img_path)):
                return None, "a volume (NIfTI, .npy or a folder): tokenize volumes with --volume-column"
            image = load_image(resolve_image(Path(self.settings.image_root), img_path), frame=self.settings.frame, limits=limits)
            keep = self.settings.downsampling if self.settings.aspect == "keep" else None
            return preprocess(image, self.settings.resolution, limits, keep_aspect_factor=keep), None  # (3, H, W)
        except ImageLoadError as exc:
            return None, exc.reason
        except Exception as exc:  # MemoryError, or anything a decoder raises: this row's failure, never the batch's
            return None, f"cannot load or preprocess the image ({type(exc).__name__}: {exc})"


def collate(items: list[tuple]) -> dict:
    """Stack the readable images of a batch by shape (one group when all are square), keep volumes apart (their
    slices are encoded in chunks); keep every row's bookkeeping."""
    import torch

    groups: dict[tuple, list] = {}
    volumes = []
    for it in items:
        if isinstance(it[4], torch.Tensor):
            groups.setdefault(tuple(it[4].shape), []).append(it)
        elif it[4] is not None:
            volumes.append(((it[0], it[1]), it[4]))
    return {
        "rows": [(k, row, n, path, err, dup) for k, row, n, path, _, err, dup in items],
        "groups": [([(k, row) for k, row, *_ in g], torch.stack([it[4] for it in g])) for g in groups.values()],  # (B_g, 3, H, W)
        "volumes": volumes,
    }


def _volume_rule(settings: Settings) -> VolumeRule:
    return VolumeRule(root=Path(settings.image_root), slices=settings.slices, resolution=settings.slice_resolution,
                      intensity=Intensity.parse(settings.window), volume_index=settings.volume_index, limits=settings.limits)


# ---------------------------------------------------------------------------------------------- writing


class PartitionWriter:
    """Collects rows per partition and publishes a partition (errors, then parquet) once it is complete."""

    def __init__(self, output: Path, rank: int, partition_size: int, digests: list[str], kind: str = "images"):
        self.output, self.rank, self.partition_size, self.digests, self.kind = output, rank, partition_size, digests, kind
        self.pending: dict[int, dict] = {}  # k -> {"n": rows, "codes": {row: (path, codes)}, "errors": {...}, "duplicates": set}
        self.tokenized = self.failed = self.duplicate = 0
        self.published: list[int] = []

    def add(self, k: int, row: int, n_rows: int, img_path: str, codes: np.ndarray | VolumeCodes | None, error: str | None,
            duplicate: bool = False):
        part = self.pending.setdefault(k, {"n": n_rows, "codes": {}, "errors": {}, "duplicates": set()})
        if duplicate:
            part["duplicates"].add(row)
        elif error is None:
            part["codes"][row] = (img_path, codes)
        else:
            part["errors"][row] = (img_path, error)
        if len(part["codes"]) + len(part["errors"]) + len(part["duplicates"]) == part["n"]:
            self._publish(k, self.pending.pop(k))

    def _publish(self, k: int, part: dict) -> None:
        errors = [{"img_path": display_path(split_key(p)[0]), "row": k * self.partition_size + row, "reason": r}
                  for row, (p, r) in sorted(part["errors"].items())]
        write_errors(error_path(self.output, k), errors)
        rows = [(split_key(p)[0], c) for p, c in (part["codes"][row] for row in sorted(part["codes"]))]
        info = {"partition": k, "rows": part["n"], "written": len(rows), "failed": len(errors), "duplicate": len(part["duplicates"]),
                "digest": self.digests[k], "errors": errors}
        if self.kind == "volumes":
            table = volume_table([p for p, _ in rows], [c for _, c in rows])
            info["slices"] = sum(len(c.slice_indices) for _, c in rows)
            info["skipped_files"] = sum(c.geometry.get("skipped_files", 0) for _, c in rows)
        else:
            table = partition_table([p for p, _ in rows], [c for _, c in rows])
            info["grids"] = grid_counts(table)
        final = partition_path(self.output, self.rank, k)
        write_partition(final, table, info)
        _remove([p for p in self.output.glob(f"tokens-rank*-part{k:06d}.parquet") if p != final])  # an older run's, now replaced
        self.tokenized += len(rows)
        self.failed += len(errors)
        self.duplicate += len(part["duplicates"])
        self.published.append(k)
        for e in errors:
            logger.warning("partition %d: %s: %s", k, e["img_path"], e["reason"])


# -------------------------------------------------------------------------------------------- setup


def _setup_device(cfg: TokenizeConfig, info: Dist) -> torch.device:
    import torch

    if cfg.device is None:
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cfg.dtype == "fp32":  # cuDNN's TF32 convolutions (on by default) would round fp32 away from taming's codes
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    return device


def _setup_model(cfg: TokenizeConfig, device: torch.device) -> tuple[VQGAN, str]:
    """The encoder, ready on ``device`` in ``--dtype``, and the digest of the weights that decide its codes."""
    import torch

    from medmax.vqgan import CheckpointError, load_vqgan

    try:
        model = load_vqgan(cfg.ckpt, trust_checkpoint=cfg.trust_checkpoint, skip_memory_check=cfg.skip_memory_check)
    except (CheckpointError, MemoryBudgetError, FileNotFoundError, ValueError) as exc:
        raise TokenizeError(f"--ckpt {cfg.ckpt}: {exc}") from exc
    model.decoder = None  # only the encoder half is needed here
    digest = model.codes_digest()  # before the encoder is cast to --dtype
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    return model.prepare_for_encoding(device=device, dtype=dtype, channels_last=cfg.channels_last or cfg.dtype == "bf16"), digest


def _settings(cfg: TokenizeConfig, model: VQGAN, digest: str, device: torch.device, limits: ImageLimits) -> Settings:
    return Settings(
        vqgan_digest=digest, resolution=cfg.resolution or model.resolution, aspect=cfg.aspect,
        downsampling=model.downsampling, n_embed=model.n_embed, dtype=cfg.dtype,
        channels_last=cfg.channels_last or cfg.dtype == "bf16", device_type=device.type, frame=cfg.frame,
        max_image_pixels=limits.max_pixels, max_aspect_ratio=limits.max_aspect_ratio,
        column=image_csv.pick_column(cfg.input, cfg.volume_column or cfg.column), image_root=str((cfg.image_root or cfg.input.parent).resolve()),
        partition_size=cfg.partition_size, **(_volume_settings(cfg, model) if cfg.volume_column else {}),
    )


def _volume_settings(cfg: TokenizeConfig, model: VQGAN) -> dict:
    """The settings of a volume run; the slice side must be a multiple of the VQGAN's downsampling."""
    factor = model.resolution // model.grid_shape[0]  # 16 for Chameleon's VQGAN
    side = cfg.slice_resolution or model.resolution
    if side % factor:
        raise TokenizeError(f"--slice-resolution {side}: the VQGAN tiles multiples of {factor} pixels")
    slice_column = image_csv.pick_column(cfg.input, cfg.slice_column) if cfg.slice_column else None
    return {"kind": "volumes", "slices": cfg.slices, "slice_column": slice_column, "slice_resolution": side,
            "window": cfg.window, "volume_index": cfg.volume_index}


def _check_manifest(output: Path, settings: Settings) -> None:
    """Refuse a folder holding tokens made with other settings, or files image tokenization did not write."""
    manifest = read_image_token_manifest(output)
    if manifest is None:
        if any(output.glob(PARTITION_GLOB)):
            raise TokenizeError(f"--output {output} holds image-token partitions but no {MANIFEST}; use a new --output")
        return
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise TokenizeError(f"--output {output} was written by an earlier image_tokenize, whose manifest does not record "
                        "what decides the codes; use a new --output")
    found = {**_V2_SETTINGS, **manifest.get("settings", {})}
    changed = [f"{FLAGS[f.name]} was {_show(found.get(f.name))}, now {_show(getattr(settings, f.name))}"
               for f in fields(Settings) if found.get(f.name) != getattr(settings, f.name)]
    if changed:
        raise TokenizeError(f"--output {output} holds image tokens made with other settings: {'; '.join(changed)}. "
                        "Use a new --output (or the settings it was made with)")


def _show(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else str(value)


def _start_manifest(cfg: TokenizeConfig, settings: Settings) -> None:
    """Mark the folder as being written: complete again only when a run finishes."""
    write_json(cfg.output / MANIFEST, {**_manifest_head(settings), "complete": False,
                                        "input": str(cfg.input.resolve()), "ckpt": str(cfg.ckpt.resolve())})


def _manifest_head(settings: Settings) -> dict:
    """format, version, kind, settings and, for volumes, the intensity rule and orientation in words."""
    from .volumes import CANONICAL

    head = {"format": FORMAT, "version": VERSION, "kind": settings.kind, "settings": asdict(settings)}
    if settings.kind == "volumes":
        head["volumes"] = {"intensity": Intensity.parse(settings.window).describe(),
                           "orientation": f"{CANONICAL}: slices along z, inferior to superior; rows anterior to posterior, "
                                          "columns from the patient's right to left"}
    return head


# ---------------------------------------------------------------------------------------------- running


class Progress:
    """Global images done, shared through the process group's store; a tqdm bar on rank 0."""

    def __init__(self, info: Dist, total: int, initial: int, enabled: bool):
        import torch.distributed as dist

        self.store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        self.bar = None
        if info.rank == 0 and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", desc="tokenize", dynamic_ncols=True)
        self.local = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.local += n
        done = self.store.add(_PROGRESS_KEY, n) if self.store is not None else self.local
        if self.bar is not None:  # the store's count includes the other ranks' images
            self.bar.n = self.bar.initial + done
            self.bar.set_postfix_str(f"{done / max(time.perf_counter() - self.start, 1e-9):.2f} img/s", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _encode(model: VQGAN, pixels: torch.Tensor, device: torch.device) -> np.ndarray:
    import torch

    pixels = pixels.to(device, non_blocking=True)
    h, w = pixels.shape[2] // model.downsampling, pixels.shape[3] // model.downsampling
    return model.encode_codes(pixels).to(torch.int32).cpu().numpy().reshape(-1, h, w)  # (B, h, w); 4 bytes a code while pending


def run(cfg: TokenizeConfig, source: Source, settings: Settings, plan: PartitionPlan, model: VQGAN, device: torch.device, info: Dist) -> PartitionWriter:
    """Tokenize this rank's planned partitions."""
    from torch.utils.data import DataLoader, IterableDataset

    IterableDataset.register(ImageRows)  # DataLoader streams it (see ImageRows)
    loader = DataLoader(
        ImageRows(source, settings, plan), batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    progress = Progress(info, plan.n_rows, plan.done_rows, enabled=cfg.progress)
    writer = PartitionWriter(cfg.output, info.rank, settings.partition_size, plan.digests, settings.kind)
    try:
        for batch in loader:
            by_row = {key: c for keys, pixels in batch["groups"] for key, c in zip(keys, _encode(model, pixels, device))}
            by_row.update({key: encode_volume(model, volume, device, cfg.batch_size) for key, volume in batch["volumes"]})
            for k, row, n, path, err, dup in batch["rows"]:
                writer.add(k, row, n, path, by_row.get((k, row)), err, dup)
            progress.update(len(batch["rows"]))
    finally:
        progress.close()
    if writer.pending:  # cannot happen unless a worker lost rows; never publish a partial partition
        raise RuntimeError(f"rank {info.rank}: partitions {sorted(writer.pending)} did not receive all their rows")
    return writer


def finish_folder(output: Path, plan: PartitionPlan) -> dict:
    """After every rank is done: drop partitions past the CSV's end, bring errors/ in line with the
    partitions, and count every row of the CSV as written, failed or duplicate."""
    files = finished_files(output)
    _remove([path for k, entries in files.items() if k >= len(plan.digests) for path, _ in entries])
    for path in (output / "errors").glob("part*.jsonl"):
        if int(path.stem.removeprefix("part")) >= len(plan.digests):
            path.unlink()
    rows = {"input": plan.n_rows, "written": 0, "failed": 0, "duplicate": 0}
    grids: dict[str, int] = {}
    for k, digest in enumerate(plan.digests):
        good = [(path, meta) for path, meta in files.get(k, []) if meta["digest"] == digest]
        if not good:
            raise RuntimeError(f"{output}: partition {k} was not written; run again to finish it")
        _remove([path for path, _ in good[1:]])
        meta = good[0][1]
        write_errors(error_path(output, k), meta["errors"])
        for key in ("written", "failed", "duplicate", "slices", "skipped_files"):
            if key in meta:
                rows[key] = rows.get(key, 0) + meta[key]
        for grid, n in meta.get("grids", {}).items():
            grids[grid] = grids.get(grid, 0) + n
    if rows["written"] + rows["failed"] + rows["duplicate"] != plan.n_rows:
        raise RuntimeError(f"{output}: the partitions account for a different number of rows than the CSV's {plan.n_rows}")
    return rows, dict(sorted(grids.items()))


def _run_counts(writer: PartitionWriter, device: torch.device) -> dict:
    """This run's counts, summed over the ranks."""
    import torch
    import torch.distributed as dist

    counts = torch.tensor([writer.tokenized, writer.failed, writer.duplicate, len(writer.published)], dtype=torch.long)
    if dist.is_initialized():
        counts = counts.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(counts)
        dist.barrier()  # every rank has published: the folder is final
    return dict(zip(("tokenized", "failed", "duplicate", "partitions"), (int(x) for x in counts.cpu())))


def _share(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (-1 tells the others that rank 0 failed)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def _close(cfg: TokenizeConfig, settings: Settings, plan: PartitionPlan, this_run: dict, seconds: float) -> dict:
    """Rank 0: finish the folder, write the complete manifest and the summary; -> the summary."""
    rows, grids = finish_folder(cfg.output, plan)
    write_json(cfg.output / MANIFEST, {
        **_manifest_head(settings), "complete": True, "rows": rows, **({"grids": grids} if settings.kind == "images" else {}),
        "rows_digest": hashlib.sha256("".join(plan.digests).encode()).hexdigest(),
        "input": str(cfg.input.resolve()), "ckpt": str(cfg.ckpt.resolve()),
    })
    done = this_run["tokenized"] + this_run["failed"] + this_run["duplicate"]
    summary = {
        "rows": rows["input"], "written": rows["written"], "failed": rows["failed"], "duplicate": rows["duplicate"],
        "tokenized": this_run["tokenized"], "this_run": this_run, "seconds": round(seconds, 2),
        "images_per_s": round(done / max(seconds, 1e-9), 3), "vqgan_digest": settings.vqgan_digest,
        "batch_size": cfg.batch_size,
    }
    logger.info("summary: %s", json.dumps(summary))
    write_json(cfg.output / SUMMARY, summary)
    return summary


def summary_line(summary: dict, output: Path) -> str:
    """A finished run in one line (the program prints it): every row written, failed or skipped, and this run's pace."""
    this_run = summary["this_run"]
    return (
        f"{summary['rows']} rows: {summary['written']} written, {summary['failed']} failed (reasons in {Path(output) / 'errors'}), "
        f"{summary['duplicate']} skipped as duplicates; this run tokenized {this_run['tokenized']} images in "
        f"{this_run['partitions']} partition(s), {summary['seconds']} s, {summary['images_per_s']} images/s"
    )


@dataclass
class TokenizeResult:
    failed: int  # failed rows in the whole folder, known on every rank
    summary: dict | None  # rank 0: what summary.json holds; None on the other ranks


def _claim(cfg: TokenizeConfig, settings: Settings, device: torch.device, info: Dist) -> None:
    """Rank 0 checks the folder and claims it; no rank writes a partition before that is done."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    ready = -1
    try:
        if info.rank == 0:
            _check_manifest(cfg.output, settings)
            _start_manifest(cfg, settings)
            ready = 0
    finally:
        ready = _share(ready, device)
    if ready < 0:
        raise TokenizeError(f"rank {info.rank}: rank 0 refused --output {cfg.output} (its message says why)")


def tokenize_images(cfg: TokenizeConfig, info: Dist) -> TokenizeResult:
    """Tokenize this rank's share of ``cfg.input`` into ``cfg.output``: set up, plan, run and close.

    ``info`` is this process's place in the launch (:func:`medmax.distributed.process_group`); every rank of
    the launch calls this with the same config.
    """
    device = _setup_device(cfg, info)
    cfg = replace(cfg, batch_size=cfg.batch_size or DEFAULT_BATCH_SIZE.get(device.type, 1))
    model, digest = _setup_model(cfg, device)
    settings = _settings(cfg, model, digest, device, cfg.limits)
    _claim(cfg, settings, device, info)
    source = Source(str(cfg.input.resolve()), settings.column, settings.partition_size, settings.slice_column)
    plan = make_plan(source, cfg.output, info)
    start = time.perf_counter()
    this_run = _run_counts(run(cfg, source, settings, plan, model, device, info), device)
    summary, failed = None, -1
    try:
        if info.rank == 0:
            summary = _close(cfg, settings, plan, this_run, time.perf_counter() - start)
            failed = summary["failed"]
    finally:
        failed = _share(failed, device)
    if failed < 0:
        raise TokenizeError(f"rank {info.rank}: rank 0 could not finish {cfg.output}")
    return TokenizeResult(failed, summary)
