"""The whole pipeline, end to end, on an embedded default: synthetic scans + pydicom's DICOM files, tiny models, CPU.

Usage (what `make quickstart` runs):

    python -m quickstart --output runs/quickstart            # full: ~1500 scans, a few minutes on 2 cores
    python -m quickstart --output runs/qs --reduced          # the reduced run the test suite uses

Every step calls the same program a user would call, as a subprocess:

    1. data        synthetic scans (PNG) with closed / multiple-choice / open questions and captions,
                   plus the DICOM files bundled in pydicom
    2. vqgan       python -m tokenization.train_vqgan: a tiny VQGAN (64 px, 8x8 codes) trained for 300 steps
                   (about a minute on 2 quiet cores; a step count, not a time, so every machine trains it alike) to
                   reconstruct the training scans (contrast-weighted, so the small bright lesions survive);
                   held-out scans are never seen by any step
    3. tokenize    torchrun --nproc-per-node 2 -m tokenization.image_tokenize
    4. sequences   python -m tokenization.build_sequences (train and held-out)
    5. train       finetune/launch.sh finetune/configs/quickstart.yaml, then python -m finetune.export
       (--grpo-steps N) the supervised model's faithfulness is measured, then python -m finetune.train --config
                   finetune/configs/grpo_tiny_cpu.yaml (GRPO with the lesion-locator reward on the training prompts)
                   for N steps and exported as model/ (the supervised one kept as sft_model/); ~1.3 s a step, 200 advised
    6. evaluate    python -m eval.run on the held-out questions (MedMax eval schema)
    7. generate    medmax generate --mode image from a caption; then text-to-image faithfulness: an image for
                   each held-out generation prompt (at most 64), and the share whose brightest blob lies in
                   the requested quadrant at the requested size (medmax.synthetic.faithfulness; chance 1/8)
    8. report      OUTPUT/report/README.md and summary.json with the results, the charts and the images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medmax.cli import program

HERE = Path(__file__).resolve().parent

CHANCE = {"closed": 0.5, "mcq": 0.25}
TARGETS = {"closed": 0.90, "mcq": 0.70}


@dataclass
class Sizes:
    """How much data and training one run uses."""

    n_train: int
    n_test: int
    max_steps: int
    n_dicom: int
    vqgan_steps: int  # reconstruction training of the tiny VQGAN (steps, never wall time: the same on any machine)


# The VQGAN's steps replace the wall-time budgets it had (60 s full, 20 s reduced; a loaded machine trained it
# for as few as 7 steps, a quiet one for ~300). Measured here, 2 cores, quiet: ~5 steps/s (batch 16, 64 px,
# --threads 2), so 300 steps ~ 60 s and 100 steps ~ 20 s, what the budgets gave on a quiet machine.
FULL = Sizes(n_train=1500, n_test=200, max_steps=500, n_dicom=12, vqgan_steps=300)
REDUCED = Sizes(n_train=300, n_test=60, max_steps=80, n_dicom=3, vqgan_steps=100)


def vqgan_args(images_csv: Path, output: Path, steps: int, seed: int) -> list:
    """Step 2's train_vqgan arguments: bounded by ``steps`` only, so the same seed trains the same VQGAN anywhere."""
    return ["--input", images_csv, "--output", output, "--preset", "tiny", "--steps", steps, "--batch-size", 16,
            "--lr", 5e-4, "--pixel-weight", "contrast", "--pixel-weight-alpha", 10, "--seed", seed, "--threads", 2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/quickstart"), help="run folder (replaced)")
    p.add_argument("--reduced", action="store_true", help="fewer images and steps (the test suite's setting)")
    p.add_argument("--nproc", type=int, default=2, help="processes for image tokenization (torchrun)")
    p.add_argument("--max-steps", type=int, help="override the training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpo-steps", type=int, default=0,
                   help="then this many GRPO steps on the drawings (lesion-locator reward, grpo_tiny_cpu.yaml: 200 "
                        "raise held-out faithfulness from 0.23-0.63 to 0.78-0.96 over 3 seeds; ~4.5 min on 2 quiet "
                        "cores); 0: none")
    return p


class Steps:
    """Runs each step as a subprocess, timing it."""

    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2))))

    def run(self, name: str, cmd: list[str], **kw) -> None:
        print(f"\n=== {name}: {' '.join(map(str, cmd))}", flush=True)
        start = time.time()
        subprocess.run([str(c) for c in cmd], check=True, cwd=HERE, env=kw.get("env", self.env))
        self.times[name] = time.time() - start
        print(f"=== {name} done in {self.times[name]:.1f} s", flush=True)

    def timed(self, name: str, fn, *args):
        start = time.time()
        result = fn(*args)
        self.times[name] = time.time() - start
        print(f"=== {name} done in {self.times[name]:.1f} s", flush=True)
        return result


