"""Evaluate a model folder on MedMax's biomedical suite and write results.json, predictions and a report.

Usage::

    python -m eval.run --model runs/export --data data/medmax_eval --output runs/eval \\
        [--tasks all|vqa_rad,slake_open,...] [--prompt-style sft|chameleon|default] [--limit 200] \\
        [--protocol toolkit|medmax] [--batch-size 16] [--clip-model models/clip] \\
        [--judge-url URL --judge-model NAME [--judge-prompt FILE]] [--workers 2] [--overwrite]

    # image generation: FID / KID against real scans on a chosen extractor (eval/fid.py), BiomedCLIP similarity
    python -m eval.run ... --tasks image_generation --clip-model models/BiomedCLIP \
        --fid-features models/rad-dino --fid-real data/real_scans [--fid-kind auto|clip|dinov2|vqgan-encoder|inception]
    # the published FID's Inception-v3: --fid-features models/weights-inception-2015-12-05-6726825d.pth (torch-fidelity's)

    # MedMax's published scoring (eval/medmax_protocol.py): 1-token closed and MCQ answers, a GPT judge for open ones
    python -m eval.run --model runs/export --data data/medmax_eval --output runs/eval_medmax --protocol medmax \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini

    # a benchmark's released file instead of the MedMax schema (images under --data):
    python -m eval.run --model runs/export --data data/vqa_rad --data-format vqa_rad \\
        --source "VQA_RAD Dataset Public.json" [--split test] --output runs/eval_rad
    # (every --data-format, --split, --lang and --trust-pickle: README, "Evaluation data")

    # checks beside the score (eval/ablation.py, eval/circular.py, eval/contamination.py): is the image read, does an
    # MCQ answer follow the option's position, which eval images the model trained on
    python -m eval.run --model runs/export --data data/medmax_eval --output runs/eval --ablate-image --circular-eval \
        --train-data data/image_tokens data/images.csv
    # is a gap between two runs real? python -m eval.compare runs/eval_a runs/eval_b (eval/compare.py)

    # several GPUs: torchrun --nproc-per-node 4 -m eval.run ... (each rank takes a shard; rank 0 merges)
    # shards started by hand (a job array): the same --run-id for every shard of one launch, a new one per launch
    python -m eval.run ... --shard-rank 1 --num-shards 4 --run-id "$SLURM_ARRAY_JOB_ID"

Writes OUTPUT/results.json (our metrics, with the fingerprint and the toolkit version), results_medmax.json
(MedMax's layout, {task_id: {"accuracy", "std_err"}}), report.md (which protocol produced each number),
report.png, problems.jsonl (every row not evaluated, and why) and predictions/ (eval/outputs.py).

Rerunning the same command resumes: rows already in ``OUTPUT/predictions/*.rank*.jsonl`` are skipped and
the merged results.json is identical. A rerun with another model, data file or setting (anything in
OUTPUT/fingerprint.json, see eval/fingerprint.py) into the same --output stops before loading the model,
with one line naming what changed; ``--overwrite`` starts the folder afresh (deleting only files eval.run
wrote). A row whose image cannot be read or whose generation fails is reported, and its batch goes on.
A task with more than half of its rows unscored (or of its judge verdicts missing) is a console warning naming
the first reason, also in results.json's ``_warnings`` and atop report.md; a run that scored no row at all
writes its outputs and exits 2.
The judge's key is read from ``--judge-key-env`` (default OPENAI_API_KEY) and is never logged or written.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from medmax.cli import program
from medmax.jsonl import append_jsonl, read_json, read_jsonl, write_jsonl

from . import ablation, circular, contamination, editing, fid, fingerprint, launch, medmax_protocol, outputs, report
from .data import FORMATS, EvalRecord, data_files, load_record_image, load_records
from .errors import EvalError, FingerprintMismatch, ShardError
from .judge import PLACEHOLDERS, PROMPT, Judge, JudgeConfig, parse_verdict
from .medmax_protocol import PROTOCOLS
from .outputs import PREDICTIONS, shard_path
from .prompts import STYLES, build_prompt
from .scoring import parse_mcq, score_closed, score_mcq, score_open
from .tasks import DEFAULT_MAX_NEW_TOKENS, Task, select_tasks, task_for

logger = logging.getLogger("eval.run")

NEEDS_INPUT_IMAGE = ("closed", "open", "mcq", "probmed", "captioning", "visual_chat")
# what one row's input image may raise while it is read: it becomes that row's reported failure
IMAGE_FAILURES = (ValueError, OSError, MemoryError, Image.DecompressionBombError)


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
    split: str | None = None  # converters: vqa_rad / path_mmu / pathvqa split (default test)
    lang: str | None = None  # slake: en (default), zh or all
    trust_pickle: bool = False  # pathvqa: allow unpickling its .pkl question files
    limit: int | None = None  # per task, a seeded subsample keeping file order
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None  # override every task's default length
    repetition_penalty: float = 1.0  # greedy evaluation: off by default
    protocol: str = "toolkit"  # scoring rules: the toolkit's, or MedMax's published ones (eval/medmax_protocol.py)
    device: str | None = None
    dtype: str | None = None
    skip_memory_check: bool = False  # load the model even when config.json's sizes need more memory than is free
    clip_model: Path | None = None  # a Hugging Face CLIP folder or an open_clip one (BiomedCLIP)
    fid_features: Path | None = None  # image generation: FID / KID feature extractor (eval/fid.py)
    fid_real: Path | None = None  # the real images FID compares with: a folder, or a CSV of image paths
    fid_kind: str = "auto"
    fid_pool: str = "cls"  # dinov2: the CLS token or pooler_output
    ablate_image: bool = False  # ask each VQA question again without its image, blank and shuffled (eval/ablation.py)
    circular_eval: bool = False  # ask each MCQ once per rotation of its options (eval/circular.py)
    train_data: list[Path] = field(default_factory=list)  # contamination check (eval/contamination.py); decides no prediction
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    judge_prompt: Path | None = None  # a template with {question}, {answer}, {output}
    judge_deadline_s: float = 120.0  # one row's verdict, retries included
    judge_max_reply_bytes: int = 1_000_000
    workers: int = 1
    shard_rank: int = 0
    num_shards: int = 1
    merge_timeout_s: float = 3600.0
    overwrite: bool = False  # start the output folder afresh
    run_id: str | None = None  # shards started by hand: the launch they belong to
    fingerprint_checked: str | None = None  # --workers children: the digest their parent wrote

    def __post_init__(self):
        try:
            self._validate()
        except (ValueError, FileNotFoundError) as e:
            raise EvalError(str(e)) from None

    def _validate(self):
        if self.prompt_style not in STYLES:
            raise ValueError(f"--prompt-style must be one of {STYLES}, got {self.prompt_style!r}")
        if self.data_format not in FORMATS:
            raise ValueError(f"--data-format must be one of {FORMATS}, got {self.data_format!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "medmax" and self.max_new_tokens is not None:
            raise ValueError("--max-new-tokens conflicts with --protocol medmax, which fixes the answer lengths "
                             "(1 new token for closed and MCQ questions, 60 for open ones)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("--batch-size and --workers must be >= 1")
        if self.judge_deadline_s <= 0 or self.judge_max_reply_bytes < 1:
            raise ValueError("--judge-deadline-s and --judge-max-reply-bytes must be > 0")
        if not 0 <= self.shard_rank < self.num_shards:
            raise ValueError(f"shard rank {self.shard_rank} outside 0..{self.num_shards - 1}")
        if not self.data.exists():
            raise FileNotFoundError(f"--data {self.data}: does not exist")
        contamination.check_paths(self.train_data)
        self._validate_judge()
        self._validate_fid()
        select_tasks(self.tasks)  # raises naming an unknown task

    def _validate_fid(self):
        from .fid import KINDS, POOLS, detect_kind, load_extractor

        if self.fid_kind not in KINDS or self.fid_pool not in POOLS:
            raise ValueError(f"--fid-kind must be one of {KINDS} and --fid-pool one of {POOLS}")
        if (self.fid_features is None) != (self.fid_real is None):
            raise ValueError("--fid-features and --fid-real go together: FID compares drawn images with real ones")
        for flag, path in (("--fid-features", self.fid_features), ("--fid-real", self.fid_real)):
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{flag} {path}: does not exist")
        if self.fid_features is None:
            return
        kind = detect_kind(self.fid_features) if self.fid_kind == "auto" else self.fid_kind  # before any drawing
        if kind == "inception":  # torch-fidelity and the weights too (about a second)
            load_extractor(self.fid_features, kind)

    def _validate_judge(self):
        if not self.judge_url:
            return
        JudgeConfig(self.judge_url, self.judge_model or "")  # checks the URL's scheme and the model name
        if self.judge_prompt is not None:
            if not self.judge_prompt.is_file():
                raise FileNotFoundError(f"--judge-prompt {self.judge_prompt}: no such file")
            missing = [p for p in PLACEHOLDERS if p not in self.judge_prompt.read_text(encoding="utf-8")]
            if missing:
                raise ValueError(f"--judge-prompt {self.judge_prompt}: lacks the placeholders {missing}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model folder (config.json, model.safetensors, tokenizer.json, vqgan/)")
    p.add_argument("--data", type=Path, required=True, help="MedMax-schema folder/file, or the image root of --source")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--tasks", default=EvalConfig.tasks, help="all, or comma-separated task keys / names")
    p.add_argument("--prompt-style", default=EvalConfig.prompt_style, choices=STYLES)
    p.add_argument("--protocol", default=EvalConfig.protocol, choices=PROTOCOLS,
                   help="scoring rules: the toolkit's (default), or MedMax's published evaluation/vqa.py")
    p.add_argument("--data-format", default=EvalConfig.data_format, choices=FORMATS)
    p.add_argument("--source", type=Path, help="a benchmark's released file (with --data-format)")
    p.add_argument("--image-dir", help="image folder inside --data for converted benchmarks")
    p.add_argument("--split", help="vqa_rad: test|train|all, path_mmu: test|test_tiny|val, pathvqa: test|train|val|all (default test)")
    p.add_argument("--lang", help="slake: en (default), zh or all")
    p.add_argument("--trust-pickle", action="store_true", help="pathvqa: unpickle a .pkl question file (a pickle can run code)")
    p.add_argument("--limit", type=int, help="at most N rows per task (seeded, deterministic)")
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--max-new-tokens", type=int, help="override the per-task answer length (not with --protocol medmax)")
    p.add_argument("--repetition-penalty", type=float, default=EvalConfig.repetition_penalty)
    p.add_argument("--device", help="default: cuda (this rank's GPU) when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load the model even when config.json's sizes need more memory than is available")
    p.add_argument("--clip-model", type=Path,
                   help="local Hugging Face CLIP or open_clip (BiomedCLIP) folder for captioning / image generation")
    p.add_argument("--fid-features", type=Path, help="image generation: FID/KID feature extractor (CLIP, DINOv2/RadDino folder, VQGAN, torch-fidelity Inception .pth)")
    p.add_argument("--fid-real", type=Path, help="real images for FID/KID: a folder, or a CSV with an img_path column")
    p.add_argument("--fid-kind", default=EvalConfig.fid_kind, help="auto, clip, dinov2, vqgan-encoder or inception")
    p.add_argument("--fid-pool", default=EvalConfig.fid_pool, help="dinov2 features: cls or pooled")
    p.add_argument("--ablate-image", action="store_true",
                   help="ask each VQA question again with no image, a blank one and another question's (eval/ablation.py)")
    p.add_argument("--circular-eval", action="store_true",
                   help="MMBench's CircularEval: ask each MCQ once per rotation of its options (eval/circular.py)")
    p.add_argument("--train-data", type=Path, nargs="+", default=[], metavar="PATH",
                   help="image-token folders or image CSVs the model trained on: report eval images and questions found "
                        "there, and the score on seen and unseen images (eval/contamination.py)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) for the open-answer judge")
    p.add_argument("--judge-model", help="judge model name (MedMax used gpt-4o-mini)")
    p.add_argument("--judge-key-env", default=EvalConfig.judge_key_env, help="environment variable holding the judge's key")
    p.add_argument("--judge-prompt", type=Path, help="the judge's prompt template ({question}, {answer}, {output})")
    p.add_argument("--judge-deadline-s", type=float, default=EvalConfig.judge_deadline_s, help="give up on one row's verdict after this long")
    p.add_argument("--judge-max-reply-bytes", type=int, default=EvalConfig.judge_max_reply_bytes, help="refuse a judge reply larger than this")
    p.add_argument("--overwrite", action="store_true", help="start --output afresh (deletes only files eval.run wrote)")
    p.add_argument("--workers", type=int, default=EvalConfig.workers, help="local worker processes, each a shard")
    p.add_argument("--shard-rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="this shard (default: torchrun's RANK)")
    p.add_argument("--num-shards", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="shards in the launch (default: torchrun's WORLD_SIZE)")
    p.add_argument("--run-id", help="shards started by hand: one id shared by every shard of a launch, new per launch")
    p.add_argument("--fingerprint-checked", help=argparse.SUPPRESS)
    p.add_argument("--merge-timeout-s", type=float, default=EvalConfig.merge_timeout_s, help="rank 0: how long to wait for other shards")
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


def data_digests(config: EvalConfig) -> dict[str, str]:
    """Digests of the files the records are read from (the data part of the fingerprint)."""
    if config.data_format == "medmax":
        root = config.data
        return {(p.name if root.is_file() else p.relative_to(root).as_posix()): fingerprint.file_digest(p)
                for p in data_files(root)}
    if config.source is None:
        raise EvalError(f"--data-format {config.data_format} needs --source (the benchmark's released file)")
    source = config.source if config.source.is_absolute() else config.data / config.source
    return fingerprint.tree_digests(source)


# ------------------------------------------------------------------------------ one launch: output folder and run id
def _claim(config: EvalConfig, ranks: set[int] | None) -> dict:
    """Check (or with --overwrite, clear) the output folder against this run's fingerprint; -> the fingerprint."""
    try:
        fp = fingerprint.compute(config, data_digests(config))
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    outputs.claim(config.output, fp, config.overwrite, ranks)
    return fp


