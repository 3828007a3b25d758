"""Peak memory and time of converting an original-layout checkpoint into a model folder.

Usage::

    .venv/bin/python bench/bench_convert.py                      # ~1.4 GB bf16 checkpoint, 1 shard, 3 rounds
    .venv/bin/python bench/bench_convert.py --shards 4 --rounds 5 --json runs/bench_convert.json
    .venv/bin/python bench/bench_convert.py --quick              # ~90 MB, a smoke check

A synthetic checkpoint in Meta's layout (``models/7b/params.json`` + ``consolidated*.pth``, random bf16
weights, Chameleon's 65536-id vocabulary) is written once into ``--workdir``. Each variant then converts
it in a fresh process, in interleaved rounds whose order rotates; a process's peak resident set size
(``ru_maxrss`` from ``wait4``, file-backed mapped pages included) and wall time are recorded, with the
machine's load average and thread count. Variants:

- ``ours``: ``finetune.convert.convert_original``: memory-mapped shards, one tensor converted and
  streamed to safetensors at a time, converted pages released;
- ``ours-no-release``: the same without releasing pages (what the memory mapping alone gives);
- ``save-file``: memory-mapped, every converted tensor kept, then ``safetensors.torch.save_file``
  (the library writer needs the whole file's tensors at once);
- ``whole``: ``torch.load`` without mapping, then as ``save-file``: the approach of a converter that
  holds the model in RAM.
- ``startup``: imports the same modules and converts nothing (the fixed cost inside every figure).

Parity: every variant's tensors must equal ``ours``' tensor for tensor, or the script exits 1.
The headline figure is ``ours``' median peak RSS divided by the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

VARIANTS = ("ours", "ours-no-release", "save-file", "whole", "startup")
SIZES = {"full": dict(dim=2048, n_layers=8, n_heads=16), "quick": dict(dim=512, n_layers=4, n_heads=8)}
VOCAB = 65536


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic release


def write_checkpoint(root: Path, dim: int, n_layers: int, n_heads: int, shards: int) -> None:
    """A bf16 release in Meta's layout (random weights)."""
    import torch

    from medmax.presets import VQGAN_PRESETS, build_tiny_tokenizer
    from medmax.vqgan import VQGAN
    from tests.meta_release import random_shards, release_params

    params = release_params(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=VOCAB, multiple_of=256)
    model_dir = root / "models" / "7b"
    model_dir.mkdir(parents=True)
    (model_dir / "params.json").write_text(json.dumps(params))
    (model_dir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": shards}))
    names = ["consolidated.pth"] if shards == 1 else [f"consolidated.{i:02d}.pth" for i in range(shards)]
    for name, shard in zip(names, random_shards(params, shards, torch.bfloat16)):
        torch.save(shard, model_dir / name)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    build_tiny_tokenizer().save(str(tok_dir / "text_tokenizer_modified.json"))
    from medmax.vqgan import save_vqgan

    save_vqgan(VQGAN.from_params(VQGAN_PRESETS["tiny"]), tok_dir)


def ensure_checkpoint(workdir: Path, size: str, shards: int) -> tuple[Path, int]:
    """Reuse the checkpoint written for the same settings; rewrite it otherwise."""
    root, stamp = workdir / f"ckpt-{size}-{shards}", {"size": size, "shards": shards, **SIZES[size], "vocab": VOCAB}
    manifest = root / "bench_manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == stamp:
        return root, json.loads(manifest.read_text())["bytes"]
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, __file__, "--write-checkpoint", str(root), "--size", size, "--shards", str(shards)]
    subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)  # keeps this process small
    nbytes = sum(p.stat().st_size for p in (root / "models" / "7b").glob("consolidated*.pth"))
    manifest.write_text(json.dumps({"settings": stamp, "bytes": nbytes}))
    return root, nbytes


# ---------------------------------------------------------------------------------------------------------------------
# One variant, in its own process