def _prepare(out: Path, sizes: Sizes, seed: int) -> dict:
    """Step 1: the data folder and the tokenizer (library calls)."""
    from medmax.presets import build_tiny_tokenizer
    from medmax.synthetic import GENERATION_PREFIX, POSITIONS, write_dataset

    data = write_dataset(out / "data", sizes.n_train, sizes.n_test, seed=seed, n_dicom=sizes.n_dicom)
    data["tokenizer"] = out / "tokenizer.json"
    data["vqgan_steps"] = sizes.vqgan_steps
    build_tiny_tokenizer().save(str(data["tokenizer"]))
    data["generation_prompt"] = f"{GENERATION_PREFIX}A grey scan with a large bright lesion in the {POSITIONS[0]}."
    return data


FAITHFULNESS_PROMPTS = 64  # at most this many held-out generation prompts are drawn


def _grid(images, titles: list[str], path: Path) -> None:
    """A grid of up to 16 images with a title each (what was asked, what was found)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), 16)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(2.2 * cols, 2.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, title in zip(axes.flat, images[:n], titles[:n]):
        ax.imshow(im, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def measure_faithfulness(out: Path, data: dict, seed: int, model: str = "model", grid: str = "faithfulness.png") -> dict:
    """Draw one image per held-out generation prompt and check its lesion (medmax.synthetic.faithfulness).

    The detector is also run on the VQGAN's reconstructions of the same held-out scans: how well the
    measure itself reads decoded pixels, so a low score can be told apart from a blind detector.
    """
    import torch

    from medmax.generation import GenerationConfig, Generator
    from medmax.image_metrics import vqgan_encoder_fid
    from medmax.images import load_image, preprocess
    from medmax.prompting import prompt_segments
    from medmax.synthetic import faithfulness
    from medmax.vqgan import to_uint8
    from PIL import Image

    rows = data["heldout_lesions"][:FAITHFULNESS_PROMPTS]
    targets = [(r["position"], r["size"]) for r in rows]
    gen = Generator.from_dir(out / model, device="cpu")
    prompts = [prompt_segments(r["prompt"], [], end_of_turn=True) for r in rows]  # as medmax generate builds them
    drawn = [o.images[0].image for o in gen.generate(prompts, GenerationConfig(mode="image", seed=seed, batch_size=32))]
    result = faithfulness(drawn, targets)
    with torch.no_grad():
        scans = torch.stack([preprocess(load_image(data["eval_dir"] / r["image_path"]), gen.vqgan.resolution) for r in rows])
        recon = [Image.fromarray(a.numpy()) for a in to_uint8(gen.vqgan.decode_codes(gen.vqgan.encode_codes(scans)))]
    result["detector_on_reconstructions"] = faithfulness(recon, targets)["match"]
    real = [load_image(data["eval_dir"] / r["image_path"]) for r in rows]  # the held-out scans of these prompts
    result["fid"] = vqgan_encoder_fid(gen.vqgan, drawn, real, seed=seed)  # a stand-in extractor: see the report
    found = [" ".join(f) if f else "none" for f in result["found"]]
    _grid(drawn, [f"asked {s} {p}\nfound {f}" for (p, s), f in zip(targets, found)], out / grid)
    return result


def _copy_artifacts(out: Path, report: Path) -> dict[str, str]:
    """Gather what the programs wrote into the report folder; returns name -> relative path."""
    found = {}
    wanted = {
        "eval_chart": out / "eval" / "report.png",
        "eval_report": out / "eval" / "report.md",
        "results": out / "eval" / "results.json",
        "loss_curve": out / "train" / "loss_curve.png",
        "vqgan_reconstructions": out / "vqgan" / "reconstructions.png",
        "faithfulness_grid": out / "faithfulness.png",
        "faithfulness_grid_before_grpo": out / "faithfulness_sft.png",
    }
    pngs = sorted((out / "generated").glob("*.png"))
    if pngs:
        wanted["generated_image"] = pngs[0]
    for name, src in wanted.items():
        if src.is_file():
            shutil.copy(src, report / src.name)
            found[name] = src.name
    return found


def _image_summary(out: Path) -> dict:
    """What the image tokenizer did with the scans and the DICOM files (from its own output)."""
    from medmax.image_tokens import read_image_tokens

    tokenized = read_image_tokens([out / "tokens"])
    failed = [json.loads(line) for f in sorted((out / "tokens" / "errors").glob("*.jsonl")) for line in f.open()]
    return {
        "tokenized": len(tokenized),
        "dicom_tokenized": sum(p.startswith("dicom/") for p in tokenized),
        "failed": [{"img_path": e["img_path"], "reason": " ".join(e["reason"].split())} for e in failed],
    }


def _fid_lines(fid: dict | None) -> list[str]:
    if not fid:
        return []
    return [f"FID of the drawn images against the same prompts' held-out real scans: {fid['fid']:.3f} (KID "
            f"{fid['kid']:.5f} +- {fid['kid_std']:.5f}), {fid['n_generated']} drawn and {fid['n_real']} real images. "
            "The features are a stand-in: this run's own VQGAN encoder (pre-quantisation, mean-pooled; "
            "`--fid-kind vqgan-encoder` of eval.run), since a CPU quickstart has no Inception, DINOv2 or RadDino "
            "weights. The figure compares runs of this quickstart only, at this n (FID is biased upward at small n), "
            "and says nothing about published FIDs."]


def _before_grpo_lines(before: dict | None) -> list[str]:
    """The supervised model's faithfulness rows when the run added GRPO (--grpo-steps)."""
    if not before:
        return []
    return [f"| before GRPO (the supervised model, `sft_model/`): quadrant and size | {before['match']:.3f} | 0.125 | |",
            f"| before GRPO: quadrant only | {before['position_match']:.3f} | 0.25 | |",
            f"| before GRPO: size only | {before['size_match']:.3f} | 0.50 | |"]


