"""Evaluate a model folder on MedMax's biomedical suite and write results.json, predictions and a report.

Usage::

    python -m eval.run --model runs/export --data data/medmax_eval --output runs/eval \\
        [--tasks all|vqa_rad,slake_open,...] [--prompt-style sft|chameleon|default] [--limit 200] \\
        [--batch-size 16] [--clip-model models/clip] [--judge-url URL --judge-model NAME] [--workers 2]

    # a benchmark's released file instead of the MedMax schema (images under --data):
    python -m eval.run --model runs/export --data data/vqa_rad --data-format vqa_rad \\
        --source "VQA_RAD Dataset Public.json" --output runs/eval_rad

    # several GPUs: torchrun --nproc-per-node 4 -m eval.run ... (each rank takes a shard; rank 0 merges)

Rerunning the same command resumes: rows already in ``OUTPUT/predictions/*.rank*.jsonl`` are skipped and
the merged results.json is identical. The judge's key is read from ``--judge-key-env`` (default
OPENAI_API_KEY) and is never logged or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import report
from .data import FORMATS, BadRow, EvalRecord, load_records, resolve_image
from .judge import Judge, JudgeConfig
from .prompts import STYLES, build_prompt
from .scoring import parse_mcq, score_closed, score_mcq, score_open
from .tasks import DEFAULT_MAX_NEW_TOKENS, Task, select_tasks, task_for

logger = logging.getLogger("eval.run")

NEEDS_INPUT_IMAGE = ("closed", "open", "mcq", "probmed", "captioning", "visual_chat")


@dataclass
class EvalConfig:
    model: Path  # model folder (medmax.model layout)
    data: Path  # MedMax-schema folder/file, or the image root of a released benchmark
    output: Path
    tasks: str = "all"
    prompt_style: str = "sft"
    data_format: str = "medmax"
    source: Path | None = None  # released benchmark file (with --data-format other than medmax)
    image_dir: str | None = None  # converters: image folder inside --data (default per format)
    limit: int | None = None  # per task, a seeded subsample keeping file order
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None  # override every task's default length
    repetition_penalty: float = 1.0  # greedy evaluation: off by default
    device: str | None = None
    dtype: str | None = None
    clip_model: Path | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    workers: int = 1
    shard_rank: int = 0
    num_shards: int = 1
    merge_timeout_s: float = 3600.0

    def __post_init__(self):
        if self.prompt_style not in STYLES:
            raise ValueError(f"--prompt-style must be one of {STYLES}, got {self.prompt_style!r}")
        if self.data_format not in FORMATS:
            raise ValueError(f"--data-format must be one of {FORMATS}, got {self.data_format!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("--batch-size and --workers must be >= 1")
        if not 0 <= self.shard_rank < self.num_shards:
            raise ValueError(f"shard rank {self.shard_rank} outside 0..{self.num_shards - 1}")
        if not self.data.exists():
            raise FileNotFoundError(f"--data {self.data}: does not exist")
        select_tasks(self.tasks)  # raises naming an unknown task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model folder (config.json, model.safetensors, tokenizer.json, vqgan/)")
    p.add_argument("--data", type=Path, required=True, help="MedMax-schema folder/file, or the image root of --source")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--tasks", default="all", help="all, or comma-separated task keys / names")
    p.add_argument("--prompt-style", default="sft", choices=STYLES)
    p.add_argument("--data-format", default="medmax", choices=FORMATS)
    p.add_argument("--source", type=Path, help="a benchmark's released file (with --data-format)")
    p.add_argument("--image-dir", help="image folder inside --data for converted benchmarks")
    p.add_argument("--limit", type=int, help="at most N rows per task (seeded, deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="override the per-task answer length")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--device", help="default: cuda (this rank's GPU) when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--clip-model", type=Path, help="local Hugging Face CLIP folder for captioning / image generation")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) for the optional open-answer judge")
    p.add_argument("--judge-model", help="judge model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--workers", type=int, default=1, help="local worker processes, each a shard")
    p.add_argument("--shard-rank", type=int, default=int(os.environ.get("RANK", 0)), help=argparse.SUPPRESS)
    p.add_argument("--num-shards", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help=argparse.SUPPRESS)
    p.add_argument("--merge-timeout-s", type=float, default=3600.0, help="rank 0: how long to wait for other shards")
    return p


# ------------------------------------------------------------------------------ data selection
def group_records(records: list[EvalRecord], tasks: list[Task]) -> tuple[dict[str, list[EvalRecord]], list[dict]]:
    """Records per selected task key; rows whose task is unknown are reported (rows of unselected tasks are not)."""
    groups: dict[str, list[EvalRecord]] = {t.key: [] for t in tasks}
    problems = []
    for rec in records:
        task = task_for(rec.task_name, rec.question_type)
        if task is None:
            problems.append({"uid": rec.uid, "reason": f"unknown task {rec.task_name!r} / question_type {rec.question_type!r}"})
        elif task.key in groups:
            groups[task.key].append(rec)
    return groups, problems


def apply_limit(records: list[EvalRecord], limit: int | None, seed: int, key: str) -> list[EvalRecord]:
    if limit is None or len(records) <= limit:
        return records
    keep = set(random.Random(f"{seed}:{key}").sample(range(len(records)), limit))
    return [r for i, r in enumerate(records) if i in keep]


# ------------------------------------------------------------------------------ context
@dataclass
class Context:
    config: EvalConfig
    generator: object
    clip: object | None
    judge: Judge | None
    pred_dir: Path
    stats: dict = field(default_factory=dict)


def _device(config: EvalConfig) -> str:
    import torch  # in the functions that use it: --help must not load torch

    if config.device:
        return config.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', config.shard_rank)) % torch.cuda.device_count()}"
    return "cpu"


def _setup(config: EvalConfig, tasks: list[Task]) -> Context:
    import torch

    from medmax.generation import Generator

    device = _device(config)
    dtype = getattr(torch, config.dtype) if config.dtype else None
    generator = Generator.from_dir(config.model, device=device, dtype=dtype)
    clip = None
    if config.clip_model and any(t.needs_clip or t.kind == "mm_out" for t in tasks):
        from .clip_score import ClipScorer

        clip = ClipScorer.from_dir(config.clip_model, device=device)
    judge = None
    if config.judge_url:
        judge = Judge(JudgeConfig(config.judge_url, config.judge_model or "", os.environ.get(config.judge_key_env),
                                  cache_path=config.output / "judge_cache.jsonl"))
    pred_dir = config.output / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    return Context(config, generator, clip, judge, pred_dir)


# ------------------------------------------------------------------------------ one batch
def _gen_config(task: Task, config: EvalConfig, seed: int):
    from medmax.generation import GenerationConfig

    if task.kind == "image_generation":
        return GenerationConfig(mode="image", seed=seed)
    n = config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]
    if task.kind == "mm_out":
        return GenerationConfig(mode="interleaved", max_new_tokens=n, do_sample=False, max_images=1, seed=seed,
                                repetition_penalty=config.repetition_penalty)
    return GenerationConfig(mode="text", max_new_tokens=n, do_sample=False, seed=seed, repetition_penalty=config.repetition_penalty)


def _base_row(task: Task, rec: EvalRecord) -> dict:
    return {"uid": rec.uid, "task": task.key, "question": rec.prompt, "image": rec.image_path, "answer": rec.answer}


def _prepare(task: Task, rec: EvalRecord, ctx: Context):
    """-> (prompt segments, None) or (None, error row)."""
    image = None
    if task.kind in NEEDS_INPUT_IMAGE:
        try:
            image = resolve_image(ctx.config.data, rec.image_path)
        except BadRow as e:
            return None, {**_base_row(task, rec), "output": None, "error": str(e)}
    return build_prompt(rec, task, ctx.config.prompt_style, image), None


def _generate(task: Task, prompts: list, ctx: Context, seeds: list[int]) -> list:
    """Generation outputs, or an exception per prompt; sampled image tasks run one prompt at a time, seeded by row."""
    gen = ctx.generator
    if task.kind in ("image_generation", "mm_out"):
        return [_one(gen, p, _gen_config(task, ctx.config, s)) for p, s in zip(prompts, seeds)]
    try:
        return gen.generate(prompts, _gen_config(task, ctx.config, ctx.config.seed))
    except (ValueError, OSError, TypeError) as e:
        logger.warning("%s: batch failed (%s); retrying its rows one by one", task.key, e)
        return [_one(gen, p, _gen_config(task, ctx.config, ctx.config.seed)) for p in prompts]


def _one(gen, prompt, config):
    try:
        return gen.generate([prompt], config)[0]
    except (ValueError, OSError, TypeError) as e:
        return e


def _row_seed(config: EvalConfig, uid: str) -> int:
    return random.Random(f"{config.seed}:{uid}").randrange(2**31)


def evaluate_batch(task: Task, batch: list[EvalRecord], ctx: Context) -> list[dict]:
    prepared = [_prepare(task, rec, ctx) for rec in batch]
    todo = [(rec, p) for rec, (p, err) in zip(batch, prepared) if err is None]
    outs = _generate(task, [p for _, p in todo], ctx, [_row_seed(ctx.config, rec.uid) for rec, _ in todo])
    done = {rec.uid: _score(task, rec, out, ctx) for (rec, _), out in zip(todo, outs)}
    return [done[rec.uid] if err is None else err for rec, (_, err) in zip(batch, prepared)]


# ------------------------------------------------------------------------------ scoring one row
def _score(task: Task, rec: EvalRecord, out, ctx: Context) -> dict:
    row = _base_row(task, rec)
    if isinstance(out, Exception):
        return {**row, "output": None, "error": f"generation failed: {out}"}
    row["output"] = out.text.strip()
    kind = task.kind
    if kind in ("closed", "probmed"):
        row["correct"] = score_closed(row["output"], str(rec.answer))
        if kind == "probmed":
            row["pair_id"] = rec.pair_id
    elif kind == "mcq":
        row["parsed"] = parse_mcq(row["output"], rec.options)
        row["correct"] = score_mcq(row["output"], str(rec.answer), rec.options)
    elif kind == "open":
        row.update(score_open(row["output"], str(rec.answer)))
        _judge(row, rec, ctx)
    elif kind in ("visual_chat", "mm_out"):
        reference = rec.answer.get("gpt4_answer", "") if isinstance(rec.answer, dict) else str(rec.answer)
        row.update({k: v for k, v in score_open(row["output"], reference).items() if k in ("f1", "recall")})
        if kind == "mm_out":
            _score_mm_image(row, rec, out, ctx)
    elif kind == "captioning":
        image = _load(resolve_image(ctx.config.data, rec.image_path))
        row["clip"] = ctx.clip.image_text([image], [row["output"]])[0]
    elif kind == "image_generation":
        _score_generated_image(row, rec, out, ctx)
    return row


def _load(path: Path):
    from medmax.images import load_image

    return load_image(path)


def _judge(row: dict, rec: EvalRecord, ctx: Context) -> None:
    if ctx.judge is None:
        return
    verdict = ctx.judge.judge(rec.prompt, str(rec.answer), row["output"])
    row["judge"] = verdict.correct
    row["judge_status"] = "ok" if verdict.correct is not None else ("failed" if verdict.error else "unparseable")


def _save_image(image, ctx: Context, uid: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in uid) + ".png"
    folder = ctx.pred_dir / "images"
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    return f"predictions/images/{name}"


def _score_generated_image(row: dict, rec: EvalRecord, out, ctx: Context) -> None:
    image = out.images[0].image
    row["output_image"] = _save_image(image, ctx, rec.uid)
    row["clip"] = ctx.clip.image_text([image], [rec.prompt])[0]


def _score_mm_image(row: dict, rec: EvalRecord, out, ctx: Context) -> None:
    if not out.images:
        return
    row["output_image"] = _save_image(out.images[0].image, ctx, rec.uid)
    if ctx.clip is None or not rec.image_path:
        return
    try:
        reference = _load(resolve_image(ctx.config.data, rec.image_path))
    except ValueError as e:  # BadRow or an unreadable reference image: the text score stands, the image is noted
        row["image_note"] = str(e)
        return
    row["image_clip"] = ctx.clip.image_image([out.images[0].image], [reference])[0]


# ------------------------------------------------------------------------------ predictions files
def shard_path(pred_dir: Path, key: str, rank: int) -> Path:
    return pred_dir / f"{key}.rank{rank}.jsonl"


def read_rows(path: Path) -> list[dict]:
    """Rows of a predictions file; a last line cut short by an interruption is dropped from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        path.write_bytes(data[:cut])
        data = data[:cut]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def pending(task: Task, records: list[EvalRecord], config: EvalConfig) -> list[EvalRecord]:
    """This shard's rows (every num_shards-th) that its predictions file does not hold yet."""
    path = shard_path(config.output / "predictions", task.key, config.shard_rank)
    done = {r["uid"] for r in read_rows(path)}
    return [r for i, r in enumerate(records) if i % config.num_shards == config.shard_rank and r.uid not in done]