def _load_all_and_save(ckpt: Path, out: Path, mmap: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from medmax.meta_layout import MetaParams, ShardSet, find_model_dir, shard_files
    from medmax.vqgan import load_vqgan

    model_dir = find_model_dir(ckpt)
    params = MetaParams.from_dir(model_dir)
    files = shard_files(model_dir)
    shards = [torch.load(f, map_location="cpu", mmap=mmap, weights_only=True) for f in files]
    state = {item.name: item.build().contiguous() for item in ShardSet(shards, params, [str(f) for f in files]).plan()}
    vqgan = load_vqgan(ckpt / "tokenizer")
    state.update({f"model.vqmodel.{k}": v for k, v in vqgan.state_dict().items() if not k.startswith("decoder.")})
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def run_variant(variant: str, ckpt: Path, out: Path) -> None:
    import finetune.convert as convert
    import medmax.checkpoints as checkpoints

    if variant == "startup":  # every module a conversion imports, nothing converted
        import transformers  # noqa: F401
        import medmax.model, medmax.presets, medmax.vqgan  # noqa: F401,E401
        return
    if variant in ("save-file", "whole"):
        _load_all_and_save(ckpt, out, mmap=variant == "save-file")
        return
    if variant == "ours-no-release":
        checkpoints.release_pages = lambda tensors: None
    convert.convert_original(ckpt, out)


def measure(variant: str, ckpt: Path, out: Path) -> dict:
    """Wall time and peak RSS of one variant in a fresh process.

    The peak is the child's own ``VmHWM``, read by the child as it ends: ``ru_maxrss`` from ``wait4``
    would also count the pages of the parent it was forked from.
    """
    cmd = [sys.executable, __file__, "--run-variant", variant, "--ckpt", str(ckpt), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-2000:]}")
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return {"seconds": seconds, "peak_rss_bytes": peak}


# ---------------------------------------------------------------------------------------------------------------------
# Parity and the report


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (or exist in one folder only) between two converted folders."""
    import torch

    from medmax.checkpoints import FolderTensors

    ta, tb = FolderTensors.open(a), FolderTensors.open(b)
    names = sorted(set(ta.files) | set(tb.files))
    return [n for n in names if n not in ta.files or n not in tb.files or not torch.equal(ta.get(n), tb.get(n))]


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> dict:
    size = "quick" if args.quick else "full"
    workdir = Path(args.workdir)
    ckpt, nbytes = ensure_checkpoint(workdir, size, args.shards)
    load_before = os.getloadavg()
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for variant in order:
            out = Path(tempfile.mkdtemp(dir=workdir)) / "out"
            rows[variant].append(measure(variant, ckpt, out))
            if r == 0 and variant not in ("startup", "ours"):
                rows[variant][-1]["out"] = out
            elif r == 0 and variant == "ours":
                reference = out
                continue
            else:
                shutil.rmtree(out.parent, ignore_errors=True)
        if r == 0:
            check_parity(reference, rows)
    return {
        "benchmark": "convert", "checkpoint_bytes": nbytes, "shards": args.shards, "size": size, **SIZES[size],
        "rounds": args.rounds, "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(),
        "load_before": load_before, "load_after": os.getloadavg(),
        "variants": {v: {"seconds": summarise([x["seconds"] for x in rows[v]]),
                         "peak_rss_bytes": summarise([x["peak_rss_bytes"] for x in rows[v]]),
                         "peak_rss_x_checkpoint": summarise([x["peak_rss_bytes"] / nbytes for x in rows[v]])}
                     for v in args.variants},
    }


def check_parity(reference: Path, rows: dict) -> None:
    for variant, runs in rows.items():
        out = runs[0].pop("out", None)
        if out is None:
            continue
        differ = same_tensors(reference, out)
        shutil.rmtree(out.parent, ignore_errors=True)
        if differ:
            raise SystemExit(f"parity: {variant} differs from ours in {len(differ)} tensors, e.g. {differ[:3]}")
    shutil.rmtree(reference.parent, ignore_errors=True)


def report(record: dict) -> str:
    gb = record["checkpoint_bytes"] / 1e9
    lines = [f"checkpoint {gb:.2f} GB ({record['shards']} shard(s)), {record['rounds']} rounds, "
             f"load {record['load_before'][0]:.1f} -> {record['load_after'][0]:.1f}",
             f"{'variant':<16} {'peak RSS GB (min..max)':<26} {'x checkpoint':>12} {'seconds (min..max)':>22}"]
    for name, v in record["variants"].items():
        rss, x, s = v["peak_rss_bytes"], v["peak_rss_x_checkpoint"], v["seconds"]
        lines.append(f"{name:<16} {rss['median'] / 1e9:5.2f} ({rss['min'] / 1e9:.2f}..{rss['max'] / 1e9:.2f}){'':<9}"
                     f" {x['median']:>11.2f}x {s['median']:>9.1f} ({s['min']:.1f}..{s['max']:.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1, choices=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a ~90 MB checkpoint")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medmax_bench_convert"))
    parser.add_argument("--json", help="also write the record here")
    parser.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(Path(args.write_checkpoint), shards=args.shards, **SIZES[args.size])
        return 0
    if args.run_variant:
        from medmax.checkpoints import peak_rss_bytes

        run_variant(args.run_variant, Path(args.ckpt), Path(args.out))
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return 0
    if "ours" not in args.variants:
        parser.error("--variants must include ours (the parity reference)")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    record = run(args)
    print(report(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