def _ablation_lines(ablation: dict) -> list[str]:
    """The image ablation of the held-out tasks (eval.run --ablate-image): does the score need the image?"""
    lines = ["", "Image ablation: each held-out question asked again with no image, a blank grey one and another "
             "held-out scan (shuffled). A model that reads the image falls towards chance without it.", "",
             "| held-out task | real image | no image | blank | shuffled | chance | McNemar real vs shuffled |",
             "|---|---|---|---|---|---|---|"]
    for kind, e in ablation.items():
        if e:
            scores = " | ".join("-" if e[c]["score"] is None else f"{e[c]['score']:.3f}" for c in ("real", "none", "blank", "shuffled"))
            test = e["mcnemar_real_vs_shuffled"]
            lines.append(f"| {kind} | {scores} | {CHANCE[kind]:.2f} | {test['b']} vs {test['c']}, p {test['p_value']:.2g} |")
    return lines


def write_report(out: Path, data: dict, times: dict[str, float], faith: dict, before: dict | None = None) -> dict[str, float]:
    """Step 8: OUTPUT/report/ with the artifacts, summary.json and a README; returns held-out accuracies."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    found = _copy_artifacts(out, report)
    results = json.loads((out / "eval" / "results.json").read_text())
    accuracy = {kind: results[f"synthetic_{kind}"]["score"] for kind in CHANCE if f"synthetic_{kind}" in results}
    images = _image_summary(out)
    summary = {"accuracy": accuracy, "chance": CHANCE, "targets": TARGETS, "seconds": times, "images": images,
               "open": results.get("synthetic_open"), "faithfulness": faith, "artifacts": found,
               "image_ablation": {k: results[f"synthetic_{k}"].get("image_ablation") for k in accuracy},
               "faithfulness_before_grpo": before}
    (report / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    lines = [
        "# Quickstart report",
        "",
        f"Data: {data['n_images']} synthetic scans ({data['n_train_rows']} training rows, {data['n_eval_rows']} held-out "
        f"questions on scans the model never saw) and {data['n_dicom']} DICOM files bundled with pydicom.",
        "",
        "| held-out task | accuracy | chance | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {a:.3f} | {CHANCE[k]:.2f} | {TARGETS[k]:.2f} |" for k, a in accuracy.items()]
    if "synthetic_open" in results:
        lines.append(f"| open ({results['synthetic_open']['metric']}) | {results['synthetic_open']['score']:.3f} | | |")
    lines += [
        f"| text-to-image: lesion in the asked quadrant at the asked size ({faith['n']} prompts) | {faith['match']:.3f} "
        f"| {faith['chance']:.3f} | |",
        f"| text-to-image: quadrant only | {faith['position_match']:.3f} | 0.25 | |",
        f"| text-to-image: size only | {faith['size_match']:.3f} | 0.50 | |",
        *_before_grpo_lines(before),
        "",
        f"Text-to-image faithfulness: the model drew one image for each of {faith['n']} held-out generation prompts "
        "(\"... a small/large bright lesion in the upper left/...\"); `medmax.synthetic.locate_lesion` finds the "
        "brightest blob in the decoded pixels, its quadrant from its centroid and its size from its area. "
        f"{faith['no_lesion_found']} of the drawn images showed no lesion at all. The same detector reads the VQGAN's "
        f"reconstructions of those held-out scans right {faith['detector_on_reconstructions']:.3f} of the time "
        "(what the measure can see through the decoder). The prompts' words recur in training (there are only 8 "
        "lesion captions); their scans did not. `faithfulness.png` shows the first 16 drawings.",
        "",
        *_fid_lines(faith.get("fid")),
    ]
    lines += _ablation_lines(summary["image_ablation"])
    lines += ["", f"Image tokenizer: {images['tokenized']} images tokenized, {images['dicom_tokenized']} of them DICOM; "
              f"{len(images['failed'])} reported as unreadable and left out (never replaced):", ""]
    lines += [f"- `{e['img_path']}`: {e['reason']}" for e in images["failed"]] or ["- none"]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines += ["", "Artifacts in this folder:", ""] + [f"- `{v}` ({k.replace('_', ' ')})" for k, v in found.items()]
    lines += ["", f"`image_0.png` was drawn from the prompt \"{data['generation_prompt']}\": the model sampled its "
              "8x8 codes with classifier-free guidance and the VQGAN decoded them. That VQGAN was trained in step 2 for "
              f"{data['vqgan_steps']} steps ({times.get('2 vqgan', 0):.0f} s here); `reconstructions.png` shows scans (top) and what its codes keep of them "
              "(bottom).", "",
              f"Everything else the run wrote is under `{out}`: data/, tokens/, sequences/, train/, model/, eval/, generated/."]
    (report / "README.md").write_text("\n".join(lines) + "\n")
    return accuracy


@program("medmax-quickstart")
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.grpo_steps < 0:
        parser.error(f"--grpo-steps must be 0 (none) or more, got {args.grpo_steps}")
    sizes = REDUCED if args.reduced else FULL
    if args.max_steps:
        sizes = Sizes(**{**sizes.__dict__, "max_steps": args.max_steps})
    out = args.output.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = Steps(out)
    total = time.time()
    py = sys.executable

    data = steps.timed("1 data, tokenizer", _prepare, out, sizes, args.seed)
    steps.run("2 vqgan", [py, "-m", "tokenization.train_vqgan", *vqgan_args(data["train_images_csv"], out / "vqgan",
                                                                          sizes.vqgan_steps, args.seed)])
    steps.run("3 tokenize", [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                             "-m", "tokenization.image_tokenize", "--input", data["images_csv"],
                             "--output", out / "tokens", "--ckpt", out / "vqgan", "--batch-size", 32])
    for split in ("train", "heldout"):
        steps.run(f"4 sequences ({split})", [py, "-m", "tokenization.build_sequences", "--input", data[f"{split}_jsonl"],
                                              "--tokenizer", data["tokenizer"], "--output", out / "sequences" / split,
                                              "--image-tokens", out / "tokens", "--strict"])
    steps.run("5 train", ["bash", "finetune/launch.sh", "finetune/configs/quickstart.yaml",
                          f"output_dir={out / 'train'}", f"datasets=[{out / 'sequences' / 'train'}]",
                          f"validation={out / 'sequences' / 'heldout'}", f"tokenizer={data['tokenizer']}",
                          f"vqgan={out / 'vqgan'}", f"max_steps={sizes.max_steps}", f"seed={args.seed}"],
              env=dict(steps.env, NPROC_PER_NODE="1"))
    steps.run("5 export", [py, "-m", "finetune.export", "--checkpoint", out / "train", "--output", out / "model"])
    before = _grpo(steps, out, data, args) if args.grpo_steps else None
    steps.run("6 evaluate", [py, "-m", "eval.run", "--model", out / "model", "--data", data["eval_dir"],
                             "--output", out / "eval", "--tasks", "synthetic", "--prompt-style", "sft", "--batch-size", 32,
                             "--ablate-image"])
    steps.run("7 generate", [py, "-m", "medmax", "generate", "--model", out / "model", "--mode", "image",
                             "--prompt", data["generation_prompt"], "--output", out / "generated", "--seed", args.seed])
    faith = steps.timed("7 faithfulness", measure_faithfulness, out, data, args.seed)
    accuracy = steps.timed("8 report", write_report, out, data, steps.times, faith, before)
    print(f"\nquickstart finished in {time.time() - total:.0f} s; report: {out / 'report' / 'README.md'}")
    for kind, acc in accuracy.items():
        print(f"  held-out {kind:6s} accuracy {acc:.3f}   (chance {CHANCE[kind]:.2f}, target {TARGETS[kind]:.2f})")
    print(f"  text-to-image faithfulness {faith['match']:.3f} on {faith['n']} held-out prompts (chance {faith['chance']:.3f})"
          + (f"; {before['match']:.3f} before GRPO" if before else ""))
    return 0


def _grpo(steps: Steps, out: Path, data: dict, args) -> dict:
    """--grpo-steps: the supervised model's faithfulness, then GRPO on the training prompts; model/ becomes the
    GRPO model (sft_model/ keeps the supervised one). Returns the faithfulness before."""
    py = sys.executable
    before = steps.timed("5 faithfulness before GRPO", measure_faithfulness, out, data, args.seed, "model", "faithfulness_sft.png")
    steps.run("5 grpo", [py, "-m", "finetune.train", "--config", "finetune/configs/grpo_tiny_cpu.yaml", f"model={out / 'model'}",
                         f"datasets=[{data['train_jsonl']}]", f"output_dir={out / 'grpo'}", f"max_steps={args.grpo_steps}",
                         f"seed={args.seed}", "report_to=none", "disable_tqdm=true"])
    os.replace(out / "model", out / "sft_model")
    steps.run("5 grpo export", [py, "-m", "finetune.export", "--checkpoint", out / "grpo", "--output", out / "model"])
    return before


if __name__ == "__main__":
    sys.exit(main())
