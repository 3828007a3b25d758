"""Tokenize a CSV of images into VQGAN code grids, on one CPU or many GPUs.

Usage::

    # one process
    python -m tokenization.image_tokenize --input data/images.csv --output data/image_tokens --ckpt CKPT
    # N processes (CPU: gloo; GPU: nccl, one device per local rank)
    torchrun --nproc-per-node N -m tokenization.image_tokenize --input data/images.csv \\
        --output data/image_tokens --ckpt CKPT --batch-size 16 --workers 4 --dtype bf16

The CSV column ``img_path`` (MedMax) or ``image_path`` (or ``--column NAME``) names each image;
relative paths resolve against ``--image-root`` (default: the CSV's folder) and no path may leave it.
``--ckpt`` is a MedMax / Chameleon / Anole folder (``tokenizer/vqgan.{yaml,ckpt}``), a folder holding
``vqgan.yaml`` and ``vqgan.ckpt`` (or ``.safetensors``), or a Hugging Face Chameleon checkpoint.

How the work is split, and why it cannot lose or repeat a row:
- CSV rows are cut into global partitions of ``--partition-size`` consecutive rows; partition ``k``
  belongs to rank ``k % world_size``. Every row is in exactly one partition, for any world size,
  batch size or worker count (no sampler padding).
- A partition is written as ``.tmp`` and renamed to ``tokens-rank{R}-part{K}.parquet`` only when all
  of its rows are encoded or failed; its failures go to ``errors/part{K}.jsonl`` first. A restarted run
  skips partitions whose parquet exists, whatever world size wrote it, and redoes the rest.
- The CSV is streamed one partition at a time, so memory does not grow with the number of rows.

Output rows: ``img_path`` (exactly as in the CSV) and ``img_tokens`` (raw codes ``0..n_embed-1``,
row-major). Unreadable images are never written: they are listed in ``errors/*.jsonl`` with the reason
and counted in the summary; the run exits 0 unless ``--strict`` is given and something failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medmax.image_tokens import PARTITION_GLOB
from medmax.paths import PathEscapeError, resolve_inside

if TYPE_CHECKING:  # annotations only: torch, pandas and the VQGAN load in the functions that run, not for --help
    import torch

    from medmax.vqgan import VQGAN

logger = logging.getLogger("tokenization.image_tokenize")

PATH_COLUMNS = ("img_path", "image_path")
MANIFEST = "manifest.json"
SUMMARY = "summary.json"  # the last run's closing summary
SCHEMA = pa.schema([("img_path", pa.string()), ("img_tokens", pa.list_(pa.int32()))])
_PROGRESS_KEY = "medmax_image_tokenize_done"


@dataclass(frozen=True)
class RunConfig:
    """What defines the output: a restarted run must agree on all of it."""

    input: str  # the CSV
    ckpt: str  # the VQGAN checkpoint
    column: str  # its image-path column
    image_root: str  # relative paths resolve here; no path may leave it
    partition_size: int  # CSV rows per output partition
    resolution: int  # VQGAN input side, from the checkpoint
    n_embed: int  # codebook size, from the checkpoint


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


# ------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="image_tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="CSV with one image path per row")
    p.add_argument("--output", required=True, type=Path, help="folder for the parquet partitions")
    p.add_argument("--ckpt", required=True, type=Path, help="VQGAN checkpoint (see the module docstring)")
    p.add_argument("--column", help="image-path column (default: img_path, else image_path)")
    p.add_argument("--image-root", type=Path, help="folder relative paths resolve against (default: the CSV's)")
    p.add_argument("--partition-size", type=int, default=2_000,
                   help="CSV rows per output file (also the most work a kill can lose)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VQGAN forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes that decode and preprocess")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="fp32 is code-exact; bf16 is faster")
    p.add_argument("--channels-last", action="store_true",
                   help="fp32 in channels-last layout: ~15%% faster on CPU, but codes may differ from taming's at near-ties")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / local processes)")
    p.add_argument("--frame", type=int, default=0, help="frame of multi-frame images (DICOM, TIFF) to take")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint that needs full unpickling")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any image failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _validate(args: argparse.Namespace) -> None:
    if not args.input.is_file():
        raise SystemExit(f"--input {args.input}: no such CSV file")
    for flag in ("partition_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0:
        raise SystemExit(f"--workers must be >= 0, got {args.workers}")
    if args.frame < 0:
        raise SystemExit(f"--frame must be >= 0, got {args.frame}")


def pick_column(csv: Path, column: str | None) -> str:
    """The CSV column holding image paths: ``--column``, else img_path (MedMax) or image_path."""
    import pandas as pd

    header = list(pd.read_csv(csv, nrows=0).columns)
    if column is not None:
        if column not in header:
            raise SystemExit(f"--column {column!r} is not a column of {csv} (columns: {header})")
        return column
    for name in PATH_COLUMNS:
        if name in header:
            return name
    raise SystemExit(f"{csv}: no img_path or image_path column (columns: {header}); name one with --column")


# ----------------------------------------------------------------------------------- CSV and partitions


def iter_partitions(config: RunConfig) -> Iterator[tuple[int, list[str]]]:
    """Stream the CSV as ``(partition index, the paths of its rows)``, one partition in memory at a time."""
    import pandas as pd

    reader = pd.read_csv(
        config.input, usecols=[config.column], dtype=str, keep_default_na=False, skip_blank_lines=False, chunksize=config.partition_size
    )
    with reader:
        for k, frame in enumerate(reader):
            yield k, frame[config.column].tolist()


def partition_path(output: Path, rank: int, k: int) -> Path:
    return output / f"tokens-rank{rank:05d}-part{k:06d}.parquet"


def error_path(output: Path, k: int) -> Path:
    return output / "errors" / f"part{k:06d}.jsonl"


def finished_partitions(output: Path) -> set[int]:
    """Indices of the partitions already written, by any rank of any earlier run."""
    return {int(p.stem.rsplit("part", 1)[1]) for p in output.glob(PARTITION_GLOB)}


def resolve_image(img_path: str, root: Path) -> Path:
    """A CSV path -> the file, refusing empty paths and paths that leave the image root."""
    from medmax.images import ImageLoadError

    if not img_path.strip():
        raise ImageLoadError(repr(img_path), "empty image path in the CSV")
    try:
        return resolve_inside(root, img_path)
    except PathEscapeError:
        raise ImageLoadError(img_path, f"path leaves the image root {root} (set --image-root to allow it)") from None


# ---------------------------------------------------------------------------------------------- loading


class ImageRows:
    """This rank's unfinished partitions, row by row: ``(k, row, n_rows, img_path, pixels | None, error | None)``.

    Rows are dealt to DataLoader workers round-robin; each item says how many rows its partition has,
    so the main process knows when a partition is complete. A torch ``IterableDataset`` (registered as
    one in :func:`run`, so that importing this program for --help does not load torch).
    """

    def __init__(self, config: RunConfig, dist_info: Dist, skip: set[int], frame: int = 0):
        self.config, self.dist, self.skip, self.frame = config, dist_info, skip, frame

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        root = Path(self.config.image_root)
        seen = 0
        for k, paths in iter_partitions(self.config):
            if k % self.dist.world_size != self.dist.rank or k in self.skip:
                continue
            for row, img_path in enumerate(paths):
                if seen % n_workers == worker:
                    yield (k, row, len(paths), img_path, *self._load(img_path, root))
                seen += 1

    def _load(self, img_path: str, root: Path) -> tuple[torch.Tensor | None, str | None]:
        from medmax.images import ImageLoadError, load_image, preprocess

        try:
            image = load_image(resolve_image(img_path, root), frame=self.frame)
            return preprocess(image, self.config.resolution), None  # (3, R, R)
        except ImageLoadError as exc:
            return None, exc.reason
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return None, f"cannot preprocess image ({type(exc).__name__}: {exc})"


def collate(items: list[tuple]) -> dict:
    """Stack the readable images of a batch; keep every row's bookkeeping."""
    import torch

    ok = [it for it in items if it[4] is not None]
    return {
        "rows": [(k, row, n, path, err) for k, row, n, path, _, err in items],
        "ok": [(k, row) for k, row, *_ in ok],
        "pixels": torch.stack([it[4] for it in ok]) if ok else None,  # (B_ok, 3, R, R)
    }


