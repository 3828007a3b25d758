"""Evidence for mode: grpo on the quickstart's synthetic lesion scans: before / after figures on held-out prompts.

Usage::

    nice -n 5 python bench/grpo_evidence.py --output runs/grpo_evidence --seconds 900        # the README's figures
    python bench/grpo_evidence.py --output runs/grpo_small --reduced                        # what the slow test runs

Every step calls the program a user would call, as a subprocess, and is skipped when its output exists
(rerun after a kill continues; delete the folder to start over):

    1. sft        OUTPUT/model from ``python -m quickstart --reduced`` (or an existing quickstart run given with
                  --start: its model/ and data/ are used as they are)
    2. grpo       python -m finetune.train --config finetune/configs/grpo_tiny_cpu.yaml on the quickstart's
                  training prompts (its image-generation rows), bounded by wall time (--seconds), once with the
                  lesion-locator reward and once with self-consistency; python -m finetune.export
    3. measure    for the SFT model and each GRPO model, on held-out prompts only: text-to-image faithfulness
                  (position and size, position, size; every held-out lesion prompt drawn with --seeds seeds, the
                  inference defaults: guidance on), FID/KID against the held-out scans on the VQGAN's encoder
                  features (medmax.image_metrics.vqgan_encoder_fid, a stand-in extractor), and python -m eval.run's
                  closed and MCQ accuracy

Writes OUTPUT/summary.json and OUTPUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_evidence import TARGET, _run, evaluate, write_summary  # noqa: E402  (bench scripts share their steps)

REWARDS = {"locator": "medmax.grpo_rewards:lesion_locator", "selfcons": "medmax.grpo_rewards:self_consistency"}


def sft(out: Path, start: Path | None, log: dict) -> None:
    if (out / "qs" / "model" / "config.json").is_file():
        return
    if start is not None:
        (out / "qs").mkdir(parents=True, exist_ok=True)
        for part in ("model", "data"):
            shutil.copytree(start / part, out / "qs" / part, dirs_exist_ok=True)
        return
    _run("1 sft (quickstart)", [sys.executable, "-m", "quickstart", "--reduced", "--nproc", "1", "--output", out / "qs"],
         log)


def grpo(out: Path, name: str, seconds: float, max_steps: int | None, seed: int, log: dict) -> Path:
    model = out / f"grpo_{name}_model"
    if (model / "config.json").is_file():
        return model
    py, qs = sys.executable, out / "qs"
    bound = [f"max_steps={max_steps}", "logging_steps=1"] if max_steps else [f"max_seconds={seconds}"]
    bound.append(f"seed={seed}")
    _run(f"2 grpo {name}", [py, "-m", "finetune.train", "--config", "finetune/configs/grpo_tiny_cpu.yaml",
                            f"model={qs / 'model'}", f"datasets=[{qs / 'data' / 'train.jsonl'}]",
                            f"output_dir={out / f'grpo_{name}'}", f"rewards=[{REWARDS[name]}]", *bound,
                            "report_to=none", "disable_tqdm=true"], log)
    _run(f"2 export {name}", [py, "-m", "finetune.export", "--checkpoint", out / f"grpo_{name}", "--output", model], log)
    return model


def drawings(model: Path, data: Path, seeds: int) -> dict:
    """Faithfulness on every held-out lesion prompt drawn with ``seeds`` seeds, and FID/KID against held-out scans."""
    from PIL import Image

    from medmax.generation import GenerationConfig, Generator
    from medmax.image_metrics import vqgan_encoder_fid
    from medmax.prompting import prompt_segments
    from medmax.synthetic import faithfulness

    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    prompts = [r["text"].split("<reserved08706>")[0] for r in rows if r.get("task") == "image_generation"]
    found = [(p, TARGET.search(p)) for p in prompts]
    targets = [(p, (m[2], m[1])) for p, m in found if m]
    gen = Generator.from_dir(model, device="cpu")
    asks = [prompt_segments(p, [], end_of_turn=True) for p, _ in targets for _ in range(seeds)]
    drawn = gen.generate(asks, GenerationConfig(mode="image", batch_size=16),
                         seeds=[s for _ in targets for s in range(seeds)])
    images = [o.images[0].image for o in drawn]
    score = faithfulness(images, [t for _, t in targets for _ in range(seeds)])
    real = sorted({r["image_path"] for r in rows})
    fid = vqgan_encoder_fid(gen.vqgan, images, [Image.open(data / p).convert("RGB") for p in real])
    return {"faithfulness": {k: score[k] for k in ("n", "match", "position_match", "size_match", "no_lesion_found")},
            "prompts": len(targets), "seeds": seeds, "n_real": len(real),
            "fid": {k: v for k, v in fid.items() if isinstance(v, (int, float, str))}}


def measure(out: Path, models: dict, seeds: int, log: dict) -> dict:
    summary = {}
    for name, model in models.items():
        cached = out / f"measure_{name}.json"
        if not cached.is_file():
            result = {"eval": evaluate(out, name, model, log), **drawings(model, out / "qs" / "data", seeds)}
            cached.write_text(json.dumps(result, indent=2))
        summary[name] = json.loads(cached.read_text())
    return summary


def _markdown(summary: dict) -> str:
    names = [n for n in ("sft", "locator", "selfcons") if n in summary]
    lines = ["| held-out measure | " + " | ".join({"sft": "SFT (before)", "locator": "GRPO locator",
                                                   "selfcons": "GRPO self-consistency"}[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    rows = [("faithfulness: position and size", "faithfulness", "match"),
            ("faithfulness: position", "faithfulness", "position_match"),
            ("faithfulness: size", "faithfulness", "size_match"),
            ("FID (VQGAN encoder features)", "fid", "fid"), ("KID", "fid", "kid"),
            ("closed accuracy", "eval", "closed"), ("MCQ accuracy", "eval", "mcq")]
    for label, group, key in rows:
        cells = [summary[n].get(group, {}).get(key) for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{c:.4g}" if isinstance(c, (int, float)) else "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="grpo_evidence", description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/grpo_evidence"))
    p.add_argument("--start", type=Path, help="an existing quickstart run folder (model/ and data/) to start from")
    p.add_argument("--seconds", type=float, default=900, help="wall time bound of each GRPO run (the config's max_steps "
                   "bounds it too)")
    p.add_argument("--seed", type=int, default=0, help="the GRPO run's seed (its samples)")
    p.add_argument("--seeds", type=int, default=4, help="drawings per held-out prompt")
    p.add_argument("--runs", nargs="+", choices=sorted(REWARDS), default=["locator", "selfcons"],
                   help="which GRPO runs (rewards) to make and measure")
    p.add_argument("--reduced", action="store_true", help="2 GRPO steps, the locator only, 1 seed (the slow test)")
    args = p.parse_args(argv)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {}
    sft(out, args.start.resolve() if args.start else None, log)
    names = ["locator"] if args.reduced else args.runs
    models = {"sft": out / "qs" / "model"}
    for name in names:
        models[name] = grpo(out, name, args.seconds, 2 if args.reduced else None, args.seed, log)
    summary = {**measure(out, models, 1 if args.reduced else args.seeds, log), "steps": log}
    return write_summary(out, summary, _markdown)


if __name__ == "__main__":
    raise SystemExit(main())
