"""The image_editing task kind: PSNR and SSIM against references, and an eval.run over edit rows with the no-change baseline."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval.run as run
from eval.editing import psnr, ssim
from medmax.synthetic_edits import make_edit_pairs


def _direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM with an explicit normalised 11x11 Gaussian window (sigma 1.5), every fully covered pixel."""
    r = 5
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            a, b = x[i - r : i + r + 1, j - r : j + r + 1], y[i - r : i + r + 1, j - r : j + r + 1]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_direct_gaussian_window_computation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 20)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255)
    assert ssim(x, y) == pytest.approx(_direct_ssim(x, y), abs=1e-10)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, 255 - x) < 0  # anti-correlated structure


def test_psnr_known_values():
    a = Image.fromarray(np.zeros((8, 8), np.uint8))
    b = Image.fromarray(np.full((8, 8), 10, np.uint8))
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 100))
    assert psnr(a, a) == float("inf")


@pytest.fixture(scope="module")
def edit_run(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("edits")
    (data / "img").mkdir()
    rows = []
    for i, p in enumerate(make_edit_pairs(1, seed=3)[:2]):
        p.source.save(data / f"img/{i}_in.png"), p.target.save(data / f"img/{i}_out.png")
        rows.append({"task_name": "synthetic_edit", "question_type": "image_editing", "prompt": p.instruction,
                     "answer": f"img/{i}_out.png", "image_path": f"img/{i}_in.png",
                     "edit": {"kind": p.kind, "position": p.position, "size": p.size}})
    rows[1]["input_images"] = ["img/1_in.png", "img/0_in.png"]  # two input images
    rows.append({**rows[0], "image_path": None})  # an instruction without an input image
    (data / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("out") / "run"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--tasks",
                     "synthetic_edit", "--device", "cpu"]) == 0
    return out


def test_edit_rows_are_scored_against_target_and_no_change_baseline(edit_run):
    results = json.loads((edit_run / "results.json").read_text())
    entry = results["synthetic_edit"]
    assert entry["metric"] == "psnr" and entry["n"] == 2 and entry["n_errors"] == 1
    assert set(entry["edit_success_by_kind"]) == {"remove", "move"}
    assert all(k["no_change"] == 0.0 for k in entry["edit_success_by_kind"].values())
    rows = [json.loads(line) for line in (edit_run / "predictions" / "synthetic_edit.jsonl").read_text().splitlines()]
    assert "needs an input image" in rows[2]["error"]
    for row in rows[:2]:
        image = Image.open(edit_run / row["output_image"])
        assert 0 < row["ssim"] <= 1 and np.isfinite(row["no_change_psnr"]) and image.size[0] == image.size[1]


def test_report_says_when_the_model_does_not_beat_no_change(edit_run):
    results = json.loads((edit_run / "results.json").read_text())
    report = (edit_run / "report.md").read_text()
    lines = [w for w in results["_warnings"] if "no-change baseline" in w]
    assert lines and all(w in report for w in lines)  # a random tiny model does not beat the input on every measure