def _launch(config: EvalConfig) -> tuple[str, dict]:
    """-> (this launch's run id, the fingerprint), the same on every rank; raises before any model work."""
    if config.fingerprint_checked:  # a --workers child: its parent checked the folder and chose the run id
        fp = read_json(config.output / outputs.FINGERPRINT)
        if fp is None or fp.get("digest") != config.fingerprint_checked or not config.run_id:
            raise FingerprintMismatch(f"{config.output / outputs.FINGERPRINT} changed after the workers' parent checked it")
        return config.run_id, fp
    if config.run_id is None and launch.under_torchrun():
        return launch.agree(lambda: (launch.new_run_id(), _claim(config, None)))
    if config.num_shards > 1 and not config.run_id:
        raise ShardError("--shard-rank/--num-shards outside torchrun and --workers need --run-id ID, the same for every "
                         "shard of one launch and new for each launch")
    ranks = None if config.num_shards == 1 else {config.shard_rank}
    return config.run_id or launch.new_run_id(), _claim(config, ranks)


# ------------------------------------------------------------------------------ context
@dataclass
class Context:
    config: EvalConfig
    generator: object
    clip: object | None
    judge: Judge | None
    pred_dir: Path
    stats: dict = field(default_factory=dict)
    tag: str | None = None  # the fingerprint tag every row written carries
    partners: dict = field(default_factory=dict)  # --ablate-image: task key -> uid -> the shuffled control's row


