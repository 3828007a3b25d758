"""Peak memory and time of converting an original-layout checkpoint into a model folder.

Usage::

    .venv/bin/python bench/bench_convert.py                      # ~1.4 GB bf16 checkpoint, 1 shard, 3 rounds
    .venv/bin/python bench/bench_convert.py --shards 4 --rounds 5   # a "custom" record
    .venv/bin/python bench/bench_convert.py --quick              # ~90 MB
    .venv/bin/python bench/report.py                             # then rewrite BENCHMARKS.md

A synthetic checkpoint in Meta's layout (``models/7b/params.json`` + ``consolidated*.pth``, random bf16
weights, Chameleon's 65536-id vocabulary) is written once into ``--workdir``. Each variant then converts
it in a fresh process, in the harness's interleaved rounds whose order rotates; each process's peak
resident set size (its own ``VmHWM``, read as it ends, file-backed mapped pages included), wall and CPU
time are recorded, with the machine's load average and thread count. Variants:

- ``ours``: ``finetune.convert.convert_original``: memory-mapped shards, one tensor converted and
  streamed to safetensors at a time, converted pages released;
- ``ours-no-release``: the same without releasing pages (what the memory mapping alone gives);
- ``save-file``: memory-mapped, every converted tensor kept, then ``safetensors.torch.save_file``
  (the library writer needs the whole file's tensors at once);
- ``whole``: ``torch.load`` without mapping, then as ``save-file``: the approach of a converter that
  holds the model in RAM.
- ``startup``: imports the same modules and converts nothing (the fixed cost inside every figure).

Parity: in every round, every converting variant's tensors (a digest of each tensor's dtype, shape and
bytes) must equal ``ours``' tensor for tensor, or the script exits 1. The target (issue 15):
``ours``' peak RSS divided by the checkpoint's size on disk <= 1.3, median of the rounds
(``peak_rss_x_checkpoint``; the ratio column is conversion speed relative to ``ours``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness import (ROOT, Benchmark, Case, ProcessRun, Result, Target, Variant, add_arguments,  # noqa: E402
                     command_line, digest, fmt, run_benchmark, run_process, size_label)

VARIANTS = ("ours", "ours-no-release", "save-file", "whole", "startup")
SIZES = {"full": dict(dim=2048, n_layers=8, n_heads=16), "quick": dict(dim=512, n_layers=4, n_heads=8)}
VOCAB = 65536
TARGET_X = 1.3  # issue 15: ours' peak RSS at most 1.3x the checkpoint size


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


def measure(variant: str, ckpt: Path, out: Path) -> ProcessRun:
    """Wall time, CPU time and peak RSS of one variant in a fresh process.

    The peak is the child's own ``VmHWM``, read by the child as it ends: ``ru_maxrss`` from ``wait4``
    can also count the pages of the parent it was forked from.
    """
    cmd = [sys.executable, __file__, "--run-variant", variant, "--ckpt", str(ckpt), "--out", str(out)]
    run = run_process(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    run.peak_rss_bytes = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Parity and the cases


def tensor_digests(folder: Path) -> dict[str, str]:
    """name -> digest of dtype, shape and bytes of every tensor of a converted folder (read one at a time)."""
    import torch

    from medmax.checkpoints import FolderTensors

    tensors = FolderTensors.open(folder)
    out = {}
    for name in sorted(tensors.files):
        t = tensors.get(name).contiguous()
        out[name] = digest(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def same_share(a: dict | None, b: dict | None) -> float:
    """Share of tensor names (in either folder) whose tensors are identical."""
    if a is None or b is None:
        return 0.0
    names = set(a) | set(b)
    return sum(a.get(n) == b.get(n) for n in names) / len(names) if names else 1.0


def variant(name: str, ckpt: Path, workdir: Path, nbytes: int, convert: bool = True) -> Variant:
    def run() -> Result:
        out = Path(tempfile.mkdtemp(dir=workdir)) / "out"
        try:
            proc = measure(name, ckpt, out)
            output = tensor_digests(out) if convert else None
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        return Result({"conversions": 1}, output=output, peak_rss_bytes=proc.peak_rss_bytes,
                      cpu_seconds=proc.cpu_seconds, figures={"peak_rss_x_checkpoint": proc.peak_rss_bytes / nbytes})

    return Variant(name, run)


def cases(names: list[str], ckpt: Path, workdir: Path, nbytes: int) -> tuple[list[Case], list[Target]]:
    converting = [variant(n, ckpt, workdir, nbytes) for n in names if n != "startup"]
    conv = Case(f"convert a {nbytes / 1e6:.0f} MB checkpoint, whole process", unit="conversions",
                agreement=same_share, variants=converting)
    found = [conv]
    if "startup" in names:
        found.append(Case("start-up only (the imports of a conversion, nothing converted)", unit="runs",
                          variants=[variant("startup", ckpt, workdir, nbytes, convert=False)]))
    target = Target(conv.name, "ours", "peak_rss_x_checkpoint", "<=", TARGET_X,
                    f"convert: ours' peak RSS <= {TARGET_X}x the checkpoint size")
    return found, [target]


def _notes(record: dict) -> list[str]:
    return ["peak RSS as a multiple of the checkpoint size (median (min-max)): " + "; ".join(
        f"{v}: {fmt(e['summary']['peak_rss_x_checkpoint'])}x"
        for case in record["cases"].values() for v, e in case["variants"].items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1, choices=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="a ~90 MB checkpoint")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medmax_bench_convert"))
    parser.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(Path(args.write_checkpoint), shards=args.shards, **SIZES[args.size])
        return 0
    if args.run_variant:
        from medmax.checkpoints import peak_rss_bytes

        run_variant(args.run_variant, Path(args.ckpt), Path(args.out))
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return 0
    if args.variants[0] != "ours":
        parser.error("--variants must start with ours (the parity reference)")
    size = "quick" if args.quick else "full"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, nbytes = ensure_checkpoint(workdir, size, args.shards)
    custom = args.shards if args.shards != 1 else None, None if args.variants == list(VARIANTS) else args.variants
    bench = Benchmark(name="convert", title="Checkpoint conversion: peak memory", size=size_label(args.quick, *custom),
                      description=__doc__.split("\n\n", 2)[2].strip(),
                      settings={"checkpoint_bytes": nbytes, "shards": args.shards, **SIZES[size], "vocab": VOCAB,
                                "dtype": "bf16", "variants": args.variants},
                      command=command_line(argv))
    found, targets = cases(args.variants, ckpt, workdir, nbytes)
    return run_benchmark(bench, found, targets, args, notes=_notes)


if __name__ == "__main__":
    raise SystemExit(main())
