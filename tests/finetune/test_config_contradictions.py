"""Settings that contradict each other stop when the config is read, in one line naming both (issue 14, section 4).

Before, each of these reached transformers or accelerate: some died in a raw traceback inside every rank after the
model and the data had loaded (``validation=null`` over ``eval_strategy: steps``; ``fsdp`` with ``deepspeed``),
others were dropped without a word (an ``fsdp_config`` without ``fsdp``; FSDP1 keys under FSDP2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import ConfigError, check_world_size, load_config

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "finetune" / "configs"


def _refused(config: str, overrides: list[str], *named: str, **extra) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / config, overrides, **extra)
    message = str(err.value)
    assert "\n" not in message, message
    for name in named:
        assert name in message, (name, message)
    return message


def test_evaluation_without_validation_names_both():
    """quickstart.yaml sets eval_strategy: steps; validation=null used to die in Trainer inside every rank."""
    message = _refused("quickstart.yaml", ["validation=null"], "eval_strategy=steps", "validation")
    assert message.startswith(str(CONFIGS / "quickstart.yaml"))


@pytest.mark.parametrize("override, named", [
    ("load_best_model_at_end=true", "load_best_model_at_end=true"),
    ("lr_scheduler_type=reduce_lr_on_plateau", "lr_scheduler_type=reduce_lr_on_plateau"),
])
def test_settings_that_need_an_evaluation_need_validation(override, named):
    _refused("tiny_cpu.yaml", ["validation=null", override], named, "validation")


def test_best_model_needs_saves_when_it_evaluates():
    _refused("tiny_cpu.yaml", ["load_best_model_at_end=true", "save_strategy=epoch"],
             "load_best_model_at_end=true", "save_strategy=epoch", "eval_strategy=steps")


def test_fsdp_and_deepspeed_together_are_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    _refused("full_7b_fsdp.yaml", ["deepspeed=finetune/configs/ds_zero2.json"], "fsdp", "deepspeed=", use_cpu=True)


def test_fsdp_config_without_fsdp_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    _refused("full_7b_fsdp.yaml", ["fsdp=null"], "fsdp_config=finetune/configs/fsdp_7b.json", "fsdp", use_cpu=True)


def test_fsdp1_settings_under_fsdp2_are_refused(tmp_path):
    """transformers reads backward_prefetch, use_orig_params... only for version 1 and drops them for FSDP2."""
    path = tmp_path / "fsdp1.json"
    path.write_text(json.dumps({"backward_prefetch": "backward_pre", "use_orig_params": True}))
    _refused("tiny_cpu.yaml", ["fsdp=true", f"fsdp_config={path}"], "backward_prefetch", "use_orig_params",
             "version")
    path.write_text(json.dumps({"version": 1, "use_orig_params": True}))
    load_config(CONFIGS / "tiny_cpu.yaml", ["fsdp=true", f"fsdp_config={path}", "use_cpu=false"])  # FSDP1 reads them
    _refused("tiny_cpu.yaml", ["fsdp=true", f"fsdp_config={path}"], "version 1", "use_cpu=true")  # not on CPU


def test_two_activation_checkpointings_are_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    _refused("full_7b_fsdp.yaml", ["gradient_checkpointing=true"], "gradient_checkpointing=true",
             "activation_checkpointing", use_cpu=True)


def test_bf16_without_a_gpu_or_use_cpu_names_use_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused("tiny_cpu.yaml", ["use_cpu=false", "bf16=true"], "bf16=true", "use_cpu")


def test_fp16_on_cpu_is_refused():
    _refused("tiny_cpu.yaml", ["fp16=true"], "fp16=true", "use_cpu=true")


def test_padding_rows_to_max_length_needs_packing():
    _refused("tiny_cpu.yaml", ["packing=false", "pad_to_max_length=true"], "pad_to_max_length=true", "packing=false")


def test_transformers_own_checks_become_one_line_config_errors():
    """save_steps not a multiple of eval_steps: transformers' message, prefixed with the file, on one line."""
    _refused("tiny_cpu.yaml", ["load_best_model_at_end=true", "save_steps=5", "eval_steps=3"], "tiny_cpu.yaml",
             "5", "3")


def test_fsdp_needs_more_than_one_process():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["fsdp=true"])
    with pytest.raises(ConfigError, match=r"fsdp.*1 process.*--nproc-per-node"):
        check_world_size(cfg, 1)
    check_world_size(cfg, 2)
    check_world_size(load_config(CONFIGS / "tiny_cpu.yaml"), 1)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_contradict_nothing(path, monkeypatch):
    """Every shipped recipe passes these checks as shipped (use_cpu only where it asks for bf16 on a GPU)."""
    monkeypatch.chdir(ROOT)
    extra = {"use_cpu": True} if "bf16: true" in path.read_text() else {}
    if "deepspeed:" in path.read_text():
        pytest.importorskip("deepspeed")
    load_config(path, **extra)


def test_launch_script_reports_a_contradiction_once_before_starting_processes(tmp_path):
    import os
    import subprocess

    run = subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(CONFIGS / "quickstart.yaml"), "--nproc-per-node",
                          "2", "validation=null", f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("eval_strategy=steps evaluates on validation") == 1, run.stderr
    assert "torch.distributed" not in run.stderr and not (tmp_path / "out").exists()
