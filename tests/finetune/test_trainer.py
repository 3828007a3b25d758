"""finetune.trainer: a non-finite loss or gradient stops the run in one line naming the step and the row, saving nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from finetune.train import main as train_main
from tokenization.build_preferences import main as build_main

CONFIG = str(Path(__file__).parents[2] / "finetune" / "configs" / "tiny_cpu.yaml")


def _error_line(capsys) -> str:
    """The program's one error line (other stderr lines are logging and libraries' output)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _saved(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-") or p.suffix == ".safetensors")


def test_a_diverging_supervised_run_stops_naming_step_and_row_and_saves_nothing(tmp_path, sequences, capsys):
    """A learning rate of 1e30 makes step 1's weights overflow: step 2's loss is NaN (transformers logs a mean)."""
    out = tmp_path / "run"
    code = train_main(["--config", CONFIG, f"datasets=[{sequences}]", f"output_dir={out}", "report_to=none",
                       "disable_tqdm=true", "validation=null", "max_length=128", "per_device_train_batch_size=2",
                       "packing=false", "learning_rate=1e30", "warmup_steps=0", "max_steps=4", "save_steps=1"])
    err = _error_line(capsys)
    assert code == 2 and re.fullmatch(rf"medmax-train: error: step 2: the training loss is nan on rows? "
                                      rf"{re.escape(str(sequences))} sequence \d+.*nothing of it was saved.*", err), err
    assert _saved(out) == ["checkpoint-1"]  # step 1 was finite; step 2 never changed or saved anything


def _preferences(tmp_path: Path, tokenizer_path: Path, weights: dict[int, float]) -> Path:
    """A preference folder of 6 pairs; the weights at ``weights``' positions are written into its shard afterwards
    (as a folder built before build_preferences refused such weights holds them)."""
    rows = [{"prompt": f"Is there a lesion {i}?", "chosen": "yes" if i % 2 else "no",
             "rejected": "no" if i % 2 else "yes"} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "prefs"
    build_main(["--input", str(tmp_path / "rows.jsonl"), "--tokenizer", str(tokenizer_path), "--output", str(folder),
                "--no-progress", "--strict"])
    (shard,) = json.loads((folder / "manifest.json").read_text())["files"]
    table = pq.read_table(folder / shard)
    column = table.column("weight").to_pylist()
    for position, weight in weights.items():
        column[position] = weight
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(column, pa.float64()))
    pq.write_table(table, folder / shard)
    return folder


def _dpo_failure(tmp_path: Path, model_dir: Path, tokenizer_path: Path, capsys, weights: dict[int, float],
                 *overrides: str) -> tuple[Path, str]:
    """(preference folder, the error line) of a full-weights DPO run on 6 pairs with ``weights``, which must fail
    with exit 2 before saving anything."""
    prefs = _preferences(tmp_path, tokenizer_path, weights)
    capsys.readouterr()
    code = train_main([f"model={model_dir}", f"datasets=[{prefs}]", f"output_dir={tmp_path / 'run'}", "mode=dpo",
                       "report_to=none", "disable_tqdm=true", "use_cpu=true", "max_length=128", "max_steps=2",
                       "save_steps=1", "logging_steps=1", "dpo_weights=full", "dataloader_num_workers=0",
                       "per_device_train_batch_size=6", *overrides])
    assert code == 2
    assert not (tmp_path / "run").exists() or _saved(tmp_path / "run") == []
    return prefs, _error_line(capsys)


def test_a_preference_weight_infinite_in_float32_is_refused_before_any_step(tmp_path, tiny_model_dir,
                                                                            tiny_tokenizer_path, capsys):
    """1e39 is finite as float64 and inf as float32: DPO exited 0, logged loss 0 and saved NaN weights."""
    prefs, err = _dpo_failure(tmp_path, tiny_model_dir, tiny_tokenizer_path, capsys, {4: 1e39})
    assert err == (f"medmax-train: error: {prefs}: pair 4 has weight 1e+39, outside 0..3.403e+38 (finite as float32; "
                   "1 of 6 pairs): training would stop at its loss. Rebuild the folder with "
                   "tokenization.build_preferences, whose rows name their weights")


def test_a_non_finite_dpo_loss_stops_naming_the_pair(tmp_path, tiny_model_dir, tiny_tokenizer_path, capsys):
    """IPO's loss is 25 a pair at the start: a weight of 3e38, finite in float32, makes that pair's loss inf."""
    prefs, err = _dpo_failure(tmp_path, tiny_model_dir, tiny_tokenizer_path, capsys, {4: 3e38}, "dpo_loss_type=ipo")
    assert re.fullmatch(rf"medmax-train: error: step 1: the training loss is (inf|nan) on row "
                        rf"{re.escape(str(prefs))} pair 4; .*", err), err


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_step(tmp_path, tiny_model_dir, tiny_tokenizer_path,
                                                                 capsys):
    """A weight of 3e38 keeps the hinge loss finite in float32 but overflows the gradient's norm."""
    prefs, err = _dpo_failure(tmp_path, tiny_model_dir, tiny_tokenizer_path, capsys, {1: 3e38}, "dpo_loss_type=hinge")
    assert re.fullmatch(rf"medmax-train: error: step 1: the gradient norm is (inf|nan) after rows? "
                        rf"{re.escape(str(prefs))} pair \d.*", err), err


def test_max_seconds_stops_with_a_checkpoint_that_resume_continues(tmp_path, sequences, caplog):
    out = tmp_path / "run"
    argv = ["--config", CONFIG, f"datasets=[{sequences}]", f"output_dir={out}", "report_to=none", "disable_tqdm=true",
            "validation=null", "max_length=128", "per_device_train_batch_size=2", "max_steps=3", "save_steps=100",
            "logging_steps=1"]
    train_main.__wrapped__(argv + ["max_seconds=1e-6"])
    assert "stopping after step 1 of 3: max_seconds=1e-06 reached" in caplog.text
    assert _saved(out) == ["checkpoint-1", "model.safetensors"]  # saved where it stopped, not at save_steps
    train_main.__wrapped__(argv + ["--resume"])  # max_seconds may change on resume: no bound this time
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]


def test_max_seconds_must_be_positive():
    from finetune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"max_seconds=0: must be > 0"):
        load_config(CONFIG, ["max_seconds=0"])