def run_task(task: Task, mine: list[EvalRecord], ctx: Context) -> None:
    cfg = ctx.config
    path = shard_path(ctx.pred_dir, task.key, cfg.shard_rank)
    start, count = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(mine), desc=task.key, disable=None) as bar:
        for i in range(0, len(mine), cfg.batch_size):
            rows = evaluate_batch(task, mine[i : i + cfg.batch_size], ctx)
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            f.flush()
            count += len(rows)
            bar.update(len(rows))
    rate = count / max(time.perf_counter() - start, 1e-9)
    ctx.stats[task.key] = rate
    logger.info("%s: %d rows at %.2f questions/s", task.key, count, rate)


# ------------------------------------------------------------------------------ merging and outputs
def merge_task(task: Task, records: list[EvalRecord], pred_dir: Path, num_shards: int) -> tuple[list[dict], list[dict]]:
    """The task's rows in data order from every shard file, and a problem for each row no shard produced."""
    by_uid: dict[str, dict] = {}
    for rank in range(num_shards):
        for row in read_rows(shard_path(pred_dir, task.key, rank)):
            by_uid.setdefault(row["uid"], row)
    rows, missing = [], []
    for rec in records:
        if rec.uid in by_uid:
            rows.append(by_uid[rec.uid])
        else:
            missing.append({"uid": rec.uid, "reason": f"{task.key}: no prediction (a shard did not finish)"})
    return rows, missing


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def finish(config: EvalConfig, tasks: list[Task], groups: dict, skipped: dict, problems: list[dict]) -> dict:
    pred_dir = config.output / "predictions"
    results: dict = {}
    for task in tasks:
        if task.key in skipped:
            results[task.key] = {"skipped": skipped[task.key]}
            continue
        rows, missing = merge_task(task, groups[task.key], pred_dir, config.num_shards)
        problems += missing + [{"uid": r["uid"], "reason": r["error"]} for r in rows if r.get("error")]
        _write_jsonl(pred_dir / f"{task.key}.jsonl", rows)
        results[task.key] = report.task_metrics(task, rows)
    if problems:
        results["_problems"] = len(problems)
    report.write_results(config.output / "results.json", results)
    _write_jsonl(config.output / "problems.jsonl", problems)
    settings = {k: str(v) for k, v in asdict(config).items() if k not in ("shard_rank", "merge_timeout_s")}
    report.write_markdown(config.output / "report.md", results, problems, settings)
    report.write_chart(config.output / "report.png", results)
    return results


