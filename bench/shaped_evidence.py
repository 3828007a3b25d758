"""Evidence for non-square images (issue 26, part 2): synthetic 64x96 and 96x64 scans trained in the shaped layout.

Usage::

    nice -n 10 python bench/shaped_evidence.py --output runs/shaped_evidence          # the README's figures
    python bench/shaped_evidence.py --output runs/shaped_small --reduced              # a quick look

Every step calls the program a user would call, as a subprocess, and is skipped when its output exists
(rerun after a kill continues; delete the folder to start over):

    1. data       medmax.synthetic scans rendered at H x W = 64 x 96 (wide) and 96 x 64 (tall), half of each,
                  with the lesion task's text-to-image rows ("Generate a scan: A grey scan with a small bright
                  lesion in the upper left."); the quickstart's tiny tokenizer (medmax.presets)
    2. vqgan      python -m tokenization.train_vqgan (tiny preset, 64 px square crops; few steps: see FULL)
    3. tokenize   python -m tokenization.image_tokenize --aspect keep --resolution 80: a budget of 100 codes,
                  so both shapes keep their pixels exactly (8 x 12 and 12 x 8 codes)
    4. sequences  python -m tokenization.build_sequences --image-layout shaped (train, held-out)
    5. train      finetune/launch.sh finetune/configs/quickstart.yaml (the small model, from scratch), export
    6. measure    on held-out prompts, for each shape: images drawn with GenerationConfig(image_size=...) (what
                  `medmax generate --size HxW` sets), plain and SJD; the share with the requested shape, and
                  faithfulness (medmax.synthetic's locator on the drawn pixels: the lesion's quadrant and size,
                  chance 1/8); and which shapes the model picks when no size is given

Writes OUTPUT/summary.json and OUTPUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_evidence import _run  # noqa: E402  (bench scripts share their steps)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"64x96": (64, 96), "96x64": (96, 64)}  # H x W pixels
# Sized for a shared 2-core machine (load ~20 when the README's figures were made): ~15 minutes of training in all.
FULL = {"n_train": 600, "n_test": 48, "vqgan_steps": 300, "train_steps": 600}  # a quiet 2-core machine
REDUCED = {"n_train": 120, "n_test": 8, "vqgan_steps": 10, "train_steps": 20}


def data(out: Path, sizes: dict) -> dict:
    """Scans of both shapes, their rows and CSV, and the tokenizer; -> the held-out prompts with their targets."""
    from medmax.presets import build_tiny_tokenizer
    from medmax.synthetic import generation_prompt, make_scans
    from medmax.vocab import END_OF_TURN, IMAGE_PLACEHOLDER

    folder = out / "data"
    if (folder / "heldout.json").is_file():
        return json.loads((folder / "heldout.json").read_text())
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        (folder / f"{split}.jsonl").unlink(missing_ok=True)  # a run killed while writing them starts them over
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"))
    held, paths = {}, []
    for k, (name, shape) in enumerate(SHAPES.items()):
        for split, n, seed in (("train", sizes["n_train"] // 2, 10 + k), ("heldout", sizes["n_test"], 20 + k)):
            rows = []
            for scan in make_scans(n, seed=seed, size=shape):
                path = f"images/{split}_{name}_{scan.name}.png"
                scan.image.save(folder / path)
                paths.append(path)
                rows.append({"text": f"{generation_prompt(scan)}{END_OF_TURN}{IMAGE_PLACEHOLDER}", "image_path": path,
                             "task": "image_generation", "shape": name})
                if split == "heldout" and scan.lesion:
                    held.setdefault(name, []).append({"prompt": generation_prompt(scan), "target": [scan.position, scan.size]})
            with open(folder / f"{split}.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "images.csv").write_text("img_path\n" + "".join(f"{p}\n" for p in paths))
    (folder / "train_images.csv").write_text("img_path\n" + "".join(f"{p}\n" for p in paths if p.startswith("images/train")))
    (folder / "heldout.json").write_text(json.dumps(held))
    return held


def pipeline(out: Path, sizes: dict, log: dict) -> None:
    py, d = sys.executable, out / "data"
    if not (out / "vqgan" / "vqgan.yaml").is_file():
        _run("2 vqgan", [py, "-m", "tokenization.train_vqgan", "--input", d / "train_images.csv", "--output", out / "vqgan",
                         "--preset", "tiny", "--steps", sizes["vqgan_steps"], "--batch-size", 16, "--lr", 1e-3,
                         "--pixel-weight", "contrast", "--pixel-weight-alpha", 10, "--seed", 0, "--threads", 2,
                         "--eval-images", 32, "--eval-every", 0, "--no-tensorboard", "--no-progress"], log)
    if not (out / "tokens" / "manifest.json").is_file():
        _run("3 tokenize", [py, "-m", "tokenization.image_tokenize", "--input", d / "images.csv", "--output", out / "tokens",
                            "--ckpt", out / "vqgan", "--aspect", "keep", "--resolution", 80, "--workers", 0,
                            "--no-progress"], log)
    for split in ("train", "heldout"):
        if not (out / "sequences" / split / "manifest.json").is_file():
            _run(f"4 sequences {split}", [py, "-m", "tokenization.build_sequences", "--input", d / f"{split}.jsonl",
                                          "--tokenizer", d / "tokenizer.json", "--output", out / "sequences" / split,
                                          "--image-tokens", out / "tokens", "--image-layout", "shaped", "--strict",
                                          "--no-progress"], log)
    if not (out / "model" / "config.json").is_file():
        _run("5 train", ["bash", "finetune/launch.sh", "finetune/configs/quickstart.yaml", f"output_dir={out / 'train'}",
                         f"datasets=[{out / 'sequences' / 'train'}]", f"validation={out / 'sequences' / 'heldout'}",
                         f"tokenizer={d / 'tokenizer.json'}", f"vqgan={out / 'vqgan'}", f"max_steps={sizes['train_steps']}",
                         "eval_steps=100", "report_to=none", "disable_tqdm=true"], log,
             env={"NPROC_PER_NODE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        _run("5 export", [py, "-m", "finetune.export", "--checkpoint", out / "train", "--output", out / "model"], log)


def measure(out: Path, held: dict, log: dict) -> dict:
    """Per shape and decoding: requested-shape share and held-out faithfulness; and the shapes the model picks."""
    from medmax.generation import GenerationConfig, Generator
    from medmax.synthetic import faithfulness

    start = time.time()
    gen = Generator.from_dir(out / "model", device="cpu")
    result = {}
    for name, (h, w) in SHAPES.items():
        prompts = [[r["prompt"]] for r in held[name]]
        for decoding in ("plain", "sjd"):
            cfg = GenerationConfig(mode="image", image_size=(h, w), decoding=decoding, seed=0, batch_size=8)
            images = [o.images[0] for o in gen.generate(prompts, cfg)]
            right = sum(im.image.size == (w, h) and im.grid == (h // 8, w // 8) for im in images)
            faith = faithfulness([im.image for im in images], [tuple(r["target"]) for r in held[name]])
            faith.pop("found")
            result[f"{name}/{decoding}"] = {"requested_shape": right / len(images), "n": len(images), **faith}
    picks = {}
    prompts = [[r["prompt"]] for rows in held.values() for r in rows[:8]]
    for o in gen.generate(prompts, GenerationConfig(mode="image", image_layout="shaped", seed=0, batch_size=8,
                                                    decode_images=False)):
        key = "x".join(str(8 * s) for s in o.images[0].grid)
        picks[key] = picks.get(key, 0) + 1
    result["model_picks"] = picks
    log["6 measure"] = {"command": "in-process: medmax.generation.Generator (see measure())", "seconds": round(time.time() - start, 1)}
    return result


def report(out: Path, sizes: dict, result: dict, log: dict) -> None:
    (out / "summary.json").write_text(json.dumps({"sizes": sizes, "result": result, "steps": log}, indent=2))
    lines = ["| shape (H x W px) | decoding | requested shape | faithfulness (quadrant + size) | quadrant | size | n |",
             "|---|---|---|---|---|---|---|"]
    for key, r in result.items():
        if key == "model_picks":
            continue
        shape, decoding = key.split("/")
        lines.append(f"| {shape} | {decoding} | {r['requested_shape']:.2f} | {r['match']:.3f} (chance {r['chance']:.3f}) | "
                     f"{r['position_match']:.3f} | {r['size_match']:.3f} | {r['n']} |")
    lines.append(f"\nshapes the model picks without --size (H x W px: count): {result['model_picks']}")
    lines.append("\n" + "\n".join(f"- {k}: `{v['command']}` ({v['seconds']} s)" for k, v in log.items()))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/shaped_evidence"))
    p.add_argument("--reduced", action="store_true")
    p.add_argument("--train-steps", type=int, help="override the training steps")
    args = p.parse_args()
    sizes = dict(REDUCED if args.reduced else FULL)
    if args.train_steps:
        sizes["train_steps"] = args.train_steps
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = json.loads((out / "steps.json").read_text()) if (out / "steps.json").is_file() else {}
    held = data(out, sizes)
    pipeline(out, sizes, log)
    (out / "steps.json").write_text(json.dumps(log, indent=2))
    report(out, sizes, measure(out, held, log), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