def _device(config: EvalConfig) -> str:
    import torch  # in the functions that use it: --help must not load torch

    if config.device:
        return config.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', config.shard_rank)) % torch.cuda.device_count()}"
    return "cpu"


def _judge(config: EvalConfig) -> Judge | None:
    if not config.judge_url:
        return None
    own = outputs.judge_cache_path(config.output, config.shard_rank)
    others = tuple(sorted(p for p in config.output.glob("judge_cache*.jsonl") if p != own))
    prompt = config.judge_prompt.read_text(encoding="utf-8") if config.judge_prompt else PROMPT
    parse = medmax_protocol.judge_verdict if config.protocol == "medmax" else parse_verdict
    return Judge(JudgeConfig(config.judge_url, config.judge_model or "", os.environ.get(config.judge_key_env),
                             cache_path=own, read_paths=others, prompt=prompt, parse=parse,
                             deadline_s=config.judge_deadline_s, max_reply_bytes=config.judge_max_reply_bytes))


def _quiet_loading_bars() -> None:
    """transformers' "Loading weights" bar only on a terminal, as eval's own bars (tqdm's ``disable=None``):
    in a log file its carriage-return frames are fragments among the log lines."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _setup(config: EvalConfig, tasks: list[Task]) -> Context:
    import torch

    from medmax.generation import Generator

    device = _device(config)
    dtype = getattr(torch, config.dtype) if config.dtype else None
    _quiet_loading_bars()
    generator = Generator.from_dir(config.model, device=device, dtype=dtype, skip_memory_check=config.skip_memory_check)
    clip = None
    if config.clip_model and any(t.needs_clip or t.kind == "mm_out" for t in tasks):
        from medmax.clip_score import ClipScorer

        clip = ClipScorer.from_dir(config.clip_model, device=device)
    pred_dir = config.output / PREDICTIONS
    pred_dir.mkdir(parents=True, exist_ok=True)
    return Context(config, generator, clip, _judge(config), pred_dir)


# ------------------------------------------------------------------------------ one batch
def _answer_length(task: Task, config: EvalConfig) -> int:
    if medmax_protocol.applies(config.protocol, task):
        return medmax_protocol.MAX_NEW_TOKENS[task.kind]
    return config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]


def _gen_config(task: Task, config: EvalConfig, seed: int):
    from medmax.generation import GenerationConfig

    if task.kind in ("image_generation", "image_editing"):
        return GenerationConfig(mode="image", seed=seed)
    n = _answer_length(task, config)
    if task.kind == "mm_out":
        return GenerationConfig(mode="interleaved", max_new_tokens=n, do_sample=False, max_images=1, seed=seed,
                                repetition_penalty=config.repetition_penalty)
    return GenerationConfig(mode="text", max_new_tokens=n, do_sample=False, seed=seed, repetition_penalty=config.repetition_penalty)


def _base_row(task: Task, rec: EvalRecord) -> dict:
    row = {"uid": rec.uid, "task": task.key, "question": rec.prompt, "image": rec.image_path, "answer": rec.answer}
    return {**row, "groups": rec.extra["groups"]} if rec.extra.get("groups") else row


def _failed_row(task: Task, rec: EvalRecord, reason: str) -> dict:
    return {**_base_row(task, rec), "output": None, "error": reason}


def _input_image(rec: EvalRecord, ctx: Context):
    """The row's input image, read as RGB; the one place a row's image is resolved and loaded."""
    return load_record_image(ctx.config.data, rec)


def _image_failure(rec: EvalRecord, err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return f"image {rec.image_path!r}: out of memory while reading it (MemoryError); the image is too large"
    return str(err) or f"image {rec.image_path!r}: {type(err).__name__}"


def _prepare(task: Task, rec: EvalRecord, ctx: Context):
    """-> (prompt segments, input image, None), or (None, None, failed row)."""
    image = None
    if task.kind == "image_editing":
        try:
            return (*editing.edit_prompt(rec, ctx.config.data), None)  # the input images stand in for the image
        except IMAGE_FAILURES as e:
            return None, None, _failed_row(task, rec, _image_failure(rec, e))
    if task.kind in NEEDS_INPUT_IMAGE:
        try:
            image = _input_image(rec, ctx)
        except IMAGE_FAILURES as e:
            return None, None, _failed_row(task, rec, _image_failure(rec, e))
    try:
        return build_prompt(rec, task, ctx.config.prompt_style, image), image, None
    except ValueError as e:
        return None, None, _failed_row(task, rec, f"cannot build the prompt: {e}")


def _generate(task: Task, prompts: list, ctx: Context, seeds: list[int]) -> list:
    """Generation outputs, or an exception per prompt; sampled image tasks run one prompt at a time, seeded by row.
    A batch that raises is retried one prompt at a time, so only the prompts that fail on their own fail."""
    gen = ctx.generator
    if task.kind in ("image_generation", "mm_out", "image_editing"):
        return [_one(gen, p, _gen_config(task, ctx.config, s)) for p, s in zip(prompts, seeds)]
    if not prompts:
        return []
    config = _gen_config(task, ctx.config, ctx.config.seed)
    try:
        return gen.generate(prompts, config)
    except Exception as e:  # noqa: BLE001 - one row's failure must not take down its batch
        if len(prompts) == 1:
            return [e]
        logger.warning("%s: a batch of %d failed (%s: %s); retrying its rows one by one", task.key, len(prompts),
                       type(e).__name__, e)
        return [_one(gen, p, config) for p in prompts]


def _one(gen, prompt, config):
    try:
        return gen.generate([prompt], config)[0]
    except Exception as e:  # noqa: BLE001 - reported as this row's failure
        return e


def _row_seed(config: EvalConfig, uid: str) -> int:
    return random.Random(f"{config.seed}:{uid}").randrange(2**31)


def evaluate_batch(task: Task, batch: list[EvalRecord], ctx: Context) -> list[dict]:
    """One row per record, in order; a row that cannot be read, generated or scored is a failed row."""
    prepared = [_prepare(task, rec, ctx) for rec in batch]
    todo = [(rec, prompt, image) for rec, (prompt, image, failed) in zip(batch, prepared) if failed is None]
    outs = _generate(task, [p for _, p, _ in todo], ctx, [_row_seed(ctx.config, rec.uid) for rec, _, _ in todo])
    done = {rec.uid: _score_row(task, rec, out, image, ctx) for (rec, _, image), out in zip(todo, outs)}
    scored = [(rec, p, image, done[rec.uid]) for rec, p, image in todo if not done[rec.uid].get("error")]
    if ctx.config.ablate_image and task.kind in ablation.KINDS:
        _ablate(task, scored, ctx)
    if ctx.config.circular_eval and task.kind == "mcq":
        _rotate(task, scored, ctx)
    return [done[rec.uid] if failed is None else failed for rec, (_, _, failed) in zip(batch, prepared)]


def _ablate(task: Task, items: list, ctx: Context) -> None:
    """--ablate-image: the scored rows' questions asked again without, with a blank and with another image."""
    quiet = replace(ctx, judge=None)  # ablated answers are scored by the task's rule, not sent to the judge
    ablation.add_conditions(task.kind, items, ctx.partners.get(task.key, {}), lambda rec: _input_image(rec, ctx),
                            lambda prompts: _generate(task, prompts, ctx, [0] * len(prompts)),
                            lambda rec, out: _score(task, rec, out, None, quiet))


