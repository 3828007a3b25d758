"""mode: grpo on several processes: ``finetune/launch.sh --nproc-per-node 2`` (torchrun, gloo) on CPU.

The shipped CPU config, made tiny (preset model, 2 steps, groups of 3 drawings), trains on 2 processes with LoRA
and with full weights, and so does the 7B recipe (LoRA, DeepSpeed ZeRO-2, guided sampling) made tiny and float32.
A 2-process run equals a 1-process run holding both ranks' prompts (the same global batch): the same drawings (every
sample's seed comes from its place in the global batch), the same rewards, KL and clip figures (logged over both
ranks, not rank 0's alone), the same weights. Each rank scores whole groups, two ranks never draw the same group
even when they get the same prompt, the reference is the starting model on both ranks (KL 0 at step 1), and the run
resumes and exports. FSDP and ZeRO-3 are refused for mode grpo in one line.

The reward records what each rank drew (``GRPO_DRAWINGS``: a folder, one JSONL file per rank and call).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "finetune" / "configs" / "grpo_tiny_cpu.yaml"
G = 3
# SGD: the update is the learning rate times the gradient averaged over the processes, so the weights of a 2-process
# and a 1-process run agree to float rounding. Adam divides each gradient element by its own size: elements whose
# gradient is ~1e-9 (embedding rows of tokens no sample drew) then differ by up to 1e-4, from the all-reduce's rounding.
TINY = ["model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny", "report_to=none", "disable_tqdm=true",
        "max_length=256", f"grpo_num_generations={G}", "max_steps=2", "save_steps=1", "save_total_limit=2",
        "logging_steps=1", "optim=sgd", "learning_rate=1.0", "warmup_steps=0", "prompt_tasks=[]", "lora_r=4",
        "lora_alpha=8", f"rewards=[{__name__}:recorded_brightness]"]
FIGURES = ("loss", "grad_norm", "reward", "reward_std", "rewards/recorded_brightness/mean",
           "rewards/recorded_brightness/std", "rewards/recorded_brightness/failures", "kl", "clip_ratio",
           "completions/mean_length")


def recorded_brightness(samples) -> list[float]:
    """The drawing's mean grey level; each call's prompts and codes are appended to ``$GRPO_DRAWINGS/rank<R>.jsonl``."""
    folder = os.environ.get("GRPO_DRAWINGS")
    if folder:
        with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            f.write(json.dumps({"prompts": samples.prompts, "codes": [c[0] for c in samples.codes]}) + "\n")
    return [float(np.asarray(ims[0].convert("L")).mean()) / 255 for ims in samples.images]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Generate a scan: A grey scan with a {size} bright lesion in the {place}."}
            for size in ("small", "large") for place in ("upper left", "lower right")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _launch(output: Path, prompts: Path, *extra: str, resume: bool = False, config: Path = CONFIG) -> list[list[dict]]:
    """A 2-process run through launch.sh; -> each call of the reward as the ranks recorded it (rank 0, rank 1)."""
    drawings = output.parent / f"{output.name}-drawings"
    drawings.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_DRAWINGS": str(drawings), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(config), "--nproc-per-node", "2", *TINY,
                    f"datasets=[{prompts}]", f"output_dir={output}", *extra, *(["--resume"] if resume else [])],
                   check=True, cwd=ROOT, env=env, timeout=900)
    return [_calls(drawings / f"rank{r}.jsonl") for r in (0, 1)]


def _one_process(output: Path, prompts: Path, *extra: str, monkeypatch, config: Path = CONFIG) -> list[dict]:
    from finetune.train import main as train_main

    drawings = output.parent / f"{output.name}-drawings"
    drawings.mkdir(parents=True)
    monkeypatch.setenv("GRPO_DRAWINGS", str(drawings))
    train_main.__wrapped__(["--config", str(config), *TINY, f"datasets=[{prompts}]", f"output_dir={output}", *extra])
    return _calls(drawings / "rank0.jsonl")


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _steps(output: Path) -> list[dict]:
    history = [json.loads(line) for line in (output / "log_history.jsonl").read_text().splitlines()]
    return [h for h in history if "loss" in h]


def _weights(output: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (output / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(output / name)


@pytest.fixture(scope="module", params=["lora", "full"])
def runs(request, prompts, tmp_path_factory):
    """(weights, 2-process output, its drawings per rank, 1-process output, its drawings) for LoRA and full."""
    weights = request.param
    base = tmp_path_factory.mktemp(f"grpo-{weights}")
    two = _launch(base / "two", prompts, f"grpo_weights={weights}", "per_device_train_batch_size=2")
    with pytest.MonkeyPatch.context() as monkeypatch:
        one = _one_process(base / "one", prompts, f"grpo_weights={weights}", "per_device_train_batch_size=4",
                           monkeypatch=monkeypatch)
    return weights, base / "two", two, base / "one", one


@pytest.mark.slow  # 2 launches of 2 processes and 2 single runs: ~60 s of CPU, minutes on a loaded machine
def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    _, two_dir, two, one_dir, one = runs
    _assert_same_run(two_dir, two, one_dir, one)


@pytest.mark.slow  # ~60 s of CPU
def test_the_deepspeed_zero2_recipe_on_two_processes_equals_one_process(prompts, tmp_path, monkeypatch):
    """grpo_7b.yaml (LoRA, ZeRO-2, gradient checkpointing, guided sampling), made tiny and float32 for CPU."""
    pytest.importorskip("deepspeed")
    recipe, tiny = CONFIG.parent / "grpo_7b.yaml", ["use_cpu=true", "bf16=false", "model_dtype=float32",
                                                    "reward_settings={}", "gradient_accumulation_steps=1"]
    two = _launch(tmp_path / "two", prompts, *tiny, "per_device_train_batch_size=2", config=recipe)
    assert (tmp_path / "two" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's engine saved it
    one = _one_process(tmp_path / "one", prompts, *tiny, "deepspeed=null", "per_device_train_batch_size=4",
                       monkeypatch=monkeypatch, config=recipe)
    _assert_same_run(tmp_path / "two", two, tmp_path / "one", one)


def _assert_same_run(two_dir: Path, two: list[list[dict]], one_dir: Path, one: list[dict]) -> None:
    """The same drawings, logged figures (1e-4 relative; grad_norm 1e-3) and weights (1e-5) from 2 processes as from one."""
    # rank 0 holds the first half of each step's global batch, rank 1 the second: the same drawings as one process
    per_step = [a["codes"] + b["codes"] for a, b in zip(*two)]
    assert len(per_step) == len(one) == 2 and per_step == [c["codes"] for c in one]
    two_steps, one_steps = _steps(two_dir), _steps(one_dir)
    assert len(two_steps) == len(one_steps) == 2
    for a, b in zip(two_steps, one_steps):
        for key in FIGURES:  # grad_norm: a norm over gradients all-reduced in another order (measured 1.1e-4 apart)
            rel = 1e-3 if key == "grad_norm" else 1e-4
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (key, a[key], b[key])
    assert two_steps[0]["kl"] == 0.0 < two_steps[1]["kl"]  # step 1: each rank's reference is the starting policy
    a, b = _weights(two_dir), _weights(one_dir)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_each_rank_scores_whole_groups_of_its_own(runs):
    """A group is never split across ranks (each rank's reward call holds whole groups of one prompt each), and
    no two ranks draw the same continuation."""
    _, _, two, _, _ = runs
    for calls in two:
        for call in calls:
            groups = [call["prompts"][i : i + G] for i in range(0, len(call["prompts"]), G)]
            assert len(call["prompts"]) == 2 * G and all(len(set(g)) == 1 for g in groups)
    for a, b in zip(*two):
        assert not {json.dumps(c) for c in a["codes"]} & {json.dumps(c) for c in b["codes"]}


@pytest.mark.slow
def test_the_same_prompt_on_both_ranks_draws_different_groups(prompts, tmp_path):
    """Three prompts, two ranks of two: the global batch of step 2 wraps round, so both ranks may get one prompt;
    each sample's seed holds its place in the global batch, so they never draw the same group."""
    three = tmp_path / "three.jsonl"
    three.write_text("".join(prompts.read_text().splitlines(keepends=True)[:3]))
    ranks = _launch(tmp_path / "run", three, "grpo_weights=full", "per_device_train_batch_size=2")
    for a, b in zip(*ranks):
        assert not {json.dumps(c) for c in a["codes"]} & {json.dumps(c) for c in b["codes"]}
    calls = [c for rank in ranks for c in rank]
    codes = [json.dumps(c) for call in calls for c in call["codes"]]
    assert len(set(codes)) == len(codes)


@pytest.mark.slow
def test_a_two_process_run_resumes_and_exports(runs, prompts, tmp_path):
    from finetune.export import main as export_main
    from medmax.generation import Generator

    weights, two_dir, _, _, _ = runs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two_dir / "checkpoint-1", resumed / "checkpoint-1")
    _launch(resumed, prompts, f"grpo_weights={weights}", "per_device_train_batch_size=2", resume=True)
    first, again = _steps(two_dir)[-1], _steps(resumed)[-1]
    for key in FIGURES:
        assert again[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
    a, b = _weights(two_dir), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    export_main(["--checkpoint", str(two_dir / "checkpoint-2"), "--output", str(tmp_path / "model")])
    gen = Generator.from_dir(tmp_path / "model")
    assert gen.model.config.vocab_size > 0


@pytest.mark.parametrize("override, named", [("fsdp=true", "fsdp=True"),
                                             ("deepspeed={zero_optimization: {stage: 3}}", "ZeRO stage 3")])
def test_sharded_weights_are_refused_for_grpo_in_one_line(prompts, override, named):
    """Sampling calls the model's layers outside its forward (under FSDP on 2 CPU processes every rank stopped with
    "FSDP requires a single root module") and runs a different number of forwards on each rank (speculative
    decoding, text ending early), while FSDP and ZeRO-3 gather the weights inside the whole model's forward:
    refused when the config is read, before any process starts."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [*TINY, f"datasets=[{prompts}]", override])
    message = str(err.value)
    assert "mode=grpo" in message and named in message and "forwards" in message and "\n" not in message
