"""The quickstart's VQGAN is bounded by steps, never by wall time: the same seed trains the same weights anywhere."""

import csv
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quickstart
from medmax.synthetic import make_scans
from tokenization.train_vqgan import main as train_vqgan


class _Stop(Exception):
    pass


def test_the_quickstart_trains_its_vqgan_for_a_number_of_steps_never_for_a_time(monkeypatch, tmp_path):
    """Step 2's command as main builds it, full and reduced (the run stops there)."""
    commands = {}

    def record(self, name, cmd, **kw):
        commands[name] = [str(c) for c in cmd]
        raise _Stop

    monkeypatch.setattr(quickstart.Steps, "run", record)
    monkeypatch.setattr(quickstart, "_prepare", lambda out, sizes, seed: {"train_images_csv": out / "images.csv"})
    for flags, steps in (([], 300), (["--reduced"], 100)):
        with pytest.raises(_Stop):
            quickstart.main.__wrapped__(["--output", str(tmp_path / "run"), *flags])
        cmd = commands["2 vqgan"]
        assert "--max-seconds" not in cmd and cmd[cmd.index("--steps") + 1] == str(steps)
    source = Path(quickstart.__file__).read_text()
    assert not re.search(r"max[-_]seconds|deadline|timeout", source)  # no other stage stops on the clock


@pytest.mark.slow  # two trainings of the 64 px tiny VQGAN: ~10 s quiet, over a minute on a loaded machine
def test_two_runs_of_the_vqgan_stage_with_the_same_seed_give_identical_weights(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    scans = make_scans(8, seed=5, size=64)
    for scan in scans:
        scan.image.save(data / f"{scan.name}.png")
    with open(data / "images.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img_path"]] + [[f"{s.name}.png"] for s in scans])
    weights = []
    for run in ("a", "b"):
        args = quickstart.vqgan_args(data / "images.csv", tmp_path / run, steps=2, seed=3)
        args[args.index("--batch-size") + 1] = 4  # the test's size; everything else as the quickstart runs it
        assert train_vqgan([str(a) for a in args] + ["--no-progress"]) == 0
        weights.append(load_file(tmp_path / run / "vqgan.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