def _rotate(task: Task, items: list, ctx: Context) -> None:
    """--circular-eval: the scored MCQ rows asked again in every other rotation of their options."""
    images = {rec.uid: image for rec, _, image, _ in items}
    quiet = replace(ctx, judge=None)
    circular.add_rotations([(rec, row) for rec, _, _, row in items],
                           lambda rec: build_prompt(rec, task, ctx.config.prompt_style, images[rec.uid]),
                           lambda prompts: _generate(task, prompts, ctx, [0] * len(prompts)),
                           lambda rec, out: _score(task, rec, out, None, quiet))


# ------------------------------------------------------------------------------ scoring one row
def _score_row(task: Task, rec: EvalRecord, out, image, ctx: Context) -> dict:
    if isinstance(out, BaseException):
        return _failed_row(task, rec, f"generation failed ({type(out).__name__}: {out})")
    try:
        return _score(task, rec, out, image, ctx)
    except Exception as e:  # noqa: BLE001 - reported as this row's failure, with its traceback in the log
        logger.warning("%s: scoring %s failed", task.key, rec.uid, exc_info=True)
        return _failed_row(task, rec, f"scoring failed ({type(e).__name__}: {e})")


def _score(task: Task, rec: EvalRecord, out, image, ctx: Context) -> dict:
    row = _base_row(task, rec)
    row["output"] = out.text.strip()
    row["n_new_tokens"] = len(out.token_ids)
    kind = task.kind
    if medmax_protocol.applies(ctx.config.protocol, task):
        _score_medmax(row, task, rec, out, ctx)
    elif kind in ("closed", "probmed"):
        row["correct"] = score_closed(row["output"], str(rec.answer))
    elif kind == "mcq":
        row["parsed"] = parse_mcq(row["output"], rec.options)
        row["correct"] = score_mcq(row["output"], str(rec.answer), rec.options)
    elif kind == "open":
        row.update(score_open(row["output"], str(rec.answer)))
        _ask_judge(row, rec, ctx, row["output"])
    elif kind in ("visual_chat", "mm_out"):
        reference = rec.answer.get("gpt4_answer", "") if isinstance(rec.answer, dict) else str(rec.answer)
        row.update({k: v for k, v in score_open(row["output"], reference).items() if k in ("f1", "recall")})
        if kind == "mm_out":
            _score_mm_image(row, rec, out, ctx)
    elif kind == "captioning":
        row["clip"] = ctx.clip.image_text([image], [row["output"]])[0]
    elif kind == "image_generation":
        _score_generated_image(row, rec, out, ctx)
    elif kind == "image_editing":
        row["output_image"] = _save_image(out.images[0].image, ctx, rec.uid)
        editing.score_row(row, rec, out.images[0].image, image, ctx.config.data)
    if rec.pair_id is not None:  # questions scored together (paired_accuracy): ProbMed's pairs, any pair_id column
        row["pair_id"] = rec.pair_id
    return row


