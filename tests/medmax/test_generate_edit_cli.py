"""`medmax generate --image IN --mode image [--edit-mask ...]`: image-conditioned generation and inpainting from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medmax.__main__ import main
from medmax.generation.editing import model_grid, region_from_box
from medmax.generation.prompts import PromptEncoder
from medmax.model import load_model_dir


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_mask_draws_only_its_region_of_the_input(tiny_model_dir, scan, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_model_dir), "--image", str(scan), "--prompt", "Remove the lesion.",
                 "--mode", "image", "--edit-mask", "20,0,60,35", "--output", str(out), "--device", "cpu",
                 "--image-temperature", "1", "--seed", "2"]) == 0
    record = json.loads((out / "generation.json").read_text())
    bundle = load_model_dir(tiny_model_dir)
    (source,) = PromptEncoder(bundle.tokenizer, bundle.vocab, bundle.vqgan, 4096).encode_images([Image.open(scan).convert("RGB")])
    resolution, grid = model_grid(tiny_model_dir)
    outside = ~region_from_box((20, 0, 60, 35), (90, 70), resolution, grid).reshape(-1)
    assert outside.any() and (~outside).any()
    assert (np.array(record["segments"][0]["codes"])[outside] == np.array(source)[outside]).all()
    assert record["edit_mask"] == "20,0,60,35" and record["images"] == [str(scan)]


@pytest.mark.parametrize("extra, message", [
    (["--edit-mask", "0,0,10,10"], "no --image to edit"),
    (["--image", "{scan}", "--edit-mask", "0,0,91,10"], "outside the 90x70 image or empty"),
    (["--image", "{scan}", "--edit-mask", "{empty}"], "empty"),
    (["--image", "{scan}", "--edit-mask", "{grid32}"], "neither the input image's 90x70 nor the model's"),
    (["--image", "{scan}", "--edit-mask", "0,0,10,10", "--mode", "text"], "needs --mode image"),
])
def test_bad_edit_masks_fail_in_one_line_before_loading(tiny_model_dir, scan, tmp_path, capsys, monkeypatch, extra, message):
    import medmax.generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(medmax.generation.Generator, "from_dir", refuse)
    Image.new("L", (90, 70)).save(tmp_path / "empty.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "grid32.png")
    paths = {"scan": scan, "empty": tmp_path / "empty.png", "grid32": tmp_path / "grid32.png"}
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "Edit", "--output", str(tmp_path / "out"),
            *[a.format(**paths) for a in extra]]
    if "--mode" not in argv:
        argv += ["--mode", "image"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
