"""Evidence for image-conditioned generation (issue 26, part 1): editing and modality translation on synthetic scans.

Usage::

    nice -n 10 python bench/edit_evidence.py --output runs/edit_evidence             # the README's figures
    python bench/edit_evidence.py --output runs/edit_small --reduced                 # a quick look

Four edit kinds (``medmax.synthetic_edits``): remove the lesion, move it to the lower left, make it larger,
and a modality translation to the inverted contrast. Every step calls the program a user would call, as a
subprocess, and is skipped when its output exists (rerun after a kill continues; delete the folder to start over):

    1. data        edit pairs (input scan, instruction, target scan), training and held-out, as MedMax rows
                   ``<image>instruction<reserved08706><image>`` (loss on the target image only)
    2. vqgan       python -m tokenization.train_vqgan on the training inputs and targets (the quickstart's settings)
    3. tokenize    python -m torch.distributed.run --nproc-per-node 1 -m tokenization.image_tokenize
    4. sequences   python -m tokenization.build_sequences
    5. train       python -m finetune.train --config finetune/configs/quickstart.yaml (a small model from scratch),
                   python -m finetune.export
    6. measure     python -m eval.run --tasks image_editing on the held-out pairs: per edit kind, the share of
                   outputs the lesion locator judges a success, against the no-change baseline (the input
                   returned), chance (another held-out pair's target: a right-looking image that ignores its
                   input) and the ceiling (the target through the VQGAN); PSNR / SSIM against the target

Writes OUTPUT/summary.json and OUTPUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dpo_evidence import _run, write_summary  # noqa: E402  (one way to run a step as a subprocess and log its command and time)

# FULL is sized for a quiet 2-core machine (the quickstart VQGAN's 300 steps; training bounded at 20 minutes)
FULL = {"train_per_kind": 600, "test_per_kind": 25, "vqgan_steps": 300, "vqgan_lr": 1e-3, "train_steps": 1500, "train_seconds": 1200}
REDUCED = {"train_per_kind": 60, "test_per_kind": 5, "vqgan_steps": 30, "vqgan_lr": 1e-3, "train_steps": 20, "train_seconds": 120}


def _csv(path: Path, rel: list[str]) -> None:
    path.write_text("img_path\n" + "".join(f"{p}\n" for p in rel))


def write_data(folder: Path, sizes: dict, seed: int) -> None:
    """Training and held-out edit pairs: images, MedMax rows, CSVs, and the held-out pairs' ground truth."""
    from medmax.jsonl import write_jsonl
    from medmax.presets import build_tiny_tokenizer
    from medmax.synthetic_edits import make_edit_pairs
    from medmax.vocab import END_OF_TURN, IMAGE_PLACEHOLDER

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "eval" / "images").mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"))
    splits = {"train": make_edit_pairs(sizes["train_per_kind"], seed=seed),
              "heldout": make_edit_pairs(sizes["test_per_kind"], seed=seed + 1000)}
    every = []
    for split, pairs in splits.items():
        if split == "train" and (folder / "train.jsonl").is_file():
            continue  # written by an earlier (interrupted) run: the same seed draws the same pairs
        rows, paths = [], []
        for p in pairs:
            src, tgt = f"images/{p.name}_in.png", f"images/{p.name}_out.png"
            p.source.save(folder / src), p.target.save(folder / tgt)
            paths += [src, tgt]
            rows.append({"text": f"{IMAGE_PLACEHOLDER}{p.instruction}{END_OF_TURN}{IMAGE_PLACEHOLDER}",
                         "image_path": [src, tgt], "task": f"edit_{p.kind}", "source": "synthetic_edits"})
            if split == "heldout":  # MedMax's eval schema, the image_editing kind (eval/editing.py)
                p.source.save(folder / "eval" / src), p.target.save(folder / "eval" / tgt)
                every.append({"task_name": "synthetic_edit", "question_type": "image_editing", "prompt": p.instruction,
                              "answer": tgt, "image_path": src,
                              "edit": {"kind": p.kind, "position": p.position, "size": p.size}})
        write_jsonl(folder / f"{split}.jsonl", rows, sort_keys=False)
        _csv(folder / f"{split}_images.csv", paths)
    write_jsonl(folder / "eval" / "edits.jsonl", every, sort_keys=False)


