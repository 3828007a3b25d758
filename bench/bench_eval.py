"""Evaluation throughput: batched greedy generation (batch 16) against MedMax's one-question-at-a-time loop.

Usage::

    python bench/bench_eval.py            # "small" model, 64 questions, batch 16
    python bench/bench_eval.py --quick    # "tiny" model, 16 questions

Both sides run the evaluation suite's own row path (``eval.run.evaluate_batch``: image check, prompt,
generation, scoring) on the same questions in the same process; the only difference is how many
questions share one ``Generator.generate`` call. The predictions must be identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import run  # noqa: E402
from eval.data import load_medmax  # noqa: E402
from eval.tasks import select_tasks  # noqa: E402
from medmax.presets import make_model_dir  # noqa: E402

QUESTIONS = ["Where is the lesion located?", "What modality is this?", "Which organ is shown?", "Describe the image."]


def make_data(root: Path, n: int) -> Path:
    (root / "img").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 255 - 30 * i, 90)).save(root / "img" / f"{i}.png")
    rows = [{"task_name": "slake", "question_type": "open", "prompt": QUESTIONS[i % 4] + f" ({i})", "answer": "upper left",
             "image_path": f"img/{i % 8}.png"} for i in range(n)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 questions")
    parser.add_argument("--questions", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    n = args.questions or (16 if args.quick else 64)
    preset = "tiny" if args.quick else "small"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model_dir(tmp / "model", preset, seed=0)
        data = make_data(tmp / "data", n)
        config = run.EvalConfig(model=tmp / "model", data=data, output=tmp / "out", tasks="slake_open", device="cpu",
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        task = select_tasks("slake_open")[0]
        records, _ = load_medmax(data)
        ctx = run._setup(config, [task])
        run.evaluate_batch(task, records[:2], ctx)  # warm-up
        single, t_single = timed(lambda: [row for rec in records for row in run.evaluate_batch(task, [rec], ctx)])
        bs = args.batch_size
        batched, t_batched = timed(lambda: [row for i in range(0, n, bs) for row in run.evaluate_batch(task, records[i : i + bs], ctx)])
    same = sum(a == b for a, b in zip(single, batched))
    result = {"model": preset, "questions": n, "batch_size": bs, "max_new_tokens": args.max_new_tokens,
              "one_at_a_time_q_per_s": n / t_single, "batched_q_per_s": n / t_batched, "speedup": t_single / t_batched,
              "identical_rows": f"{same}/{n}"}
    print(json.dumps(result, indent=2))
    assert same == n, f"batched predictions differ from one-at-a-time on {n - same} of {n} questions"
    return result


if __name__ == "__main__":
    main()
