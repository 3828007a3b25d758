"""Which VQGAN objective keeps small lesions at equal wall time: reconstruction only, or taming's full objective?

Usage::

    nice -n 10 python bench/vqgan_objectives.py --seconds 180        # ~12 min: four arms of 3 minutes, one thread
    python bench/vqgan_objectives.py --seconds 20 --no-record        # a smoke run

Data: the quickstart's synthetic scans (``medmax.synthetic.make_scans``, 96 px, half with a bright
lesion) and the DICOM files bundled with pydicom (``medmax.synthetic.DICOM_SAMPLES``), all at the tiny
preset's 64 px. Training: ``--train-scans`` scans and the first ``--dicom-train`` DICOM files; held out:
``--test-scans`` other scans and the remaining DICOM files.

Arms, each given the same ``--seconds`` of training on one thread (``--threads``), the same batch size,
learning rate, optimizer and contrast-weighted L1 (the quickstart's recipe), so that the only difference
is the objective:

1. ``reconstruction``: the tiny preset from random weights, reconstruction only (pixel + codebook loss);
2. ``full_all``: the same start, taming's full objective on all weights (PatchGAN switched on after
   ``--disc-start`` steps, adaptive weight, ``disc_weight`` 0.8), LPIPS off (no weights on this machine);
3. ``full_decoder``: arm 1's VQGAN, then taming's objective on the decoder only (codes unchanged);
4. ``reconstruction_decoder``: arm 1's VQGAN, then reconstruction only on the decoder: the control for
   arm 3 (the same extra time, without the discriminator).

Arms 3 and 4 start where arm 1 ended, so they have had twice its time in total; compare 3 with 4, and
1 with 2. Each arm is evaluated on the held-out scans (PSNR, SSIM, codes used, perplexity, lesion
survival) and DICOM files (PSNR, SSIM), with ``medmax.vqgan_eval.evaluate_vqgan``. One run per arm
(training is seeded; wall-time budgets make the step counts depend on the machine's load, which is
recorded). Writes ``bench/results/vqgan_objectives/vqgan-objectives-<time>.json`` and the figure
``docs/vqgan_objectives.png`` (rows: held-out inputs, then each arm's reconstructions).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from harness import ROOT, LoadSampler, environment, load_average, threads  # noqa: E402
from medmax.images import ImageLoadError, load_image, preprocess  # noqa: E402
from medmax.presets import VQGAN_PRESETS  # noqa: E402
from medmax.synthetic import DICOM_SAMPLES, bundled_dicom_folder, make_scans  # noqa: E402
from medmax.vqgan import VQGAN, to_uint8  # noqa: E402
from medmax.vqgan_eval import evaluate_vqgan, reconstruct  # noqa: E402
from medmax.vqgan_training import RunContext, Trainer, VQGANTrainConfig  # noqa: E402

RESOLUTION = 64
ARMS = ("reconstruction", "full_all", "full_decoder", "reconstruction_decoder")
LABELS = {"inputs": "held-out inputs", "reconstruction": "1 reconstruction only", "full_all": "2 full objective, all weights",
          "full_decoder": "3 full objective, decoder only (from 1)", "reconstruction_decoder": "4 reconstruction, decoder only (from 1)"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180.0, help="training wall time of each arm")
    p.add_argument("--train-scans", type=int, default=384)
    p.add_argument("--test-scans", type=int, default=96)
    p.add_argument("--dicom-train", type=int, default=8, help="bundled DICOM files trained on; the rest are held out")
    p.add_argument("--disc-start", type=int, default=100, help="steps before arm 2's discriminator switches on")
    p.add_argument("--decoder-disc-start", type=int, default=0, help="the same for arm 3 (it starts from a trained VQGAN)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "vqgan_objectives")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "vqgan_objectives.png")
    p.add_argument("--no-record", dest="record", action="store_false", help="print only; write neither record nor figure")
    return p.parse_args(argv)


def _dicoms() -> tuple[list[torch.Tensor], list[str]]:
    pixels, names = [], []
    for name in DICOM_SAMPLES:
        try:
            pixels.append(preprocess(load_image(bundled_dicom_folder() / name), RESOLUTION))
            names.append(name)
        except ImageLoadError as exc:  # reported, never replaced
            print(f"[vqgan_objectives] skipping {name}: {exc.reason}", file=sys.stderr)
    return pixels, names


def load_data(args) -> dict:
    scans = make_scans(args.train_scans + args.test_scans, seed=args.seed)
    synthetic = torch.stack([preprocess(s.image, RESOLUTION) for s in scans])
    dicom, names = _dicoms()
    train = torch.cat([synthetic[: args.train_scans], torch.stack(dicom[: args.dicom_train])])
    held_dicom = torch.stack(dicom[args.dicom_train:])
    lesions = [i for i, s in enumerate(scans[args.train_scans:]) if s.lesion]
    return {"train": train, "held_scans": synthetic[args.train_scans:], "held_dicom": held_dicom,
            "dicom_names": {"train": names[: args.dicom_train], "held_out": names[args.dicom_train:]},
            "shown": torch.cat([synthetic[args.train_scans:][lesions[:6]], held_dicom[:2]])}


def _config(args, **overrides) -> VQGANTrainConfig:
    base = dict(steps=10**7, batch_size=args.batch_size, lr=args.lr, pixel_weight="contrast", pixel_weight_alpha=10.0,
                perceptual_weight=0.0, max_seconds=args.seconds, seed=args.seed, log_every=25, save_every=0,
                tensorboard=False, disc_weight=0.8, disc_num_layers=2, disc_ndf=32)
    return VQGANTrainConfig(**{**base, **overrides})


def train_arm(vqgan: VQGAN, data: dict, config: VQGANTrainConfig) -> dict:
    digest = vqgan.codes_digest()
    trainer = Trainer(vqgan, data["train"], config, RunContext())
    cpu = time.process_time()
    history = trainer.run()
    return {"steps": trainer.step, "seconds": round(history[-1]["seconds"], 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "codes_changed": vqgan.codes_digest() != digest, "last_record": history[-1], "config": {
                k: getattr(config, k) for k in ("train", "disc_start", "disc_weight", "lr", "batch_size", "pixel_weight")}}


def evaluate_arm(vqgan: VQGAN, data: dict) -> dict:
    scans = evaluate_vqgan(vqgan, data["held_scans"])
    dicom = evaluate_vqgan(vqgan, data["held_dicom"])
    return {"scans": scans, "dicom": {k: dicom[k] for k in ("n_images", "psnr", "ssim", "l1", "codes_used")}}


def run_arms(args, data: dict) -> tuple[dict, dict]:
    """Train and evaluate the four arms; -> (results by arm, reconstructions of the shown images by arm)."""
    results, shown = {}, {}

    def finish(name, vqgan, trained):
        results[name] = {**trained, **evaluate_arm(vqgan, data)}
        shown[name] = reconstruct(vqgan.eval(), data["shown"])[1]
        print(f"[vqgan_objectives] {name}: {json.dumps({k: results[name][k] for k in ('steps', 'scans', 'dicom')})}", file=sys.stderr)

    for name, objective in (("reconstruction", {}), ("full_all", {"disc_start": args.disc_start})):
        torch.manual_seed(args.seed)
        vqgan = VQGAN.from_params(VQGAN_PRESETS["tiny"])
        finish(name, vqgan, train_arm(vqgan, data, _config(args, **objective)))
        if name == "reconstruction":
            base_state = {k: v.clone() for k, v in vqgan.state_dict().items()}
    for name, objective in (("full_decoder", {"disc_start": args.decoder_disc_start}), ("reconstruction_decoder", {})):
        vqgan = VQGAN.from_params(VQGAN_PRESETS["tiny"])
        vqgan.load_state_dict(base_state)
        finish(name, vqgan, train_arm(vqgan, data, _config(args, train="decoder", init_codebook=False, **objective)))
    return results, shown


def save_figure(data: dict, shown: dict, path: Path) -> None:
    """Rows: the held-out inputs, then each arm's reconstructions; a label strip on the left; pixels doubled."""
    from PIL import Image, ImageDraw

    rows = {"inputs": data["shown"].clamp(-1, 1), **shown}
    strips = [torch.cat(list(to_uint8(t)), dim=1).numpy() for t in rows.values()]  # each (R, n*R, 3)
    label_w, scale = 300, 2
    width, height = label_w + strips[0].shape[1] * scale, len(strips) * RESOLUTION * scale
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, strip) in enumerate(zip(rows, strips)):
        image = Image.fromarray(strip).resize((strip.shape[1] * scale, RESOLUTION * scale), Image.NEAREST)
        canvas.paste(image, (label_w, i * RESOLUTION * scale))
        draw.text((8, i * RESOLUTION * scale + RESOLUTION * scale // 2 - 6), LABELS[name], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_before = datetime.now(timezone.utc), load_average()
    data = load_data(args)
    with LoadSampler() as sampler:
        results, shown = run_arms(args, data)
    record = {
        "benchmark": "vqgan_objectives", "title": "VQGAN objectives at equal wall time (tiny preset, 64 px, CPU)",
        "command": shlex.join(["python", "bench/vqgan_objectives.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"train_images": int(data["train"].shape[0]), "held_out_scans": int(data["held_scans"].shape[0]),
                 "dicom": data["dicom_names"]},
        "started": started.isoformat(timespec="seconds"), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "conditions": {"load_before": load_before, "load_after": load_average(), "load1_max_during": max(sampler.samples, default=0.0),
                       "threads": threads(), "nice": os.nice(0)},
        "environment": environment(), "arms": results,
        "notes": ["LPIPS off in every arm: no perceptual weights can be downloaded on this machine.",
                  "One run per arm; arms 3 and 4 continue from arm 1, so they have had twice its training time."],
    }
    print(json.dumps(results, indent=1))
    if args.record:
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"vqgan-objectives-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        save_figure(data, shown, args.figure)
        print(f"[vqgan_objectives] record {path.relative_to(ROOT)}, figure {args.figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