def build(out: Path, sizes: dict, seed: int, log: dict) -> None:
    data, py = out / "data", sys.executable
    if not (data / "eval" / "edits.jsonl").is_file():
        write_data(data, sizes, seed)
    if not (out / "vqgan" / "vqgan.yaml").is_file():
        _run("2 vqgan", [py, "-m", "tokenization.train_vqgan", "--input", data / "train_images.csv", "--output", out / "vqgan",
                         "--preset", "tiny", "--steps", sizes["vqgan_steps"], "--batch-size", 16, "--lr", sizes["vqgan_lr"],
                         "--pixel-weight", "contrast", "--pixel-weight-alpha", 10, "--seed", seed, "--threads", 2,
                         "--eval-images", 32, "--eval-every", 0, "--no-tensorboard", "--no-progress"], log)
    for split in ("train", "heldout"):
        tokens = out / "tokens" / split
        if not (tokens / "manifest.json").is_file():
            _run(f"3 tokenize {split}", [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
                                         "tokenization.image_tokenize", "--input", data / f"{split}_images.csv",
                                         "--output", tokens, "--ckpt", out / "vqgan", "--batch-size", 32, "--no-progress"], log)
        if not (out / "sequences" / split / "manifest.json").is_file():
            _run(f"4 sequences {split}", [py, "-m", "tokenization.build_sequences", "--input", data / f"{split}.jsonl",
                                          "--tokenizer", data / "tokenizer.json", "--output", out / "sequences" / split,
                                          "--image-tokens", tokens, "--strict"], log)


def train(out: Path, sizes: dict, seed: int, log: dict) -> None:
    if (out / "model" / "config.json").is_file():
        return
    py = sys.executable
    _run("5 train", [py, "-m", "finetune.train", "--config", "finetune/configs/quickstart.yaml",
                     f"output_dir={out / 'train'}", f"datasets=[{out / 'sequences' / 'train'}]", "validation=null",
                     "eval_strategy=no", f"tokenizer={out / 'data' / 'tokenizer.json'}", f"vqgan={out / 'vqgan'}",
                     f"max_steps={sizes['train_steps']}", f"max_seconds={sizes['train_seconds']}", f"seed={seed}",
                     "report_to=none", "disable_tqdm=true", "save_steps=100000"], log)
    _run("5 export", [py, "-m", "finetune.export", "--checkpoint", out / "train", "--output", out / "model"], log)


def measure(out: Path, log: dict) -> dict:
    folder = out / "eval"
    if not (folder / "results.json").is_file():
        _run("6 eval", [sys.executable, "-m", "eval.run", "--model", out / "model", "--data", out / "data" / "eval",
                        "--output", folder, "--tasks", "synthetic_edit", "--batch-size", 16, "--overwrite"], log)
    results = json.loads((folder / "results.json").read_text())["synthetic_edit"]
    rows = [json.loads(line) for line in (folder / "predictions" / "synthetic_edit.jsonl").read_text().splitlines()]
    return {"eval": results, "baselines": baselines(out, rows)}


