"""The README's volume evidence, reduced (bench/volume_evidence.py --reduced): volumes -> tokens -> training ->
answers with the whole volume and with one slice.

Slow (a VQGAN, tokenization, a short training and two measurements: minutes on 2 cores): ``pytest -m slow``.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "volume_evidence.py"


@pytest.mark.slow
def test_reduced_volume_evidence_runs_every_step_and_measures_both_conditions(tmp_path):
    evidence = runpy.run_path(str(SCRIPT), run_name="volume_evidence")
    assert evidence["main"](["--output", str(tmp_path / "run"), "--reduced"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["results"]) == {"presence", "third", "side"}
    for entry in summary["results"].values():
        assert entry["n"] > 0 and all(0.0 <= entry[k] <= 1.0 for k in ("volume", "one_slice", "chance"))
    manifest = json.loads((tmp_path / "run" / "tokens" / "manifest.json").read_text())
    assert manifest["kind"] == "volumes" and manifest["rows"]["failed"] == 0
