"""Start-up is part of the cost: `--help` of every console script, and whole-process image tokenization.

Usage::

    python bench/bench_startup.py            # 12 images for the tokenizer runs, batch sizes 1/2/4/8 on 8 images
    python bench/bench_startup.py --quick    # 4 images, batch sizes 1/2/4
    python bench/bench_startup.py --only help

Every variant is a whole process, timed from launch to exit, its peak RSS read with ``wait4``:

- *--help*: each console script of pyproject.toml ``[project.scripts]``, launched the way its installed
  wrapper does (``from MODULE import main; sys.exit(main())``) with ``--help``, against the bare
  interpreter (``python -c pass``). Each run also reports whether torch was imported.
- *tokenizer run*: 12 synthetic 640x480 JPEGs through Chameleon's real 512 px VQGAN configuration
  (random weights), our ``python -m tokenization.image_tokenize`` with its default settings (fp32, and
  ``--dtype bf16``) against the reference, ``bench/reference_image_tokenize.py`` (MedMax's
  ``src/image_tokenization.py`` pipeline on taming-transformers' modules, at batch 1, its fastest
  here; MedMax's default of 64 is a GPU setting). Each process loads its own checkpoint and writes
  parquet. Our fp32 codes must equal the reference's; bf16 agreement is reported.
- *batch size*: our tokenizer at several ``--batch-size`` values, fp32 and bf16, on the same images;
  the figure is the program's own loop time (its summary), so start-up does not blur the per-image cost.

The children get the parent's environment without ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, so each
program picks its threads as a user's would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_image_tokenize import code_agreement, read_codes  # noqa: E402  (one reader of both pipelines' codes)
from harness import (ROOT, Benchmark, Case, command_line, Result, Target, Variant, add_arguments, run_benchmark,  # noqa: E402
                     run_process, size_label)

HELP_TARGET_S = 1.5
PROBE = ("import sys; sys.argv = [{name!r}, '--help']\n"
         "from {module} import {attr} as main\n"
         "try:\n    code = main()\nexcept SystemExit as e:\n    code = e.code\n"
         "print('\\n@@probe ' + str(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))\n"
         "sys.exit(code)")


def console_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------------------------------ --help
def help_variant(name: str, target: str) -> Variant:
    module, _, attr = target.partition(":")
    code = PROBE.format(name=name, module=module, attr=attr)

    def run() -> Result:
        proc = run_process([sys.executable, "-c", code], env=child_env(), cwd=ROOT)
        if "usage" not in proc.stdout.lower():
            raise RuntimeError(f"{name} --help printed no usage:\n{proc.stdout[-500:]}")
        heavy = proc.stdout.rsplit("@@probe ", 1)[1].strip()
        return Result({"runs": 1}, output=None, peak_rss_bytes=proc.peak_rss_bytes, cpu_seconds=proc.cpu_seconds,
                      figures={"imports_torch": float("torch" in heavy), "imports_transformers": float("transformers" in heavy)})

    return Variant(f"{name} --help", run, exact=False)


def bare_python() -> Result:
    proc = run_process([sys.executable, "-c", "pass"], env=child_env())
    return Result({"runs": 1}, peak_rss_bytes=proc.peak_rss_bytes, cpu_seconds=proc.cpu_seconds)


def help_case() -> tuple[Case, list[Target]]:
    scripts = console_scripts()
    case = Case("--help of every console script", unit="runs",
                variants=[Variant("python -c pass (the interpreter alone)", bare_python)]
                + [help_variant(n, t) for n, t in sorted(scripts.items())])
    targets = [Target(case.name, f"{n} --help", "seconds", "<=", HELP_TARGET_S, f"`{n} --help` < {HELP_TARGET_S} s")
               for n in sorted(scripts)]
    return case, targets


# ------------------------------------------------------------------------------------------ tokenizer runs
def make_images(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(n):  # smooth random fields, so JPEG decoding does real work
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(folder / "imgs" / f"{i}.jpg", quality=90)
    csv = folder / f"images{n}.csv"
    csv.write_text("img_path\n" + "".join(f"imgs/{i}.jpg\n" for i in range(n)))
    return csv


def make_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Chameleon's 512 px VQGAN with random weights: ours (yaml + safetensors), the reference's (yaml + ckpt)."""
    import torch

    from medmax.presets import VQGAN_PRESETS
    from medmax.vqgan import VQGAN, save_vqgan

    torch.manual_seed(0)
    model = VQGAN.from_params(VQGAN_PRESETS["chameleon"])
    ours = save_vqgan(model, folder / "ours")
    ref = folder / "reference"
    ref.mkdir()
    shutil.copy(ours / "vqgan.yaml", ref / "vqgan.yaml")
    torch.save({"state_dict": model.state_dict()}, ref / "vqgan.ckpt")
    return ours, ref


def reference_variant(csv: Path, ckpt: Path, out: Path, n: int, bs: int) -> Variant:
    def run() -> Result:
        shutil.rmtree(out, ignore_errors=True)
        proc = run_process([sys.executable, str(ROOT / "bench" / "reference_image_tokenize.py"), "--input", str(csv),
                            "--output", str(out), "--ckpt", str(ckpt), "--bs", str(bs)], env=child_env(), cwd=ROOT)
        return Result({"images": n}, output=read_codes(out), peak_rss_bytes=proc.peak_rss_bytes, cpu_seconds=proc.cpu_seconds)

    return Variant(f"reference (MedMax pipeline, taming), fp32, batch {bs}", run)


