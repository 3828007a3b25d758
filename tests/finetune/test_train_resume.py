"""finetune.train --resume on a finished run, and with another model: nothing changes, or a refusal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from finetune.config import ConfigError
from finetune.train import main as train_main
from medmax.presets import make_model_dir

CONFIG = str(Path(__file__).parents[2] / "finetune" / "configs" / "tiny_cpu.yaml")
FINAL = ("model.safetensors", "trainer_state.json", "log_history.jsonl", "medmax_run.json")


def _train(out: Path, data: Path, *overrides: str, resume: bool = False) -> Path:
    small = ["max_length=128", "per_device_train_batch_size=2", "max_steps=2", "save_steps=2", "logging_steps=1",
             "validation=null", "lr_scheduler_type=constant", "warmup_steps=0"]
    argv = ["--config", CONFIG, f"datasets=[{data}]", f"output_dir={out}", "report_to=none", "disable_tqdm=true",
            *small, *overrides]
    train_main.__wrapped__(argv + (["--resume"] if resume else []))
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FINAL if (out / name).is_file()}


def test_resuming_a_finished_run_changes_nothing(tmp_path, sequences, caplog):
    """A kill during teardown (after the final save) makes a finished run look failed; --resume must not train."""
    out = _train(tmp_path / "run", sequences)
    before = _snapshot(out)
    assert set(before) == set(FINAL)
    caplog.clear()
    _train(out, sequences, resume=True)
    assert _snapshot(out) == before  # bit-identical weights, state and history
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "finished at step 2 (max_steps=2)" in caplog.text and "nothing changed" in caplog.text


def test_resuming_a_finished_run_of_whole_epochs_changes_nothing(tmp_path, sequences, caplog):
    """Without max_steps: 7 packed rows in batches of 2 make 4 steps an epoch, and the run ends with the epoch."""
    out = _train(tmp_path / "run", sequences, "max_steps=-1", "num_train_epochs=1", "save_steps=4")
    before = _snapshot(out)
    assert json.loads(before["trainer_state.json"])["global_step"] == 4
    _train(out, sequences, "max_steps=-1", "num_train_epochs=1", "save_steps=4", resume=True)
    assert _snapshot(out) == before
    assert "finished at step 4 (max_steps=4)" in caplog.text and "nothing changed" in caplog.text


def test_resuming_a_run_killed_before_its_final_save_writes_the_last_checkpoints_weights(tmp_path, sequences, caplog):
    out = _train(tmp_path / "run", sequences)
    final = (out / "model.safetensors").read_bytes()
    for name in FINAL:
        (out / name).unlink()
    caplog.clear()
    _train(out, sequences, resume=True)
    assert (out / "model.safetensors").read_bytes() == final
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == final
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "finished at step 2 (max_steps=2)" in caplog.text


def test_resuming_a_finished_dpo_run_changes_nothing(tmp_path, tiny_model_dir, yes_no_preferences, caplog):
    prefs = yes_no_preferences(tmp_path, 8)
    argv = [f"model={tiny_model_dir}", f"datasets=[{prefs}]", f"output_dir={tmp_path / 'run'}", "mode=dpo",
            "report_to=none", "disable_tqdm=true", "use_cpu=true", "max_length=128", "per_device_train_batch_size=2",
            "max_steps=2", "save_steps=2", "logging_steps=1", "learning_rate=0.05", "lr_scheduler_type=constant",
            "dataloader_num_workers=0", "dpo_weights=full"]
    train_main.__wrapped__(argv)
    before = _snapshot(tmp_path / "run")
    train_main.__wrapped__(argv + ["--resume"])
    assert _snapshot(tmp_path / "run") == before
    assert not (tmp_path / "run" / "checkpoint-3").exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_refuses_another_model(tmp_path, sequences, tiny_vqgan, mode):
    """The model's content is in the fingerprint: another folder's weights (or another preset seed) are refused."""
    model_a = make_model_dir(tmp_path / "a", "tiny", vqgan=tiny_vqgan, seed=0)
    model_b = make_model_dir(tmp_path / "b", "tiny", vqgan=tiny_vqgan, seed=1)
    out = tmp_path / "run"
    common = ["model_dtype=float32", f"mode={mode}", "tokenizer=null", "vqgan=null", "max_steps=1", "save_steps=1"]
    _train(out, sequences, f"model={model_a}", *common)
    with pytest.raises(ConfigError, match=r"another model.*--resume-anyway"):
        _train(out, sequences, f"model={model_b}", *common, "max_steps=2", resume=True)
    moved = shutil.copytree(model_a, tmp_path / "moved")  # the same weights elsewhere are the same model
    _train(out, sequences, f"model={moved}", *common, "max_steps=2", resume=True)
    assert (out / "checkpoint-2").is_dir()
    preset = tmp_path / "preset"
    _train(preset, sequences, "max_steps=1", "save_steps=1", f"mode={mode}")
    with pytest.raises(ConfigError, match=re.escape("another model (preset:tiny seed 0, this run preset:tiny seed 1)")):
        _train(preset, sequences, "max_steps=2", "save_steps=1", f"mode={mode}", "seed=1", resume=True)


def test_resume_refuses_settings_that_change_the_rows_or_what_trains(tmp_path, sequences):
    out = _train(tmp_path / "run", sequences, "max_steps=1", "save_steps=1", "mode=lora")
    for override, named in (("max_length=96", "max_length=128 (this run: 96)"), ("packing=false", "packing=True"),
                            ("seed=3", "seed=0 (this run: 3)"), ("lora_r=4", "lora_r=16 (this run: 4)"),
                            (r"freeze=[lm_head]", "freeze=[] (this run: ['lm_head'])")):
        with pytest.raises(ConfigError, match=re.escape(named) + ".*--resume-anyway"):
            _train(out, sequences, "max_steps=2", "save_steps=1", "mode=lora", override, resume=True)