# ---------------------------------------------------------------------------------------------- writing


class PartitionWriter:
    """Collects rows per partition and publishes a partition (errors, then parquet) once it is complete."""

    def __init__(self, output: Path, rank: int, partition_size: int):
        self.output, self.rank, self.partition_size = output, rank, partition_size
        self.pending: dict[int, dict] = {}  # k -> {"n": rows, "codes": {row: (path, codes)}, "errors": {...}}
        self.tokenized = self.failed = 0

    def add(self, k: int, row: int, n_rows: int, img_path: str, codes: np.ndarray | None, error: str | None):
        part = self.pending.setdefault(k, {"n": n_rows, "codes": {}, "errors": {}})
        if error is None:
            part["codes"][row] = (img_path, codes)
        else:
            part["errors"][row] = (img_path, error)
        if len(part["codes"]) + len(part["errors"]) == part["n"]:
            self._publish(k, self.pending.pop(k))

    def _publish(self, k: int, part: dict) -> None:
        errors = [{"img_path": p, "row": k * self.partition_size + row, "reason": r} for row, (p, r) in sorted(part["errors"].items())]
        _write_errors(error_path(self.output, k), errors)
        rows = [part["codes"][row] for row in sorted(part["codes"])]
        table = pa.table({"img_path": [p for p, _ in rows], "img_tokens": _list_array([c for _, c in rows])}, schema=SCHEMA)
        final = partition_path(self.output, self.rank, k)
        tmp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.tokenized += len(rows)
        self.failed += len(errors)
        for e in errors:
            logger.warning("partition %d: %s: %s", k, e["img_path"], e["reason"])


