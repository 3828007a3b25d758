"""The README's DPO evidence, reduced (bench/dpo_evidence.py --reduced): quickstart SFT -> pairs -> DPO -> measures.

Slow (a reduced quickstart, curation, DPO and two evaluations: minutes on 2 cores): ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_reduced_dpo_evidence_moves_held_out_preferences_and_keeps_closed_accuracy(tmp_path):
    spec = importlib.util.spec_from_file_location("dpo_evidence", ROOT / "bench" / "dpo_evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    assert evidence.main(["--output", str(tmp_path / "run"), "--reduced"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kinds = summary["pairs"]["train"]
    assert kinds.get("noise", 0) > 0 and kinds.get("image_mirror", 0) > 0
    assert sum(v for k, v in kinds.items() if k.startswith("hallucination")) > 0
    before, after = summary["sft"], summary["dpo"]
    text_before, text_after = before["heldout_preferences"]["text"], after["heldout_preferences"]["text"]
    assert text_after["reward_accuracy"] > 0.6  # DPO's implicit reward ranks unseen pairs (chance: 0.5)
    assert text_after["model_prefers_chosen"] >= text_before["model_prefers_chosen"]
    assert after["eval"]["closed"] >= before["eval"]["closed"] - 0.05  # few questions: a coarse bound
    history = [json.loads(line) for line in (tmp_path / "run" / "dpo" / "log_history.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in h for h in history)
