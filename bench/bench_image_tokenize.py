"""Image-tokenization throughput at Chameleon's real 512 px VQGAN, against MedMax's reference pipeline.

Usage::

    python bench/bench_image_tokenize.py            # 8 images per run, batch 1
    python bench/bench_image_tokenize.py --quick    # 2 images per run

Both pipelines tokenize the same synthetic 640x480 JPEGs with the same random VQGAN weights
(Chameleon's configuration: 512 px -> 32x32 codes, 8192 codes), in this process:

- reference: MedMax's ``src/image_tokenization.py`` recipe: PIL decoding and preprocessing in the main
  process, fp32, taming-transformers' ``Encoder`` + ``quant_conv`` + ``VectorQuantizer2(legacy=True)``;
- ours: ``tokenization.image_tokenize.main`` (DataLoader worker decoding, inference mode) in fp32,
  fp32 ``--channels-last``, and ``--dtype bf16``.

Each run is timed from its first image to its last code (checkpoint loading excluded for both; ours
reports its loop time in its summary), all oneDNN kernels are warmed up first. GFLOP/s counts the FLOPs
of one encoder pass (``torch.utils.flop_counter``) and is set against the best matmul rate of each
dtype measured here just before the rounds (a loaded machine lowers both). Start-up and whole-process time are in ``bench_startup.py``.
Parity: ours fp32 must give the reference's codes exactly; channels-last and bf16 report agreement
(fp32 is code-exact because it runs the same kernels; parity is its honest limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from harness import Benchmark, command_line, Case, Result, Target, Variant, add_arguments, run_benchmark, size_label  # noqa: E402

from medmax.images import preprocess  # noqa: E402
from medmax.presets import VQGAN_PRESETS  # noqa: E402
from medmax.vqgan import VQGAN, save_vqgan  # noqa: E402


def make_images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir(parents=True)
    for i in range(n):  # smooth random fields, so JPEG decoding does real work
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(folder / "imgs" / f"{i}.jpg", quality=90)
    csv = folder / "images.csv"
    csv.write_text("img_path\n" + "".join(f"imgs/{i}.jpg\n" for i in range(n)))
    return csv


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    """Best GFLOP/s of square matmuls over a few timed rounds."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t) / 1e9)
    return best


def encoder_gflop(model: VQGAN) -> float:
    """FLOPs of encoder + quant_conv + nearest-code search for one image, in GFLOP."""
    x = torch.zeros(1, 3, model.resolution, model.resolution)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.quantize(model.quant_conv(model.encoder(x)))
    return counter.get_total_flops() / 1e9


def taming_reference(model: VQGAN):
    """taming's modules holding the same weights (MedMax's reference runs exactly these)."""
    from taming.modules.diffusionmodules.model import Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    params = model.params
    ref = torch.nn.Module()
    ref.encoder = Encoder(**params["ddconfig"])
    ref.quant_conv = torch.nn.Conv2d(params["ddconfig"]["z_channels"], params["embed_dim"], 1)
    ref.quantize = VectorQuantizer2(params["n_embed"], params["embed_dim"], beta=0.25, legacy=True)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("post_quant_conv")})
    return ref.eval()


def read_codes(folder: Path) -> dict[str, list[int]]:
    import pyarrow.parquet as pq

    codes = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path, columns=["img_path", "img_tokens"])
        codes.update(zip(table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist()))
    return codes


