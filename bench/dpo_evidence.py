"""Evidence for mode: dpo on the quickstart's synthetic lesion scans: before / after figures on held-out scans.

Usage::

    nice -n 10 python bench/dpo_evidence.py --output runs/dpo_evidence             # the README's figures
    python bench/dpo_evidence.py --output runs/dpo_small --reduced                 # what the slow test runs

Every step calls the program a user would call, as a subprocess, and is skipped when its output exists
(rerun after a kill continues; delete the folder to start over):

    1. sft        python -m quickstart --max-steps 60 (--reduced: 30): data, VQGAN, tokens, sequences, a *briefly*
                  supervised small model (deliberately under-trained), exported, evaluated
    2. pairs      python -m finetune.make_preferences on the training rows (lesion boxes from the pixels,
                  medmax.synthetic.lesion_box) and on the held-out rows: hallucination pairs (the model's wrong
                  answer or a swapped one), noise pairs (the model's answer with the lesion noised), image
                  pairs (the scan against its mirror image: the lesion in another quadrant);
                  python -m tokenization.build_preferences on each
    3. dpo        python -m finetune.train --config finetune/configs/dpo_cpu.yaml (full weights, frozen
                  reference, sigmoid + weights + RPO), then python -m finetune.export
    4. measure    for the SFT model and the DPO model, on held-out scans only: python -m eval.run (closed,
                  MCQ, open accuracy; how often a lesion-free scan is answered "yes"), preference accuracy on the
                  held-out pairs (text and image separately), text-to-image faithfulness on held-out prompts

Writes OUTPUT/summary.json and OUTPUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = re.compile(r"with a (small|large) bright lesion in the (upper left|upper right|lower left|lower right)\.")
# the quickstart's full data (1500 training scans, 200 held-out) or its reduced one (300, 60); pairs are curated
# from the first `pair_rows` training rows (the file is shuffled). Sized for a shared 2-core machine.
FULL = {"quickstart": [], "sft_steps": 60, "pair_rows": 800, "dpo_steps": 150, "faithfulness_prompts": 32}
REDUCED = {"quickstart": ["--reduced"], "sft_steps": 30, "pair_rows": 300, "dpo_steps": 40, "faithfulness_prompts": 8}


def _run(name: str, cmd: list, log: dict, env: dict | None = None) -> None:
    """Run one step as a subprocess from the repository root (``env``: extra variables), logging its command and time."""
    cmd = [str(c) for c in cmd]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    env.setdefault("OMP_NUM_THREADS", "2")
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    log[name] = {"command": " ".join(cmd), "seconds": round(time.time() - start, 1)}


def _with_boxes(src: Path, dst: Path, image_root: Path, limit: int | None) -> None:
    """The rows of ``src`` with ``lesion_box`` from each scan's pixels (the region noising covers); generation rows
    of lesion-free scans are left out (their mirror image shows the same)."""
    from PIL import Image

    from medmax.synthetic import lesion_box

    with open(src) as f, open(dst, "w") as out:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                break
            row = json.loads(line)
            if row.get("task") == "image_generation" and "bright lesion" not in row["text"]:
                continue  # a lesion-free scan and its mirror image say the same: no preference to learn
            box = lesion_box(Image.open(image_root / row["image_path"]))
            if box is not None:
                row["lesion_box"] = box
            out.write(json.dumps(row) + "\n")


def sft(out: Path, sizes: dict, log: dict) -> None:
    if not (out / "qs" / "model" / "config.json").is_file():
        _run("1 sft (quickstart)", [sys.executable, "-m", "quickstart", *sizes["quickstart"], "--nproc", "1",
                                     "--output", out / "qs", "--max-steps", sizes["sft_steps"]], log)


def pairs(out: Path, sizes: dict, log: dict) -> None:
    data, py = out / "qs" / "data", sys.executable
    (out / "prefs").mkdir(exist_ok=True)
    for split, rows in (("train", "train.jsonl"), ("heldout", "heldout.jsonl")):
        if (out / "prefs" / split / "manifest.json").is_file():
            continue
        boxed = out / "prefs" / f"{split}_input.jsonl"
        _with_boxes(data / rows, boxed, data, sizes["pair_rows"] if split == "train" else None)
        _run(f"2 make_preferences {split}", [py, "-m", "finetune.make_preferences", "--model", out / "qs" / "model",
                                             "--input", boxed, "--image-root", data, "--image-pairs", "mirror",
                                             "--output", out / "prefs" / f"{split}_rows.jsonl", "--overwrite",
                                             "--batch-size", 32], log)
        _run(f"2 build_preferences {split}", [py, "-m", "tokenization.build_preferences", "--input",
                                              out / "prefs" / f"{split}_rows.jsonl", "--tokenizer", out / "qs" / "model",
                                              "--output", out / "prefs" / split, "--max-length", 512, "--no-progress"],
             log)


def dpo(out: Path, sizes: dict, log: dict) -> None:
    if (out / "dpo_model" / "config.json").is_file():
        return
    py = sys.executable
    _run("3 dpo", [py, "-m", "finetune.train", "--config", "finetune/configs/dpo_cpu.yaml", f"model={out / 'qs' / 'model'}",
                   f"datasets=[{out / 'prefs' / 'train'}]", f"output_dir={out / 'dpo'}", f"max_steps={sizes['dpo_steps']}",
                   "report_to=none", "disable_tqdm=true"], log)
    _run("3 export", [py, "-m", "finetune.export", "--checkpoint", out / "dpo", "--output", out / "dpo_model"], log)


# ------------------------------------------------------------------------------ measurements
def evaluate(out: Path, name: str, model: Path, log: dict) -> dict:
    folder = out / f"eval_{name}"
    if not (folder / "results.json").is_file():
        _run(f"4 eval {name}", [sys.executable, "-m", "eval.run", "--model", model, "--data", out / "qs" / "data" / "eval",
                                "--output", folder, "--tasks", "synthetic", "--prompt-style", "sft", "--batch-size", 32,
                                "--overwrite"], log)
    results = json.loads((folder / "results.json").read_text())
    scores = {k: results[f"synthetic_{k}"]["score"] for k in ("closed", "mcq", "open") if f"synthetic_{k}" in results}
    closed = [json.loads(line) for line in (folder / "predictions" / "synthetic_closed.jsonl").read_text().splitlines()]
    free = [r for r in closed if str(r["answer"]).strip().lower() == "no"]
    says_yes = [str(r.get("output") or "").strip().lower().startswith("yes") for r in free]
    scores["lesion_free_answered_yes"] = sum(says_yes) / max(len(free), 1)
    scores["n_closed"], scores["n_lesion_free"] = len(closed), len(free)
    return scores


def preference_accuracy(policy_dir: Path, reference_dir: Path, folder: Path) -> dict:
    """Held-out pairs: the share the model itself prefers (log p chosen > log p rejected) and, against the SFT
    reference, the DPO reward accuracy (margin > 0), for text and image continuations apart."""
    import numpy as np
    import torch

    from medmax.dpo import sequence_logps
    from medmax.model import MedMaxChameleon
    from medmax.data.preference_loader import PreferenceCollator, load_preferences
    from medmax.vocab import Vocabulary, load_tokenizer

    data = load_preferences(folder)
    collate = PreferenceCollator(Vocabulary.from_tokenizer(load_tokenizer(policy_dir)).pad_id)
    sums = {}
    for name, path in (("policy", policy_dir), ("reference", reference_dir)):
        model = MedMaxChameleon.from_pretrained(path).eval()
        chosen, rejected = [], []
        with torch.no_grad():
            for start in range(0, len(data), 16):
                batch = collate([data.pair(i) for i in range(start, min(start + 16, len(data)))])
                logps, _ = sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
                c, r = logps.sum(-1).chunk(2)
                chosen.append(c), rejected.append(r)
        sums[name] = (torch.cat(chosen).numpy(), torch.cat(rejected).numpy())
    (pc, pr), (rc, rr) = sums["policy"], sums["reference"]
    result = {}
    for kind in ("text", "image"):
        sel = data.formats == kind
        if sel.any():
            result[kind] = {"n": int(sel.sum()), "model_prefers_chosen": float(np.mean(pc[sel] > pr[sel])),
                            "reward_accuracy": float(np.mean((pc - rc)[sel] > (pr - rr)[sel]))}
    return result


def faithfulness(model: Path, data: Path, n: int, seed: int = 0) -> dict:
    """Share of images drawn for held-out prompts whose lesion lies in the requested quadrant (and size)."""
    from medmax.generation import GenerationConfig, Generator
    from medmax.prompting import prompt_segments
    from medmax.synthetic import faithfulness as score

    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    prompts = [r["text"].split("<reserved08706>")[0] for r in rows if r.get("task") == "image_generation"]
    found = [(p, TARGET.search(p)) for p in prompts]
    prompts, targets = [p for p, m in found if m][:n], [(m[2], m[1]) for _, m in found if m][:n]
    gen = Generator.from_dir(model, device="cpu")
    drawn = gen.generate([prompt_segments(p, [], end_of_turn=True) for p in prompts],
                         GenerationConfig(mode="image", seed=seed, batch_size=16))
    result = score([o.images[0].image for o in drawn], targets)
    return {k: result[k] for k in ("n", "match", "position_match", "size_match", "no_lesion_found", "chance")}


def measure(out: Path, sizes: dict, log: dict) -> dict:
    sft_model, dpo_model = out / "qs" / "model", out / "dpo_model"
    summary = {}
    for name, model in (("sft", sft_model), ("dpo", dpo_model)):
        summary[name] = {
            "eval": evaluate(out, name, model, log),
            "heldout_preferences": preference_accuracy(model, sft_model, out / "prefs" / "heldout"),
            "faithfulness": faithfulness(model, out / "qs" / "data", sizes["faithfulness_prompts"]),
        }
    return summary


def _markdown(summary: dict) -> str:
    rows = [("closed accuracy", "eval", "closed"), ("MCQ accuracy", "eval", "mcq"), ("open accuracy", "eval", "open"),
            ("lesion-free scans answered 'yes'", "eval", "lesion_free_answered_yes")]
    lines = ["| held-out measure | SFT (before) | DPO (after) |", "|---|---|---|"]
    for label, group, key in rows:
        lines.append(f"| {label} | {summary['sft'][group].get(key, float('nan')):.3f} | {summary['dpo'][group].get(key, float('nan')):.3f} |")
    for kind in ("text", "image"):
        before, after = (summary[m]["heldout_preferences"].get(kind) for m in ("sft", "dpo"))
        if before:
            lines.append(f"| {kind} pairs ({before['n']}): model prefers chosen | {before['model_prefers_chosen']:.3f} | "
                         f"{after['model_prefers_chosen']:.3f} |")
            lines.append(f"| {kind} pairs: DPO reward accuracy vs SFT reference | - | {after['reward_accuracy']:.3f} |")
    for key in ("match", "position_match"):
        lines.append(f"| faithfulness {key} ({summary['sft']['faithfulness']['n']} prompts) | "
                     f"{summary['sft']['faithfulness'][key]:.3f} | {summary['dpo']['faithfulness'][key]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dpo_evidence", description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/dpo_evidence"))
    p.add_argument("--reduced", action="store_true", help="fewer steps and prompts (the slow test's run)")
    p.add_argument("--dpo-steps", type=int, help="override the DPO steps")
    p.add_argument("--faithfulness-prompts", type=int, help="override how many held-out prompts are drawn")
    args = p.parse_args(argv)
    sizes = dict(REDUCED if args.reduced else FULL)
    if args.dpo_steps:
        sizes["dpo_steps"] = args.dpo_steps
    if args.faithfulness_prompts:
        sizes["faithfulness_prompts"] = args.faithfulness_prompts
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {}
    sft(out, sizes, log)
    pairs(out, sizes, log)
    dpo(out, sizes, log)
    summary = {"sizes": sizes, **measure(out, sizes, log), "steps": log,
               "pairs": {s: json.loads((out / "prefs" / f"{s}_rows.jsonl.summary.json").read_text())["by_kind"]
                         for s in ("train", "heldout")}}
    return write_summary(out, summary, _markdown)


def write_summary(out: Path, summary: dict, markdown) -> int:
    """``summary.json`` and ``summary.md`` (``markdown(summary)``, also printed) in ``out``; the exit code 0."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
