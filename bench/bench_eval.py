"""Evaluation throughput: batched greedy generation (batch 16) against MedMax's one-question-at-a-time loop.

Usage::

    python bench/bench_eval.py            # "small" model, 128 open questions, batch 16, 3 rounds
    python bench/bench_eval.py --quick    # 32 questions

Both modes run the whole evaluation program, ``eval.run.main``, in this process on the same model folder
and questions, into a fresh output folder each time: ``--batch-size 1`` (one question per generate call,
as MedMax's loop does) and ``--batch-size 16``. They alternate in interleaved rounds, and the
predictions of the batched run must equal the one-at-a-time predictions row for row, in every round.
Seconds are the whole program's, fixed costs included (loading the model folder, writing results, report
and chart: the same for both modes); with few questions they weigh on the ratio, so both sizes use the
"small" model (hidden 128, 4 layers), where generation dominates.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from harness import Benchmark, command_line, Case, Result, Target, Variant, add_arguments, run_benchmark, size_label  # noqa: E402

QUESTIONS = ["Where is the lesion located?", "What modality is this?", "Which organ is shown?", "Describe the image."]
TASK = "slake_open"


def make_data(root: Path, n: int) -> Path:
    (root / "img").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 255 - 30 * i, 90)).save(root / "img" / f"{i}.png")
    rows = [{"task_name": "slake", "question_type": "open", "prompt": QUESTIONS[i % 4] + f" ({i})", "answer": "upper left",
             "image_path": f"img/{i % 8}.png"} for i in range(n)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def predictions(out: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (out / "predictions" / f"{TASK}.jsonl").read_text().splitlines() if line]
    return sorted((r["uid"], r["output"]) for r in rows)


def evaluation(model: Path, data: Path, out: Path, batch_size: int, max_new_tokens: int, n: int):
    from eval.run import main as eval_main

    def run() -> Result:
        shutil.rmtree(out, ignore_errors=True)
        eval_main(["--model", str(model), "--data", str(data), "--output", str(out), "--tasks", TASK, "--device", "cpu",
                   "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens)])
        return Result(work={"questions": n}, output=predictions(out))

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 questions instead of 128")
    parser.add_argument("--questions", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the 2 cores are shared)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    n = args.questions or (32 if args.quick else 128)
    preset = "small"
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from medmax.presets import make_model_dir

    bench = Benchmark(
        name="eval", title="Evaluation: batched vs one question at a time", size=size_label(args.quick, args.questions),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"model_preset": preset, "questions": n, "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens, "image_px": 64, "threads": args.threads},
        command=command_line(argv))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model_dir(tmp / "model", preset, seed=0)
        data = make_data(tmp / "data", n)
        single = evaluation(model, data, tmp / "single", 1, args.max_new_tokens, n)
        batched = evaluation(model, data, tmp / "batched", args.batch_size, args.max_new_tokens, n)
        case = Case(f"{n} open questions, {preset} model", unit="questions", variants=[
            Variant("one at a time (--batch-size 1, MedMax's loop)", single),
            Variant(f"batched (--batch-size {args.batch_size})", batched)])
        target = Target(case.name, case.variants[1].name, "ratio", ">=", 3.0, f"batch {args.batch_size} >= 3x one at a time")
        return run_benchmark(bench, [case], [target], args)


if __name__ == "__main__":
    raise SystemExit(main())
