"""What a tiny finetune.train run prints: log lines, without libraries' noise or progress-bar fragments."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[2]
CONFIG = str(ROOT / "finetune" / "configs" / "tiny_cpu.yaml")
NOISE = {
    "DDP's find_unused_parameters warning": "find_unused_parameters=True",
    "DeepSpeed's accelerator notice": "Setting accelerator to CPU",
    "a progress bar": "it/s]",
    "a carriage return": "\r",
    "transformers' printed log dict": "{'loss'",
}


def _console(tmp_path: Path, data: Path, launcher: list[str], *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "finetune.train", "--config", CONFIG, f"datasets=[{data}]",
                           f"output_dir={tmp_path / 'run'}", "report_to=none", "max_length=128", "max_steps=2",
                           "logging_steps=1", "save_steps=2", "eval_steps=2", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_tiny_run_prints_log_lines_only(tmp_path, sequences, launcher):
    """One process, alone and under torchrun (DDP with one rank): no noise, and the metrics as log lines."""
    command = [sys.executable] if launcher == "python" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "localhost:0"]
    out = _console(tmp_path, sequences, command, *([] if launcher == "python" else ["ddp_backend=gloo"]))
    found = [what for what, text in NOISE.items() if text in out]
    assert not found, f"{found} in:\n{out[-4000:]}"
    assert re.search(r"INFO finetune\.trainer: step 1: loss \d", out), out[-4000:]
    assert re.search(r"INFO finetune\.trainer: step 2: eval_loss \d", out), out[-4000:]