def baselines(out: Path, rows: list[dict]) -> dict:
    """Per edit kind: chance (each row judged on the next held-out row's target of the same kind: a right-looking
    image that ignores its input) and the ceiling (the row's own target through the VQGAN, the best the codes allow)."""
    import torch
    from PIL import Image

    from medmax.images import preprocess
    from medmax.synthetic_edits import edit_success
    from medmax.vqgan import load_vqgan, to_uint8

    edits = [json.loads(line) for line in (out / "data" / "eval" / "edits.jsonl").read_text().splitlines()]
    vqgan = load_vqgan(out / "vqgan").eval()
    targets = [Image.open(out / "data" / "eval" / e["answer"]).convert("RGB") for e in edits]
    with torch.no_grad():
        codes = vqgan.encode_codes(torch.stack([preprocess(t, vqgan.resolution) for t in targets]))
        through = [Image.fromarray(a.numpy()) for a in to_uint8(vqgan.decode_codes(codes))]
    result = {}
    for kind in sorted({e["edit"]["kind"] for e in edits}):
        idx = [i for i, e in enumerate(edits) if e["edit"]["kind"] == kind]
        judge = lambda i, image: edit_success(kind, edits[i]["edit"]["position"], edits[i]["edit"]["size"], image)  # noqa: E731
        result[kind] = {"n": len(idx),
                        "chance": sum(judge(i, targets[idx[(k + 1) % len(idx)]]) for k, i in enumerate(idx)) / len(idx),
                        "ceiling": sum(judge(i, through[i]) for i in idx) / len(idx),
                        **_closeness(rows, kind, [targets[i] for i in idx], vqgan.resolution)}
    return result


def _closeness(rows: list[dict], kind: str, targets: list, size: int) -> dict:
    """Mean PSNR / SSIM against the target: the model's, the no-change baseline's, and another held-out target's of
    the same kind (right-looking but not this input's scan: what an edit that ignored its input would score)."""
    from eval.editing import _fit, psnr, ssim

    mine = [r for r in rows if r.get("edit_kind") == kind]
    fitted = [_fit(t, size) for t in targets]
    other = [(fitted[(k + 1) % len(fitted)], t) for k, t in enumerate(fitted)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"psnr": mean([r["psnr"] for r in mine]), "no_change_psnr": mean([r["no_change_psnr"] for r in mine]),
            "other_target_psnr": mean([psnr(a, b) for a, b in other]),
            "ssim": mean([r["ssim"] for r in mine]), "no_change_ssim": mean([r["no_change_ssim"] for r in mine]),
            "other_target_ssim": mean([ssim(a, b) for a, b in other])}


def markdown(summary: dict) -> str:
    by_kind, base = summary["eval"].get("edit_success_by_kind", {}), summary["baselines"]
    lines = ["| edit (held-out) | n | model | no-change | chance | ceiling (target via VQGAN) | PSNR: model / no-change / "
             "another target | SSIM: model / no-change / another target |", "|---|---|---|---|---|---|---|---|"]
    for kind, s in by_kind.items():
        b = base[kind]
        lines.append(f"| {kind} | {s['n']} | {s['success']:.3f} | {s['no_change']:.3f} | {b['chance']:.3f} | "
                     f"{b['ceiling']:.3f} | {b['psnr']:.2f} / {b['no_change_psnr']:.2f} / {b['other_target_psnr']:.2f} | "
                     f"{b['ssim']:.3f} / {b['no_change_ssim']:.3f} / {b['other_target_ssim']:.3f} |")
    m, nc = summary["eval"]["metrics"], summary["eval"]["no_change"]
    lines.append(f"\nPSNR {m['psnr']['score']:.2f} dB (no-change {nc['psnr']:.2f}), SSIM {m['ssim']['score']:.3f} "
                 f"(no-change {nc['ssim']:.3f}) against the targets.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="edit_evidence", description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/edit_evidence"))
    p.add_argument("--reduced", action="store_true", help="a few pairs and steps (a quick look, not evidence)")
    p.add_argument("--train-steps", type=int, help="override the training steps")
    p.add_argument("--train-seconds", type=float, help="override the training's wall-time bound (max_seconds)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = dict(REDUCED if args.reduced else FULL)
    if args.train_steps:
        sizes["train_steps"] = args.train_steps
    if args.train_seconds:
        sizes["train_seconds"] = args.train_seconds
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {}
    build(out, sizes, args.seed, log)
    train(out, sizes, args.seed, log)
    summary = {"sizes": sizes, **measure(out, log), "steps": log}
    return write_summary(out, summary, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