def _run_token() -> str:
    """Ties a shard's done marker to this launch (torchrun sets one id for all its ranks)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "local")


def _shard_done(marker: Path) -> bool:
    return marker.is_file() and marker.read_text() == _run_token()


def _wait_for_shards(config: EvalConfig) -> None:
    markers = [config.output / f".shard{r}.done" for r in range(config.num_shards)]
    deadline = time.monotonic() + config.merge_timeout_s
    while not all(_shard_done(m) for m in markers):
        if time.monotonic() > deadline:
            logger.error("shards %s did not finish in %.0fs; merging what exists",
                         [r for r, m in enumerate(markers) if not _shard_done(m)], config.merge_timeout_s)
            return
        time.sleep(2)


def _spawn_workers(config: EvalConfig, argv: list[str]) -> None:
    """--workers N: N local processes, each one shard; waits for all of them."""
    procs = [subprocess.Popen([sys.executable, "-m", "eval.run", *argv, "--workers", "1", "--shard-rank", str(r),
                               "--num-shards", str(config.workers)]) for r in range(config.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"eval workers exited with codes {codes}")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**{k: v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_from_args(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    evaluate(config, argv)
    return 0


def evaluate(config: EvalConfig, argv: list[str] | None = None) -> dict | None:
    """Run (or resume) one evaluation; -> the results dict (None on a shard other than rank 0)."""
    tasks = select_tasks(config.tasks)
    records, problems = load_records(config.data, config.data_format, config.source, config.image_dir)
    groups, unknown = group_records(records, tasks)
    problems += unknown
    groups = {k: apply_limit(v, config.limit, config.seed, k) for k, v in groups.items()}
    skipped = _skipped(config, tasks, groups)
    (config.output / "predictions").mkdir(parents=True, exist_ok=True)
    if config.workers > 1:
        if argv is None:
            raise ValueError("--workers > 1 needs the command line to start its worker processes")
        _spawn_workers(config, argv)
        config.num_shards = config.workers
    else:
        _run_shard(config, [t for t in tasks if t.key not in skipped], groups)
        if config.shard_rank != 0:
            return None
        _wait_for_shards(config)
    results = finish(config, tasks, groups, skipped, problems)
    logger.info("wrote %s", config.output / "results.json")
    return results


def _skipped(config: EvalConfig, tasks: list[Task], groups: dict) -> dict[str, str]:
    skipped = {}
    for task in tasks:
        if not groups[task.key]:
            skipped[task.key] = "no rows for this task in the data"
        elif task.needs_clip and config.clip_model is None:
            skipped[task.key] = "no --clip-model given; CLIP similarity cannot be computed"
            logger.warning("%s: skipped, %s", task.key, skipped[task.key])
    return skipped


def _run_shard(config: EvalConfig, tasks: list[Task], groups: dict) -> None:
    marker = config.output / f".shard{config.shard_rank}.done"
    marker.unlink(missing_ok=True)
    todo = {t.key: pending(t, groups[t.key], config) for t in tasks}
    if any(todo.values()):  # a finished run only re-merges: no model load
        ctx = _setup(config, tasks)
        for task in tasks:
            if todo[task.key]:
                run_task(task, todo[task.key], ctx)
    marker.write_text(_run_token())


if __name__ == "__main__":
    sys.exit(main())
