"""eval.compare (issue 28): paired tests between two runs, and one-line refusals for runs that cannot pair."""

import json
import re

import pytest
from PIL import Image
from scipy import stats as sps

import eval.compare as compare
import eval.run as run


def _data(root, answers):
    root.mkdir()
    rows = []
    for i, answer in enumerate(answers):
        Image.new("RGB", (40, 40), (50 * i, 80, 20)).save(root / f"{i}.png")
        rows.append({"task_name": "vqa_rad", "question_type": "closed", "prompt": "Is it normal?", "answer": answer,
                     "image_path": f"{i}.png"})
        rows.append({"task_name": "slake", "question_type": "open", "prompt": "Where?", "answer": "left lung",
                     "image_path": f"{i}.png"})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(model, data, out, *extra):
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--tasks", "vqa_rad_closed,slake_open",
            "--device", "cpu", *extra]
    assert run.main(argv) == 0
    return out


def test_two_runs_of_the_same_data_are_paired_per_task_and_charted(tiny_model_dir, tmp_path, capsys):
    data = _data(tmp_path / "data", ["yes", "no", "yes"])
    a = _run(tiny_model_dir, data, tmp_path / "a", "--max-new-tokens", "1")
    b = _run(tiny_model_dir, data, tmp_path / "b", "--max-new-tokens", "3")
    assert compare.main([str(a), str(b), "--output", str(tmp_path / "cmp")]) == 0
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())["tasks"]
    assert out["vqa_rad_closed"]["test"] == "mcnemar_exact" and out["vqa_rad_closed"]["n_paired"] == 3
    assert out["slake_open"]["field"] == "recall" and out["slake_open"]["n_paired"] == 3
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert "| vqa_rad_closed | accuracy | 3 |" in capsys.readouterr().out


def _fake_run(folder, correct, protocol="toolkit", data="d1", limit=None):
    (folder / "predictions").mkdir(parents=True)
    rows = [{"uid": f"q{i}", "output": "yes" if c else "no", "correct": c, "question": "q", "answer": "yes"}
            for i, c in enumerate(correct)]
    (folder / "predictions" / "vqa_rad_closed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp = {"data": {"rows.jsonl": data}, "settings": {"data_format": "medmax", "limit": limit, "seed": 0}}
    results = {"vqa_rad_closed": {"metric": "accuracy", "protocol": protocol}, "_fingerprint": fp, "_protocol": protocol}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_mcnemar_counts_the_discordant_questions_and_lists_them(tmp_path):
    a = _fake_run(tmp_path / "a", [True] * 10 + [False] * 20 + [True] * 5)
    b = _fake_run(tmp_path / "b", [False] * 10 + [True] * 20 + [True] * 5)
    tasks, disagreements = compare.compare(a, b)
    e = tasks["vqa_rad_closed"]
    assert (e["b"], e["c"]) == (10, 20)
    assert e["p_value"] == pytest.approx(sps.binomtest(10, 30).pvalue)
    assert e["difference"] == pytest.approx(10 / 35) and e["ci95"]["low"] < e["difference"] < e["ci95"]["high"]
    assert len(disagreements) == 30 and disagreements[0]["output_a"] == "yes"


@pytest.mark.parametrize("change,phrase", [
    ({"protocol": "medmax"}, "--protocol toolkit and"),
    ({"data": "d2"}, "read different data files"),
    ({"limit": 5}, "chose their rows differently (limit None vs 5)"),
])
def test_runs_that_cannot_pair_are_refused_in_one_line(tmp_path, capsys, change, phrase):
    a = _fake_run(tmp_path / "a", [True, False])
    b = _fake_run(tmp_path / "b", [True, True], **change)
    assert compare.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"^medmax-eval-compare: error: ", err) and phrase in err