def _score_medmax(row: dict, task: Task, rec: EvalRecord, out, ctx: Context) -> None:
    """MedMax's rules on the raw generated text (eval/medmax_protocol.py); open answers go to the judge."""
    row["raw_output"] = out.text
    row.update(medmax_protocol.score(task.kind, out.text, rec.answer))
    if task.kind == "open":
        _ask_judge(row, rec, ctx, row["medmax_text"])
        row["correct"] = row.get("judge")


def _ask_judge(row: dict, rec: EvalRecord, ctx: Context, output: str) -> None:
    if ctx.judge is None:
        return
    verdict = ctx.judge.judge(rec.prompt, str(rec.answer), output)
    row["judge"] = verdict.correct
    row["judge_status"] = "ok" if verdict.correct is not None else ("failed" if verdict.error else "unparseable")
    if verdict.error:
        row["judge_error"] = verdict.error


def _save_image(image, ctx: Context, uid: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in uid) + ".png"
    folder = ctx.pred_dir / "images"
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    return f"{PREDICTIONS}/images/{name}"


def _score_generated_image(row: dict, rec: EvalRecord, out, ctx: Context) -> None:
    image = out.images[0].image
    row["output_image"] = _save_image(image, ctx, rec.uid)
    if ctx.clip is not None:  # without --clip-model, a run with --fid-features still draws and measures FID
        row["clip"] = ctx.clip.image_text([image], [rec.prompt])[0]


