"""Image-tokenization throughput at Chameleon's real 512 px VQGAN, against MedMax's reference pipeline.

Usage::

    .venv/bin/python bench/bench_image_tokenize.py            # 4 images per variant, batch 2
    .venv/bin/python bench/bench_image_tokenize.py --quick    # 2 images per variant, batch 1

Both pipelines tokenize the same synthetic 640x480 JPEGs with the same random VQGAN weights
(``VQGAN_PRESETS["chameleon"]``: 512 px -> 32x32 codes, 8192 codes), in this process, one after the other:

- reference: MedMax's ``src/image_tokenization.py`` recipe: PIL decode and preprocessing in the main
  process, fp32, taming-transformers' ``Encoder`` + ``quant_conv`` + ``VectorQuantizer2(legacy=True)``;
- ours: ``tokenization.image_tokenize.main`` (DataLoader worker decoding, inference mode) in fp32,
  fp32 channels-last, and bf16.

Printed per variant: images/s, ratio to the reference, and GFLOP/s (FLOPs of one encoder pass counted by
``torch.utils.flop_counter``) against the matmul peak measured here for that dtype. All oneDNN kernels
are warmed up before timing. The codes of ours-fp32 are checked equal to the reference's.
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

from medmax.image_tokens import read_image_tokens  # noqa: E402
from medmax.images import preprocess  # noqa: E402
from medmax.presets import VQGAN_PRESETS  # noqa: E402
from medmax.vqgan import VQGAN, save_vqgan  # noqa: E402
from tokenization.image_tokenize import main as tokenize_main  # noqa: E402


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


def run_reference(ref, csv: Path, batch_size: int, resolution: int) -> tuple[float, dict]:
    paths = csv.read_text().split()[1:]
    tokens, start = {}, time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        pixels = torch.stack([preprocess(Image.open(csv.parent / p).convert("RGB"), resolution) for p in chunk])
        with torch.no_grad():
            _, _, (_, _, codes) = ref.quantize(ref.quant_conv(ref.encoder(pixels)))
        tokens.update(zip(chunk, codes.view(len(chunk), -1).tolist()))
    return len(paths) / (time.perf_counter() - start), tokens


def run_ours(csv: Path, ckpt: Path, out: Path, batch_size: int, *flags: str) -> tuple[float, dict]:
    """Images/s of the program's tokenizing loop (its own summary: DataLoader start to the last partition)."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--input", str(csv), "--output", str(out), "--ckpt", str(ckpt), "--batch-size", str(batch_size),
            "--workers", "1", "--no-progress", "--device", "cpu", *flags]
    tokenize_main(argv)
    summary = json.loads((out / "summary.json").read_text())
    return summary["tokenized"] / summary["seconds"], read_image_tokens(out)


REFERENCE = "reference fp32 (taming, main-process preprocessing)"
VARIANTS = (("ours fp32", ()), ("ours fp32 channels-last", ("--channels-last",)), ("ours bf16", ("--dtype", "bf16")))


def _keep_best(best: dict, name: str, result: tuple) -> None:
    if name not in best or result[1] > best[name][1]:
        best[name] = result


def warm_up(model: VQGAN, batch_size: int) -> None:
    """Build oneDNN kernels for every layout and dtype measured, so no variant pays for them."""
    x = torch.rand(batch_size, 3, model.resolution, model.resolution) * 2 - 1
    for dtype, channels_last in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        clone = VQGAN.from_params(model.params, with_decoder=False)
        clone.load_state_dict(model.state_dict(), strict=False)
        clone.prepare_for_encoding(dtype=dtype, channels_last=channels_last).encode_codes(x)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images per variant, batch 1")
    p.add_argument("--images", type=int, help="images per variant (default 4, quick 2)")
    p.add_argument("--batch-size", type=int, help="default 2, quick 1")
    p.add_argument("--rounds", type=int, help="interleaved rounds, best kept (default 2, quick 1)")
    args = p.parse_args(argv)
    n = args.images or (2 if args.quick else 4)
    batch = args.batch_size or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)

    torch.manual_seed(0)
    model = VQGAN.from_params(VQGAN_PRESETS["chameleon"], with_decoder=False)
    gflop = encoder_gflop(model)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv, ckpt = make_images(tmp / "data", n), save_vqgan(model, tmp / "ckpt")
        warm_up(model, batch)
        ref = taming_reference(model)
        best: dict[str, tuple] = {}
        tokens_by: dict[str, dict] = {}
        pipelines = [(REFERENCE, None), *VARIANTS]
        for r in range(rounds):  # interleaved, order rotated each round, best kept: the 2 cores are shared
            for name, flags in pipelines[r % len(pipelines):] + pipelines[: r % len(pipelines)]:
                if flags is None:
                    rate, ref_tokens = run_reference(ref, csv, batch, model.resolution)
                    _keep_best(best, REFERENCE, ("fp32", rate))
                    continue
                rate, tokens = run_ours(csv, ckpt, tmp / "out", batch, *flags)
                tokens_by[name] = tokens
                _keep_best(best, name, ("bf16" if "bf16" in flags else "fp32", rate))
        for name, tokens in tokens_by.items():
            if name == "ours fp32" and tokens != ref_tokens:
                raise SystemExit("ours fp32 codes differ from the taming reference")
            agree = float(np.mean([a == b for k in ref_tokens for a, b in zip(ref_tokens[k], tokens[k])]))
            best[name] = (*best[name], agree)
    ref_rate = best[REFERENCE][1]
    peaks = {k: max(v, matmul_peak(torch.float32 if k == "fp32" else torch.bfloat16)) for k, v in peaks.items()}
    print(f"VQGAN 512 px encoder: {gflop:.0f} GFLOP/image; matmul peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s; {n} images, batch {batch}, {torch.get_num_threads()} threads, best of {rounds} rounds")
    print(f"{'pipeline':<52}{'img/s':>8}{'ratio':>8}{'GFLOP/s':>9}{'% peak':>8}{'codes = ref':>13}")
    report = {}
    for name, (dtype, rate, *agree) in best.items():
        achieved = rate * gflop
        row = dict(images_per_s=rate, ratio=rate / ref_rate, gflops=achieved, peak_fraction=achieved / peaks[dtype])
        report[name] = row
        same = f"{agree[0]:.1%}" if agree else "-"
        print(f"{name:<52}{rate:>8.3f}{row['ratio']:>8.2f}{achieved:>9.1f}{row['peak_fraction']:>8.1%}{same:>13}")
    return {"gflop_per_image": gflop, "peaks": peaks, "images": n, "batch": batch, "rounds": rounds, "results": report}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
