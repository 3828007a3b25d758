"""The README's GRPO evidence, reduced (bench/grpo_evidence.py --reduced): quickstart SFT -> GRPO -> measures.

Slow (a reduced quickstart, two GRPO steps with the lesion-locator reward and two evaluations: minutes on 2 cores):
``pytest -m slow``. Two steps cannot be asked to raise faithfulness; the run must complete, log TRL's metric names
with a reward that varies within groups, and leave closed / MCQ accuracy measurable.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_reduced_grpo_evidence_runs_and_measures_before_and_after(tmp_path):
    spec = importlib.util.spec_from_file_location("grpo_evidence", ROOT / "bench" / "grpo_evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    assert evidence.main(["--output", str(tmp_path / "run"), "--reduced"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name in ("sft", "locator"):
        assert summary[name]["faithfulness"]["n"] > 0 and math.isfinite(summary[name]["fid"]["fid"])
        assert {"closed", "mcq"} <= set(summary[name]["eval"])
    history = [json.loads(line) for line in
               (tmp_path / "run" / "grpo_locator" / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    assert steps and all(k in steps[-1] for k in ("reward", "reward_std", "kl", "clip_ratio",
                                                   "rewards/lesion_locator/mean"))
