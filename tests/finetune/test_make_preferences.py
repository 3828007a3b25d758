"""finetune.make_preferences: MMedPO's two kinds of dispreferred answer, local noising, weights, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.make_preferences import main
from medmax.preference_mining import Box, changed_share, noise_region, question_type, random_box, swap_answer
from medmax.data.preference_loader import load_preferences
from medmax.synthetic import write_dataset
from tokenization.build_preferences import main as build_main


def test_swapped_answers_keep_the_question_type():
    rng = np.random.default_rng(0)
    assert swap_answer("closed", "Is there a lesion?", "yes", rng) == "no"
    assert swap_answer("closed", "Is there a lesion?", "No.", rng) == "yes"
    mcq = "Where is the lesion? A) upper left B) upper right C) lower left D) lower right"
    picked = {swap_answer("mcq", mcq, "B", rng) for _ in range(40)}
    assert picked == {"A", "C", "D"}
    assert swap_answer("mcq", "Which?", "B", rng, options=["x", "y"]) == "A"
    assert swap_answer("open", "Where?", "upper left", rng, pool=["upper left", "lower right"]) == "lower right"
    assert swap_answer("open", "Where?", "upper left", rng, pool=["upper left"]) is None
    assert question_type(mcq, "C") == "mcq" and question_type("Is it?", "Yes") == "closed"
    assert question_type("Where?", "upper left") == "open"


def test_noise_touches_only_the_region_and_the_weight_counts_changed_codes():
    pixels = torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)
    box = Box(0.25, 0.5, 0.75, 1.0)
    noised = noise_region(pixels, box.mask(16, 16), 0.9, torch.Generator().manual_seed(0))
    inside = box.mask(16, 16)
    assert torch.equal(noised[:, ~inside], pixels[:, ~inside])
    assert (noised[:, inside] != pixels[:, inside]).float().mean() > 0.99 and inside.sum() == 8 * 8
    assert noised.min() >= -1 and noised.max() <= 1
    assert changed_share([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    side = random_box(np.random.default_rng(1), 0.4)
    assert side.x1 - side.x0 == pytest.approx(0.4) and 0 <= side.x0 and side.y1 <= 1
    with pytest.raises(ValueError, match="lesion_box"):
        Box.parse([0.5, 0.2, 0.4, 0.9], "lesion_box")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    write_dataset(root, 6, 3, seed=0)
    return root


def test_pairs_from_eval_and_training_rows_build_into_a_preference_folder(tmp_path, tiny_model_dir, scans, capsys):
    rows = [json.loads(line) for line in (scans / "eval" / "eval.jsonl").read_text().splitlines()]
    rows[0]["weight"] = 0.3
    rows[1]["lesion_box"] = [0.1, 0.1, 0.6, 0.6]
    rows.append({**rows[2], "image_path": "../../outside.png"})  # leaves the image root
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs.jsonl"
    argv = ["--model", str(tiny_model_dir), "--input", str(src), str(scans / "train.jsonl"), "--image-root",
            str(scans), "--output", str(out), "--image-pairs", "mirror", "--batch-size", "8"]
    main(argv)
    made = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [json.loads(line) for line in Path(f"{out}.errors.jsonl").read_text().splitlines()]
    assert any(e["row"] == len(rows) and "leaves" in e["reason"] for e in errors)
    text = [m for m in made if m["question_type"] != "generation"]
    for m in text:
        assert m["chosen"] != m["rejected"] and len(m["images"]) == 1 and m["prompt"].startswith("<image>")
    gold = {(r["prompt"], r["image_path"]): r["answer"] for r in rows[:-1]}
    for m in text:
        if (m["prompt"][len("<image>"):], m["image_path"]) in gold:
            assert m["chosen"] == gold[(m["prompt"][len("<image>"):], m["image_path"])]
    first = [m for m in text if m["source"] == f"{src}:1"]
    assert first and all(m["weight"] == 0.3 for m in first)
    noise = [m for m in made if m["kind"] == "noise" and m["source"] != f"{src}:1"]
    assert all(0 < m["weight"] <= 1 for m in noise)
    images = [m for m in made if m["kind"] == "image_mirror"]
    assert images and all(m["chosen"]["image_tokens"] != m["rejected"]["image_tokens"] for m in images)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["pairs"] == len(made) and summary["left_out"]["unreadable_row"] >= 1
    build_main(["--input", str(out), "--tokenizer", str(tiny_model_dir), "--output", str(tmp_path / "folder"),
                "--no-progress", "--strict"])
    assert len(load_preferences(tmp_path / "folder")) == len(made)
    capsys.readouterr()
    assert main(argv) == 2  # one error line naming the flag, not a traceback
    assert "--overwrite" in capsys.readouterr().err
