"""Evidence for volumes: does a model trained on tokenized CT volumes use the volume, or one slice of it?

Usage::

    nice -n 10 python bench/volume_evidence.py --output runs/volume_evidence            # the README's figures
    python bench/volume_evidence.py --output runs/volume_small --reduced                # a quick check

Every step calls the program a user would call, as a subprocess, and is skipped when its output exists, so a
rerun after a kill continues (image_tokenize and build_sequences resume on their own; delete the folder to
start over):

    1. data       medmax.synthetic_volumes.write_volume_dataset: synthetic CT volumes (24 x 48 x 48, 6 mm slices),
                  two thirds with a bright lesion spanning a slab of slices in one third (lower, middle, upper) and
                  on one side (the patient's left or right); NIfTI files in four orientations (LPS, RAS, PSR, LPI)
                  and every tenth a DICOM series; questions: is there a lesion, in which third, on which side
    2. vqgan      python -m tokenization.train_vqgan on abdomen-windowed training slices (tiny, 64 px)
    3. tokenize   python -m tokenization.image_tokenize --volume-column volume --slices 6 --slice-resolution 32
                  --window abdomen
    4. sequences  python -m tokenization.build_sequences (MultiMeditron-style rows with image_3d modalities)
    5. train      finetune/launch.sh finetune/configs/quickstart.yaml (a small Chameleon from scratch), export
    6. measure    on held-out volumes only, greedy answers of the exported model (medmax.generation), asked
                  (a) with the 6-slice volume as trained and (b) with one slice of it drawn at random (the same
                  header layout, one slice): accuracy per question type against chance

Writes OUTPUT/summary.json and OUTPUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_evidence import _run  # noqa: E402  (bench scripts share their steps)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLICES, SLICE_RESOLUTION, WINDOW = 6, 32, "abdomen"  # 6 slices of 4 x 4 codes: about 150 tokens a volume
# Sized for a quiet 2-core machine (the VQGAN encoder is most of the tokenizing time).
FULL = {"n_train": 600, "n_test": 90, "vqgan_seconds": 120, "steps": 600}
REDUCED = {"n_train": 120, "n_test": 30, "vqgan_seconds": 20, "steps": 60}


DATA_FILES = ("volumes.csv", "train_images.csv", "train.jsonl", "heldout.jsonl", "heldout_rows.jsonl")


def prepare(out: Path, sizes: dict, seed: int) -> dict:
    """Step 1 (library calls): the volumes, their questions and the tokenizer (kept when already written)."""
    from medmax.presets import build_tiny_tokenizer
    from medmax.synthetic_volumes import write_volume_dataset

    data = {name: out / "data" / name for name in DATA_FILES}
    data["tokenizer"] = out / "tokenizer.json"
    if all(path.is_file() for path in data.values()):
        return data
    data.update(write_volume_dataset(out / "data", sizes["n_train"], sizes["n_test"], seed=seed))
    rows = [json.loads(line) for line in data["heldout.jsonl"].read_text().splitlines()]
    data["heldout_rows.jsonl"].write_text("".join(json.dumps({
        "conversations": [{"role": "user", "content": "<image>" + r["question"]}, {"role": "assistant", "content": r["answer"]}],
        "modalities": [{"type": "image_3d", "value": r["volume"]}]}) + "\n" for r in rows))
    build_tiny_tokenizer().save(str(data["tokenizer"]))
    return data


def pipeline(out: Path, data: dict, sizes: dict, seed: int, log: dict) -> None:
    """Steps 2 to 5, each the program a user would run."""
    py = sys.executable
    if not (out / "vqgan" / "vqgan.yaml").is_file():  # (vqgan_train/ is kept: a copy there skips the training)
        _vqgan(out, data, sizes, seed, log)
    _run("3 tokenize", [py, "-m", "tokenization.image_tokenize", "--input", data["volumes.csv"], "--output", out / "tokens",
                        "--ckpt", out / "vqgan", "--volume-column", "volume", "--slices", SLICES, "--window", WINDOW,
                        "--slice-resolution", SLICE_RESOLUTION, "--partition-size", 50, "--workers", 0, "--strict", "--no-progress"], log)
    for split, rows in (("train", data["train.jsonl"]), ("heldout", data["heldout_rows.jsonl"])):
        _run(f"4 sequences ({split})", [py, "-m", "tokenization.build_sequences", "--input", rows, "--tokenizer", data["tokenizer"],
                                         "--output", out / "sequences" / split, "--image-tokens", out / "tokens", "--strict",
                                         "--no-progress"], log)
    if not (out / "model" / "config.json").is_file():
        _train(out, data, sizes, seed, log)


def _vqgan(out: Path, data: dict, sizes: dict, seed: int, log: dict) -> None:
    """The tiny VQGAN (64 px), then set to take SLICE_RESOLUTION px: it is fully convolutional, its ``resolution``
    is only the input side, so generation's prompt encoder sizes the slices as the tokenizer did."""
    import yaml

    py = sys.executable
    _run("2 vqgan", [py, "-m", "tokenization.train_vqgan", "--input", data["train_images.csv"], "--output", out / "vqgan_train",
                     "--preset", "tiny", "--steps", 300, "--batch-size", 16, "--lr", 5e-4, "--pixel-weight", "contrast",
                     "--pixel-weight-alpha", 10, "--seed", seed, "--max-seconds", sizes["vqgan_seconds"], "--threads", 2], log)
    (out / "vqgan").mkdir(exist_ok=True)
    doc = yaml.safe_load((out / "vqgan_train" / "vqgan.yaml").read_text())
    doc["model"]["params"]["ddconfig"]["resolution"] = SLICE_RESOLUTION
    (out / "vqgan" / "vqgan.safetensors").write_bytes((out / "vqgan_train" / "vqgan.safetensors").read_bytes())
    (out / "vqgan" / "vqgan.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _train(out: Path, data: dict, sizes: dict, seed: int, log: dict) -> None:
    _run("5 train", ["bash", "finetune/launch.sh", "finetune/configs/quickstart.yaml", f"output_dir={out / 'train'}",
                     f"datasets=[{out / 'sequences' / 'train'}]", f"validation={out / 'sequences' / 'heldout'}",
                     f"tokenizer={data['tokenizer']}", f"vqgan={out / 'vqgan'}", f"max_steps={sizes['steps']}", f"seed={seed}",
                     "max_length=256", f"eval_steps={sizes['steps']}", f"save_steps={sizes['steps']}",
                     *([f"max_seconds={sizes['train_seconds']}"] if sizes.get("train_seconds") else [])], log,
         env={"NPROC_PER_NODE": "1", "PYTHON": sys.executable})
    _run("5 export", [sys.executable, "-m", "finetune.export", "--checkpoint", out / "train", "--output", out / "model"], log)


def _score(output: str, answer: str, words: tuple[str, ...]) -> bool:
    """The first of the question's answer words in the output is the gold one."""
    from eval.scoring import tokens

    said = [w for w in tokens(output) if w in words]
    return bool(said) and said[0] == answer


def _one_slice(volume, rng):
    """The same volume reduced to one of its slices, drawn at random, in the same layout (a 1-slice header)."""
    from types import SimpleNamespace

    from medmax.data.rows import volume_header
    from medmax.prompting import VolumeInput

    j = int(rng.integers(len(volume.slices)))
    modality = {"CT": "CT", "MRI": "MR"}.get(volume.header.split(",")[0])  # the whole volume's header names it so
    header = volume_header(SimpleNamespace(slice_indices=[volume.slice_indices[j]], positions_mm=[0.0], geometry={"modality": modality}))
    return VolumeInput(volume.path, header, (volume.slices[j],), (volume.slice_indices[j],), volume.window)


def measure(out: Path, data: dict, seed: int) -> dict:
    """Held-out accuracy per question type, with the whole volume and with one random slice."""
    import numpy as np

    from medmax.generation import END_OF_TURN, GenerationConfig, Generator
    from medmax.prompting import load_volume_input
    from medmax.synthetic_volumes import QUESTIONS

    rows = [json.loads(line) for line in data["heldout.jsonl"].read_text().splitlines()]
    generator = Generator.from_dir(out / "model", device="cpu")
    config = GenerationConfig(mode="text", max_new_tokens=3, do_sample=False, seed=seed)
    rng = np.random.default_rng(seed)
    volumes = {r["volume"]: load_volume_input(out / "data" / r["volume"], None, str(SLICES), WINDOW) for r in rows}
    results = {}
    for condition in ("volume", "one_slice"):
        inputs = [volumes[r["volume"]] if condition == "volume" else _one_slice(volumes[r["volume"]], rng) for r in rows]
        prompts = [[v, r["question"], END_OF_TURN] for v, r in zip(inputs, rows)]
        outputs = [o.text for i in range(0, len(prompts), 16) for o in generator.generate(prompts[i:i + 16], config)]
        for kind in QUESTIONS:
            hits = [_score(o, r["answer"], QUESTIONS[kind][1]) for o, r in zip(outputs, rows) if r["type"] == kind]
            results.setdefault(kind, {"n": len(hits)})[condition] = round(float(np.mean(hits)), 3)
    for kind, entry in results.items():
        answers = [r["answer"] for r in rows if r["type"] == kind]
        entry["chance"] = round(max(answers.count(a) for a in set(answers)) / len(answers), 3)  # the majority answer's rate
    return results


def write_summary(out: Path, results: dict, log: dict, sizes: dict) -> None:
    (out / "summary.json").write_text(json.dumps({"results": results, "sizes": sizes, "steps": log}, indent=2) + "\n")
    lines = ["| question | held-out n | whole volume (6 slices) | one random slice | chance (majority answer) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {e['n']} | {e['volume']:.3f} | {e['one_slice']:.3f} | {e['chance']:.3f} |" for k, e in results.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--reduced", action="store_true", help="a small run (a quick check, not the README's figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-seconds", type=float, help="bound training's wall time (finetune's max_seconds; a checkpoint is saved there)")
    args = p.parse_args(argv)
    sizes = {**(REDUCED if args.reduced else FULL), "train_seconds": args.train_seconds}
    out = args.output.resolve()
    log: dict = {}
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, sizes, args.seed)
    pipeline(out, data, sizes, args.seed, log)
    results = measure(out, data, args.seed)
    log["total_seconds"] = round(time.time() - start, 1)
    write_summary(out, results, log, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