def _list_array(codes: list[np.ndarray]) -> pa.ListArray:
    """Rows of int32 codes -> an Arrow list<int32> column, without a Python int per code."""
    lengths = np.array([len(c) for c in codes], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(codes).astype(np.int32) if codes else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _write_errors(path: Path, errors: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not errors:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in errors))
    os.replace(tmp, path)


def count_errors(output: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (output / "errors").glob("part*.jsonl"))


# -------------------------------------------------------------------------------------------- setup


def _setup_dist() -> Dist:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return info


def _setup_device(args: argparse.Namespace, info: Dist) -> torch.device:
    import torch

    if args.device is None:
        device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = args.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    return device


def _setup_model(args: argparse.Namespace, device: torch.device) -> VQGAN:
    import torch

    from medmax.vqgan import UntrustedCheckpointError, load_vqgan

    try:
        model = load_vqgan(args.ckpt, trust_checkpoint=args.trust_checkpoint)
    except (UntrustedCheckpointError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--ckpt {args.ckpt}: {exc}") from exc
    model.decoder = None  # only the encoder half is needed here
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return model.prepare_for_encoding(device=device, dtype=dtype, channels_last=args.channels_last or args.dtype == "bf16")


def _check_manifest(output: Path, config: RunConfig, info: Dist) -> None:
    """A restarted run must cut the CSV the same way, or partitions would overlap."""
    path = output / MANIFEST
    expected = asdict(config)
    if path.is_file():
        found = json.loads(path.read_text())
        changed = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if changed:
            raise SystemExit(f"{output} holds a run with other settings {changed} (was, now); use a new --output")
    elif info.rank == 0:
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(expected, indent=2))
        os.replace(tmp, path)


def _count_rows(config: RunConfig) -> int:
    return sum(len(paths) for _, paths in iter_partitions(config))


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
    return model.encode_codes(pixels).to(torch.int32).cpu().numpy()  # (B, h*w); 4 bytes a code while pending


def run(args: argparse.Namespace, config: RunConfig, model: VQGAN, device: torch.device, info: Dist) -> PartitionWriter:
    from torch.utils.data import DataLoader, IterableDataset

    IterableDataset.register(ImageRows)  # DataLoader streams it (see ImageRows)
    skip = finished_partitions(args.output)
    dataset = ImageRows(config, info, skip, frame=args.frame)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    total = _count_rows(config) if info.rank == 0 and not args.no_progress else 0
    done_rows = sum(min(config.partition_size, total - k * config.partition_size) for k in skip) if total else 0
    progress = Progress(info, total, done_rows, enabled=not args.no_progress)
    writer = PartitionWriter(args.output, info.rank, config.partition_size)
    try:
        for batch in loader:
            codes = _encode(model, batch["pixels"], device) if batch["pixels"] is not None else []
            by_row = dict(zip(batch["ok"], codes))
            for k, row, n, path, err in batch["rows"]:
                writer.add(k, row, n, path, by_row.get((k, row)), err)
            progress.update(len(batch["rows"]))
    finally:
        progress.close()
    if writer.pending:  # cannot happen unless a worker lost rows; never publish a partial partition
        raise RuntimeError(f"rank {info.rank}: partitions {sorted(writer.pending)} did not receive all their rows")
    return writer


def _summarise(writer: PartitionWriter, seconds: float, device: torch.device, info: Dist, output: Path) -> dict:
    import torch
    import torch.distributed as dist

    counts = torch.tensor([writer.tokenized, writer.failed], dtype=torch.long)
    if dist.is_initialized():
        counts = counts.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(counts)
        dist.barrier()
    tokenized, failed = (int(x) for x in counts.cpu())
    return {
        "tokenized": tokenized,
        "failed": failed,
        "failed_total": count_errors(output),
        "seconds": round(seconds, 2),
        "images_per_s": round((tokenized + failed) / max(seconds, 1e-9), 3),
        "world_size": info.world_size,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _validate(args)
    import torch.distributed as dist  # after parsing: --help does not load torch

    info = _setup_dist()
    try:
        device = _setup_device(args, info)
        model = _setup_model(args, device)
        root = (args.image_root or args.input.parent).resolve()
        config = RunConfig(
            input=str(args.input.resolve()), ckpt=str(args.ckpt.resolve()), column=pick_column(args.input, args.column), image_root=str(root),
            partition_size=args.partition_size, resolution=model.resolution, n_embed=model.n_embed,
        )
        args.output.mkdir(parents=True, exist_ok=True)
        _check_manifest(args.output, config, info)
        start = time.perf_counter()
        writer = run(args, config, model, device, info)
        summary = _summarise(writer, time.perf_counter() - start, device, info, args.output)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if info.rank == 0:
        logger.info("summary: %s", json.dumps(summary))
        (args.output / SUMMARY).write_text(json.dumps(summary, indent=2))
        print(
            f"tokenized {summary['tokenized']} images, failed {summary['failed']} (see {args.output / 'errors'}), "
            f"{summary['seconds']} s, {summary['images_per_s']} images/s"
        )
    return 1 if args.strict and summary["failed_total"] > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