def _score_mm_image(row: dict, rec: EvalRecord, out, ctx: Context) -> None:
    if not out.images:
        return
    row["output_image"] = _save_image(out.images[0].image, ctx, rec.uid)
    if ctx.clip is None or not (rec.image_path or rec.image_bytes):
        return
    try:
        reference = _input_image(rec, ctx)
    except IMAGE_FAILURES as e:  # an unreadable reference image: the text score stands, the image is noted
        row["image_note"] = _image_failure(rec, e)
        return
    row["image_clip"] = ctx.clip.image_image([out.images[0].image], [reference])[0]


# ------------------------------------------------------------------------------ predictions files
def pending(task: Task, records: list[EvalRecord], config: EvalConfig, tag: str | None = None) -> list[EvalRecord]:
    """This shard's rows (every num_shards-th) that its own predictions file does not hold yet (under this
    fingerprint ``tag``), and rows whose judge request failed. The shard owns that file, so an unfinished last
    line is cut off it here; a row written again is appended, and the last one of a uid counts."""
    path = shard_path(config.output / PREDICTIONS, task.key, config.shard_rank)
    latest = {r.get("uid"): r for r in read_jsonl(path, repair=True) if tag is None or r.get("fingerprint") == tag}
    done = {uid for uid, r in latest.items() if r.get("judge_status") != "failed"}  # a failed judge request is asked again
    return [r for i, r in enumerate(records) if i % config.num_shards == config.shard_rank and r.uid not in done]


def run_task(task: Task, mine: list[EvalRecord], ctx: Context) -> None:
    cfg = ctx.config
    path = shard_path(ctx.pred_dir, task.key, cfg.shard_rank)
    start, count = time.perf_counter(), 0
    # log lines during the bar go through tqdm.write, so they never split a half-drawn bar
    with logging_redirect_tqdm(), tqdm(total=len(mine), desc=task.key, disable=None) as bar:
        for i in range(0, len(mine), cfg.batch_size):
            rows = evaluate_batch(task, mine[i : i + cfg.batch_size], ctx)
            append_jsonl(path, [{**r, "fingerprint": ctx.tag} if ctx.tag else r for r in rows])
            count += len(rows)
            bar.update(len(rows))
    rate = count / max(time.perf_counter() - start, 1e-9)
    ctx.stats[task.key] = rate
    logger.info("%s: %d rows at %.2f questions/s", task.key, count, rate)


# ------------------------------------------------------------------------------ merging and outputs
def merge_task(task: Task, records: list[EvalRecord], pred_dir: Path, num_shards: int,
               tag: str | None = None) -> tuple[list[dict], list[dict]]:
    """The task's rows in data order from every shard file (rows of another fingerprint are not taken), and a
    problem for each row no shard produced. Other ranks' files are only read."""
    by_uid: dict[str, dict] = {}
    for rank in range(num_shards):
        for row in read_jsonl(shard_path(pred_dir, task.key, rank)):  # read only: never repaired by rank 0
            if isinstance(row.get("uid"), str) and (tag is None or row.get("fingerprint") == tag):
                by_uid[row["uid"]] = row  # the last row of a uid (a failed judge request asked again)
    rows, missing = [], []
    for rec in records:
        if rec.uid in by_uid:
            rows.append(by_uid[rec.uid])
        else:
            missing.append({"uid": rec.uid, "reason": f"{task.key}: no prediction (a shard did not finish)"})
    return rows, missing