def ours_cmd(csv: Path, ckpt: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tokenization.image_tokenize", "--input", str(csv), "--output", str(out),
            "--ckpt", str(ckpt), "--no-progress", "--device", "cpu", *flags]


def ours_variant(name: str, csv: Path, ckpt: Path, out: Path, n: int, *flags: str, exact: bool = True,
                 loop_time: bool = False) -> Variant:
    def run() -> Result:
        shutil.rmtree(out, ignore_errors=True)
        proc = run_process(ours_cmd(csv, ckpt, out, *flags), env=child_env(), cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        return Result({"images": n}, output=read_codes(out), peak_rss_bytes=proc.peak_rss_bytes,
                      cpu_seconds=proc.cpu_seconds, seconds=summary["seconds"] if loop_time else None)

    return Variant(name, run, exact=exact)


def tokenizer_case(csv: Path, ckpts: tuple[Path, Path], work: Path, n: int, warm_csv: Path) -> tuple[Case, list[Target]]:
    ours_ckpt, ref_ckpt = ckpts
    ref = reference_variant(csv, ref_ckpt, work / "ref", n, 1)
    fp32 = ours_variant("ours, defaults (fp32)", csv, ours_ckpt, work / "fp32", n)
    bf16 = ours_variant("ours, defaults + --dtype bf16", csv, ours_ckpt, work / "bf16", n, "--dtype", "bf16", exact=False)
    ref.warmup = reference_variant(warm_csv, ref_ckpt, work / "warm", 1, 1).run  # page cache and .pyc, 1 image
    fp32.warmup = ours_variant("", warm_csv, ours_ckpt, work / "warm", 1).run
    bf16.warmup = lambda: None
    case = Case(f"{n}-image 512 px tokenizer run, whole process", unit="images", agreement=code_agreement,
                variants=[ref, fp32, bf16])
    targets = [Target(case.name, fp32.name, "ratio", ">=", 0.95, "tokenizer fp32 within 5% of the reference, every round",
                      every_round=True),
               Target(case.name, bf16.name, "ratio", ">=", 2.0, "tokenizer bf16 >= 2.0x the fp32 reference, every round",
                      every_round=True)]
    return case, targets


def batch_case(csv: Path, ckpt: Path, work: Path, n: int, sizes: list[int], dtypes: list[str]) -> Case:
    variants = []
    for dtype in dtypes:
        for b in sizes:
            flags = ("--batch-size", str(b), "--dtype", dtype)
            variants.append(ours_variant(f"ours {dtype} --batch-size {b}", csv, ckpt, work / f"b{dtype}{b}", n, *flags,
                                         exact=dtype == "fp32", loop_time=True))
            variants[-1].warmup = lambda: None
    return Case(f"batch size, {n} images at 512 px, loop time (start-up excluded)", unit="images",
                agreement=code_agreement, variants=variants)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 images, batch sizes 1, 2 and 4")
    p.add_argument("--only", choices=("help", "tokenizer", "batch"), action="append",
                   help="run only these parts (repeatable; default: all)")
    p.add_argument("--images", type=int, help="images of the tokenizer run (default 12; quick 4)")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   help="batch sizes of the batch part, comma-separated (default 1,2,4,8; quick 1,2,4)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), action="append",
                   help="dtypes of the batch part (repeatable; default both)")
    add_arguments(p)
    args = p.parse_args(argv)
    parts = args.only or ["help", "tokenizer", "batch"]
    n = args.images or (4 if args.quick else 12)
    n_batch, sizes = (4, [1, 2, 4]) if args.quick else (8, [1, 2, 4, 8])
    sizes, dtypes = args.batch_sizes or sizes, args.dtype or ["fp32", "bf16"]
    bench = Benchmark(
        name="startup" if parts == ["help", "tokenizer", "batch"] else "startup-" + "-".join(parts),
        title="Start-up and whole-process runs", size=size_label(args.quick, args.images),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"parts": parts, "tokenizer_images": n, "batch_images": n_batch, "batch_sizes": sizes, "batch_dtypes": dtypes,
                  "image": "640x480 JPEG", "vqgan": "chameleon 512 px, random weights"},
        command=command_line(argv))
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        cases, targets = [], []
        if "help" in parts:
            case, t = help_case()
            cases.append(case), targets.extend(t)
        if "tokenizer" in parts or "batch" in parts:
            ckpts = make_checkpoints(work / "ckpt")
            data = work / "data"
            if "tokenizer" in parts:
                case, t = tokenizer_case(make_images(data, n), ckpts, work, n, make_images(data, 1))
                cases.append(case), targets.extend(t)
            if "batch" in parts:
                cases.append(batch_case(make_images(data, n_batch), ckpts[0], work, n_batch, sizes, dtypes))
        return run_benchmark(bench, cases, targets, args, notes=_notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _notes(record: dict) -> list[str]:
    notes = []
    for name, case in record["cases"].items():
        if name.startswith("--help"):
            heavy = [v for v, e in case["variants"].items() if e["summary"].get("imports_torch", {}).get("max")]
            notes.append("--help imports torch in: " + (", ".join(heavy) if heavy else "none of the scripts"))
        if name.startswith("batch size"):
            for dtype in ("fp32", "bf16"):
                rates = {v: e["summary"]["images/s"]["median"] for v, e in case["variants"].items() if dtype in v}
                if not rates:
                    continue
                best = max(rates, key=rates.get)
                notes.append(f"batch size, {dtype}: fastest per image is `{best.split(' ', 2)[2]}` "
                             f"({rates[best]:.3f} images/s median, loop time); "
                             + ", ".join(f"{v.split(' ', 2)[2]}: {r:.3f}" for v, r in rates.items()))
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