def code_agreement(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return 0.0
    pairs = [(x, y) for k in a for x, y in zip(a[k], b[k])]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


class Pipelines:
    def __init__(self, model: VQGAN, csv: Path, ckpt: Path, out: Path, batch: int, gflop: float, peaks: dict):
        self.ref, self.csv, self.ckpt, self.out, self.batch = taming_reference(model), csv, ckpt, out, batch
        self.resolution, self.gflop, self.peaks = model.resolution, gflop, peaks
        self.n = len(csv.read_text().split()) - 1

    def _result(self, seconds: float, codes: dict, dtype: str) -> Result:
        gflops = self.n * self.gflop / seconds
        return Result({"images": self.n}, output=codes, seconds=seconds,
                      figures={"GFLOP/s": gflops, "share of matmul peak": gflops / self.peaks[dtype]})

    def reference(self) -> Result:
        paths = self.csv.read_text().split()[1:]
        codes, start = {}, time.perf_counter()
        for i in range(0, len(paths), self.batch):
            chunk = paths[i : i + self.batch]
            pixels = torch.stack([preprocess(Image.open(self.csv.parent / p).convert("RGB"), self.resolution) for p in chunk])
            with torch.no_grad():
                _, _, (_, _, found) = self.ref.quantize(self.ref.quant_conv(self.ref.encoder(pixels)))
            codes.update(zip(chunk, found.view(len(chunk), -1).tolist()))
        return self._result(time.perf_counter() - start, codes, "fp32")

    def ours(self, *flags: str):
        from tokenization.image_tokenize import main as tokenize_main

        def run() -> Result:
            shutil.rmtree(self.out, ignore_errors=True)
            tokenize_main(["--input", str(self.csv), "--output", str(self.out), "--ckpt", str(self.ckpt),
                           "--batch-size", str(self.batch), "--workers", "1", "--no-progress", "--device", "cpu", *flags])
            summary = json.loads((self.out / "summary.json").read_text())
            return self._result(summary["seconds"], read_codes(self.out), "bf16" if "bf16" in flags else "fp32")

        return run


def warm_up(model: VQGAN, batch_size: int) -> None:
    """Build oneDNN kernels for every layout and dtype measured, so no variant pays for them."""
    x = torch.rand(batch_size, 3, model.resolution, model.resolution) * 2 - 1
    for dtype, channels_last in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        clone = VQGAN.from_params(model.params, with_decoder=False)
        clone.load_state_dict(model.state_dict(), strict=False)
        clone.prepare_for_encoding(dtype=dtype, channels_last=channels_last).encode_codes(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images per run")
    p.add_argument("--images", type=int, help="images per run (default 8, quick 2)")
    p.add_argument("--batch-size", type=int, default=1, help="images per encoder pass, both pipelines (default 1)")
    add_arguments(p)
    args = p.parse_args(argv)
    n = args.images or (2 if args.quick else 8)
    torch.manual_seed(0)
    model = VQGAN.from_params(VQGAN_PRESETS["chameleon"], with_decoder=False)
    gflop = encoder_gflop(model)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    bench = Benchmark(
        name="image_tokenize", title="Image tokenization loop vs MedMax's taming pipeline", size=size_label(args.quick, args.images),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"images": n, "batch_size": args.batch_size, "resolution": 512, "gflop_per_image": round(gflop, 1),
                  "threads": torch.get_num_threads(), "matmul_peak_gflops": {k: round(v) for k, v in peaks.items()}},
        command=command_line(argv))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv, ckpt = make_images(tmp / "data", n), save_vqgan(model, tmp / "ckpt")
        warm_up(model, args.batch_size)
        pipes = Pipelines(model, csv, ckpt, tmp / "out", args.batch_size, gflop, peaks)
        none = lambda: None  # noqa: E731  (kernels are warm: warm_up above)
        case = Case(f"{n} images, 512 px, batch {args.batch_size}", unit="images", agreement=code_agreement, variants=[
            Variant("reference fp32 (taming, main-process preprocessing)", pipes.reference, warmup=none),
            Variant("ours fp32 (default, code-exact)", pipes.ours(), warmup=none),
            Variant("ours fp32 --channels-last", pipes.ours("--channels-last"), exact=False, warmup=none),
            Variant("ours --dtype bf16", pipes.ours("--dtype", "bf16"), exact=False, warmup=none)])
        targets = [Target(case.name, "ours fp32 (default, code-exact)", "ratio", ">=", 0.95, "fp32 loop within 5% of the reference"),
                   Target(case.name, "ours --dtype bf16", "ratio", ">=", 2.0, "bf16 loop >= 2x the fp32 reference"),
                   Target(case.name, "ours fp32 (default, code-exact)", "share of matmul peak", ">=", 0.75,
                          "fp32 >= 75% of the measured matmul peak")]
        return run_benchmark(bench, [case], targets, args)


if __name__ == "__main__":
    raise SystemExit(main())