_REPORT_HIDDEN = ("shard_rank", "merge_timeout_s", "run_id", "fingerprint_checked", "overwrite")


def finish(config: EvalConfig, tasks: list[Task], groups: dict, skipped: dict, problems: list[dict], fp: dict,
           warnings: list[str] | None = None, train: tuple[dict, list[str]] | None = None) -> dict:
    """Merge every task's rows, score them and write the outputs; ``problems`` is extended with the failed rows.
    Warnings (``warnings`` given, tasks mostly unscored, golds MedMax's rules never match, golds split into several
    tokens) go to the console, results.json's ``_warnings`` and the top of report.md."""
    pred_dir = config.output / PREDICTIONS
    results: dict = {}
    layout: dict = {}
    warnings = list(warnings or [])
    quality = fid.GenerationQuality(config.output, config.fid_features, config.fid_real, config.fid_kind, config.fid_pool,
                                    config.device or "cpu", config.seed)
    for task in tasks:
        if task.key in skipped:
            results[task.key] = {"skipped": skipped[task.key]}
            continue
        rows, missing = merge_task(task, groups[task.key], pred_dir, config.num_shards, fingerprint.row_tag(fp))
        problems += missing + [{"uid": r["uid"], "reason": r["error"]} for r in rows if r.get("error")]
        write_jsonl(pred_dir / f"{task.key}.jsonl", rows)
        results[task.key] = report.task_metrics(task, rows, config.protocol)
        if task.kind == "image_generation":
            results[task.key].update(quality.entry(task.key, rows))
        found = train and contamination.summarize(task.kind, [r for r in rows if not r.get("error")], train[0], task.key)
        if found:
            results[task.key]["contamination"] = found
        if task.kind == "image_editing":
            results[task.key].update(editing.summary(rows))
            warnings += editing.baseline_warnings(task.key, results[task.key])
        warnings += report.failure_warnings(task.key, rows)
        warnings += filter(None, [medmax_protocol.unmatchable_warning(task.key, results[task.key]),
                                  ablation.flag_line(task.key, results[task.key].get("image_ablation"))])
        scores = medmax_protocol.layout_scores(task, rows, config.protocol)
        if scores is not None:
            layout[task.key] = scores
    warnings += _split_gold_warnings(config, [t for t in tasks if t.key not in skipped], groups)
    for line in warnings:
        logger.warning("%s", line)
    if warnings:
        results["_warnings"] = warnings
    if problems:
        results["_problems"] = len(problems)
    if train:
        results["_train_data"] = train[1]
    beyond = sorted(k for k, e in results.items() if not k.startswith("_") and e.get("suite") == "beyond_medmax")
    if beyond:
        results["_beyond_medmax"] = beyond  # reported apart from MedMax's tasks, never averaged with them
    results.update({"_fingerprint": fp, "_protocol": config.protocol, "_toolkit_version": fp["toolkit_version"]})
    report.write_results(config.output / outputs.RESULTS, results)
    unmatchable = {k: e["n_unmatchable"] for k, e in results.items() if k in layout and "n_unmatchable" in e}
    report.write_results(config.output / outputs.RESULTS_MEDMAX, medmax_protocol.results_layout(layout, unmatchable))
    write_jsonl(config.output / outputs.PROBLEMS, problems)
    settings = {k: str(v) for k, v in asdict(config).items() if k not in _REPORT_HIDDEN}
    settings.update(fingerprint=fp["digest"], toolkit_version=fp["toolkit_version"])
    report.write_markdown(config.output / outputs.REPORT_MD, results, problems, settings)
    report.write_chart(config.output / outputs.REPORT_PNG, results)
    return results


def _split_gold_warnings(config: EvalConfig, tasks: list[Task], groups: dict) -> list[str]:
    """Under --protocol medmax (one new token for closed and MCQ answers): golds the tokenizer splits."""
    golds = {t.key: {str(r.answer) for r in groups[t.key] if medmax_protocol.matchable(t.kind, r.answer)}
             for t in tasks if medmax_protocol.applies(config.protocol, t) and t.kind in medmax_protocol.ONE_TOKEN_KINDS}
    if not any(golds.values()):
        return []
    from medmax.vocab import encode_text, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    return medmax_protocol.split_gold_warnings(golds, lambda text: [tokenizer.id_to_token(i) for i in encode_text(tokenizer, text)])


def _require_scores(config: EvalConfig, results: dict, problems: list[dict]) -> None:
    """Raise when not one row was scored, naming the first reason (after the outputs are written)."""
    entries = {k: e for k, e in results.items() if not k.startswith("_")}
    if any(e.get("n") or e.get("image_quality", {}).get("n_generated") for e in entries.values()):
        return
    skipped = {k: e["skipped"] for k, e in entries.items() if "skipped" in e}
    if problems:
        first = f"the first problem, {problems[0]['uid']}: {problems[0]['reason']}"
    else:
        first = "; ".join(f"{k} skipped: {why}" for k, why in sorted(skipped.items())[:3])
    if any("not found under" in p["reason"] for p in problems):
        where = "--data and --image-dir (its default depends on the release's layout)" if config.data_format != "medmax" else "--data"
        first += f" (image paths are read under {where})"
    n_rows = sum(e.get("n_errors", 0) for e in entries.values())
    raise EvalError(f"no row was scored ({n_rows} rows failed, {len(skipped)} of {len(entries)} tasks skipped); {first}; "
                    f"report.md and problems.jsonl in {config.output} list every reason")


def _spawn_workers(config: EvalConfig, argv: list[str], run_id: str, fp: dict) -> None:
    """--workers N: N local processes, each one shard of this launch; waits for all of them."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    extra = ["--workers", "1", "--num-shards", str(config.workers), "--run-id", run_id, "--fingerprint-checked", fp["digest"]]
    procs = [subprocess.Popen([sys.executable, "-m", "eval.run", *argv, *extra, "--shard-rank", str(r)], env=env)
             for r in range(config.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise ShardError(f"eval workers exited with codes {codes}; rerun the same command to resume")
    launch.wait_for_shards(config.output, config.workers, run_id, fingerprint.row_tag(fp), timeout_s=0)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**{k: v for k, v in vars(args).items()})


@program("medmax-eval")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    evaluate(config_from_args(args), argv)
    return 0


def evaluate(config: EvalConfig, argv: list[str] | None = None) -> dict | None:
    """Run (or resume) one evaluation; -> the results dict (None on a shard other than rank 0)."""
    tasks = select_tasks(config.tasks)
    if config.workers > 1 and (argv is None or launch.under_torchrun()):
        raise EvalError("--workers > 1 needs the command line to start its workers, and does not combine with torchrun")
    run_id, fp = _launch(config)
    records, problems = load_records(config.data, config.data_format, config.source, config.image_dir,
                                     split=config.split, lang=config.lang, trust_pickle=config.trust_pickle)
    n_rows = len(records) + len(problems)
    groups, unknown = group_records(records, tasks)
    problems += unknown
    unread = report.unread_warnings(n_rows, problems)
    groups = {k: apply_limit(v, config.limit, config.seed, k) for k, v in groups.items()}
    skipped = _skipped(config, tasks, groups)
    if config.workers > 1:
        _spawn_workers(config, argv, run_id, fp)
        config.num_shards = config.workers
    else:
        _run_shard(config, [t for t in tasks if t.key not in skipped], groups, run_id, fp)
        if config.shard_rank != 0:
            return None
        launch.wait_for_shards(config.output, config.num_shards, run_id, fingerprint.row_tag(fp), config.merge_timeout_s)
    results = finish(config, tasks, groups, skipped, problems, fp, unread, _match_training(config, tasks, groups, skipped))
    logger.info("wrote %s", config.output / outputs.RESULTS)
    _require_scores(config, results, problems)
    return results


def _match_training(config: EvalConfig, tasks: list[Task], groups: dict, skipped: dict) -> tuple[dict, list[str]] | None:
    """--train-data: each evaluated row's image and question looked up in the training data (eval/contamination.py)."""
    if not config.train_data:
        return None
    index = contamination.build_index(config.train_data)
    records = [rec for t in tasks if t.key not in skipped for rec in groups[t.key]]
    return contamination.match(records, config.data, config.model, index), index.notes


def _skipped(config: EvalConfig, tasks: list[Task], groups: dict) -> dict[str, str]:
    skipped = {}
    for task in tasks:
        if not groups[task.key]:
            skipped[task.key] = "no rows for this task in the data"
        elif task.needs_clip and config.clip_model is None and not (task.kind == "image_generation" and config.fid_features):
            skipped[task.key] = "no --clip-model (nor, for image generation, --fid-features) given; nothing to score it with"
        elif task.kind == "open" and config.protocol == "medmax" and not config.judge_url:
            skipped[task.key] = "--protocol medmax scores open answers with a GPT judge, and no --judge-url was given"
        if task.key in skipped and groups[task.key]:
            logger.warning("%s: skipped, %s", task.key, skipped[task.key])
    return skipped


def _run_shard(config: EvalConfig, tasks: list[Task], groups: dict, run_id: str, fp: dict) -> None:
    tag = fingerprint.row_tag(fp)
    launch.clear_marker(config.output, config.shard_rank)
    todo = {t.key: pending(t, groups[t.key], config, tag) for t in tasks}
    if any(todo.values()):  # a finished run only re-merges: no model load
        ctx = _setup(config, tasks)
        ctx.tag = tag
        if config.ablate_image:
            ctx.partners = {t.key: ablation.shuffle_partners(groups[t.key], config.seed, t.key) for t in tasks}
        for task in tasks:
            if todo[task.key]:
                run_task(task, todo[task.key], ctx)
    launch.write_marker(config.output, config.shard_rank, run_id, tag)


if __name__ == "__main__":
    sys.exit(main())
