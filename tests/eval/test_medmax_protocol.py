"""``--protocol medmax``: MedMax's published VQA scoring, case for case.

The rules are MedMax's ``evaluation/vqa.py`` and ``evaluation/eval_utils.py``
(github.com/Hritikbansal/medmax): closed and ProbMed questions get 1 new token, lower-cased, right when
the gold is exactly ``yes`` (``no``) and the text contains ``yes`` (``no``) but not the other; MCQ gets 1
new token, upper-cased and stripped, right when equal to the gold; open answers (60 new tokens,
lower-cased) go to a GPT judge whose reply must contain ``Correctness: 1`` or ``Correctness: 0`` (1 is
looked for first), rows with neither are dropped; results are ``{task_id: {"accuracy", "std_err"}}`` with
``std_err = np.std(scores, ddof=1) / sqrt(n)``.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import eval.run as run
from eval import medmax_protocol as mp

ROOT = Path(run.__file__).resolve().parents[1]


@pytest.mark.parametrize("gold, output, correct", [
    ("yes", "Yes", True),
    ("no", "No", True),
    ("yes", " yes", True),
    ("no", "not sure", True),  # MedMax counts "not sure" as no, on purpose of its substring rule
    ("yes", "not sure", False),
    ("no", "none", True),
    ("no", "normal", True),
    ("yes", "eyes", True),  # 'yes' in 'eyes'
    ("yes", "yes, no doubt", False),  # contains both
    ("no", "no, yes", False),
    ("yes", "", False),
    ("Yes", "yes", False),  # the gold is compared as stored, not lower-cased
    ("left", "left", False),  # a closed question whose gold is not yes/no is never right
    ("yes", "YES!", True),
])
def test_closed_rule(gold, output, correct):
    assert mp.closed_correct(mp.closed_text(output), gold) is correct


@pytest.mark.parametrize("gold, output, correct", [
    ("B", "B", True),
    ("B", " b ", True),  # upper-cased and stripped
    ("B", "b\n", True),
    ("B", "(B)", False),  # MedMax counts "(B)" wrong, on purpose of its exact comparison
    ("B", "B.", False),
    ("B", "Answer: B", False),
    ("B", "liver", False),
    ("B", "A", False),
    (" B", "B", False),  # nor is the gold stripped
])
def test_mcq_rule(gold, output, correct):
    assert mp.mcq_correct(mp.mcq_text(output), gold) is correct


@pytest.mark.parametrize("reply, verdict", [
    ("Correctness: 1", 1),
    ("Correctness: 0", 0),
    ("The answer is fine.\nCorrectness: 1\n", 1),
    ("Correctness: 0 ... on reflection Correctness: 1", 1),  # '1' is looked for first
    ("Correctness: 10", 1),  # a substring test
    ("correctness: 1", None),  # case-sensitive: dropped
    ("Correctness:1", None),
    ("**Correctness:** 1", None),
    ("1", None),
    ("", None),
])
def test_judge_reply_rule(reply, verdict):
    assert mp.judge_verdict(reply) == verdict


def test_accuracy_and_std_err_as_numpy_computes_them():
    acc, err = mp.accuracy_and_std_err([True, False, True, True])
    assert acc == 0.75 and err == pytest.approx(0.25)  # sample std (ddof 1) 0.5 over sqrt(4)
    assert mp.accuracy_and_std_err([1]) == (1.0, None)  # numpy: NaN; written as null
    assert mp.accuracy_and_std_err([]) == (None, None)
    acc, err = mp.accuracy_and_std_err([0, 1, 1])
    assert acc == pytest.approx(2 / 3) and err == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_answer_lengths_are_medmax_s():
    assert mp.MAX_NEW_TOKENS == {"closed": 1, "probmed": 1, "mcq": 1, "open": 60}


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpdata")
    Image.new("RGB", (64, 64), (10, 90, 200)).save(root / "a.png")
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Is there a lesion {i}?", "answer": a,
             "image_path": "a.png"} for i, a in enumerate(["yes", "no", "yes"])]
    rows += [{"task_name": "pmc_vqa", "question_type": "mcq", "prompt": f"Which organ {i}?\n(A) lung\n(B) liver",
              "answer": "B", "image_path": "a.png"} for i in range(2)]
    rows += [{"task_name": "slake", "question_type": "open", "prompt": f"Where is lesion {i}?", "answer": "Left Lung",
              "image_path": "a.png"} for i in range(3)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_medmax_run_generates_one_token_scores_by_medmax_and_counts_dropped_rows(tiny_model_dir, vqa_data, tmp_path, stub):
    stub["script"] = [(200, "Correctness: 1"), (200, "I cannot tell."), (200, "Correctness: 0")]
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(vqa_data), "--output", str(out), "--device", "cpu",
            "--tasks", "vqa_rad_closed,pmc_vqa_mcq,slake_open", "--protocol", "medmax",
            "--judge-url", stub["url"], "--judge-model", "gpt-4o-mini"]
    assert run.main(argv) == 0
    preds = {key: [json.loads(line) for line in (out / "predictions" / f"{key}.jsonl").read_text().splitlines()]
             for key in ("vqa_rad_closed", "pmc_vqa_mcq", "slake_open")}
    for row in preds["vqa_rad_closed"] + preds["pmc_vqa_mcq"]:
        assert row["n_new_tokens"] <= 1
    for row in preds["vqa_rad_closed"]:
        assert row["medmax_text"] == row["raw_output"].lower()
        assert row["correct"] == mp.closed_correct(row["medmax_text"], row["answer"])
    for row in preds["pmc_vqa_mcq"]:
        assert row["medmax_text"] == row["raw_output"].upper().strip() and row["correct"] == (row["medmax_text"] == "B")
    for row, sent in zip(preds["slake_open"], [r["body"] for r in stub["requests"]]):
        assert row["n_new_tokens"] <= 60 and row["medmax_text"] == row["raw_output"].lower()
        assert row["medmax_text"] in sent["messages"][0]["content"]  # the judge sees the lower-cased answer
    results = json.loads((out / "results.json").read_text())
    assert results["slake_open"]["n"] == 2 and results["slake_open"]["n_dropped"] == 1
    assert results["slake_open"]["score"] == 0.5 and results["slake_open"]["protocol"] == "medmax"
    medmax = json.loads((out / "results_medmax.json").read_text())
    assert set(medmax) == {"vqa_rad_closed", "pmc_vqa_mcq", "slake_open"}
    for key, entry in medmax.items():
        assert set(entry) == {"accuracy", "std_err"} | ({"n_unmatchable"} if key != "slake_open" else set())
        assert entry.get("n_unmatchable", 0) == 0  # every gold is spelled as the rule compares it
        scores = [r["correct"] for r in preds[key] if r.get("correct") is not None]
        assert (entry["accuracy"], entry["std_err"]) == mp.accuracy_and_std_err(scores)
    report = (out / "report.md").read_text()
    assert "| slake_open | medmax |" in report and "dropped" in report


def test_unmatchable_golds_are_counted_with_the_score_against_normalised_golds():
    """Issue 23 item 8: "Yes" never matches MedMax's closed rule, "b" never its MCQ rule; the rule stays exact."""
    from eval.tasks import TASKS_BY_KEY

    closed = [{"uid": str(i), "answer": gold, "medmax_text": text, "correct": mp.closed_correct(text, gold)}
              for i, (gold, text) in enumerate([("Yes", "yes"), ("No", "no"), ("yes", "yes"), ("left", "left"), ("no", "yes")])]
    entry = mp.task_metrics(TASKS_BY_KEY["vqa_rad_closed"], closed)
    assert entry["score"] == 0.2 and entry["n_unmatchable"] == 3
    assert entry["metrics"]["accuracy_gold_normalised"]["score"] == 0.6  # Yes and No now match; "left" still cannot
    line = mp.unmatchable_warning("vqa_rad_closed", entry)
    assert "3 of 5 golds can never match" in line and "0.200" in line and "0.600" in line
    mcq = [{"uid": "0", "answer": "b", "medmax_text": "B", "correct": False},
           {"uid": "1", "answer": "B", "medmax_text": "B", "correct": True}]
    entry = mp.task_metrics(TASKS_BY_KEY["pmc_vqa_mcq"], mcq)
    assert entry["n_unmatchable"] == 1 and entry["metrics"]["accuracy_gold_normalised"]["score"] == 1.0
    layout = mp.results_layout({"vqa_rad_closed": [r["correct"] for r in closed]}, {"vqa_rad_closed": 3})
    assert layout["vqa_rad_closed"]["n_unmatchable"] == 3 and layout["vqa_rad_closed"]["accuracy"] == 0.2


def test_a_medmax_run_counts_unmatchable_golds_and_warns_of_split_golds(tiny_model_dir, tmp_path, caplog):
    """VQA-RAD stores most closed golds as "Yes"/"No"; the tiny tokenizer, like the quickstart's, splits "yes"."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(data / "a.png")
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Is there a lesion {i}?", "answer": a,
             "image_path": "a.png"} for i, a in enumerate(["Yes", "No", "yes", "no"])]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--device", "cpu",
                     "--tasks", "vqa_rad_closed", "--protocol", "medmax"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["vqa_rad_closed"]["n_unmatchable"] == 2
    assert json.loads((out / "results_medmax.json").read_text())["vqa_rad_closed"]["n_unmatchable"] == 2
    report = (out / "report.md").read_text()
    assert "2 n_unmatchable" in report and "| vqa_rad_closed | medmax | accuracy_gold_normalised | 4 |" in report
    split = [w for w in results["_warnings"] if "splits the gold 'yes' into 2 tokens ('y' + 'es')" in w]
    assert len(split) == 1 and split[0] in caplog.text and "gold 'no'" not in " ".join(results["_warnings"])
    assert "2 of 4 golds can never match" in report


def test_medmax_protocol_without_a_judge_skips_open_tasks_and_refuses_a_length(tiny_model_dir, vqa_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(vqa_data), "--output", str(out), "--device", "cpu",
            "--tasks", "vqa_rad_closed,slake_open", "--protocol", "medmax"]
    assert run.main(argv + ["--max-new-tokens", "4"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert "judge" in results["slake_open"]["skipped"]
    assert set(json.loads((out / "results_medmax.json").read_text())) == {"vqa_rad_closed"}


def test_the_toolkit_protocol_also_writes_medmax_s_layout(tiny_model_dir, vqa_data, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(vqa_data), "--output", str(out), "--device", "cpu",
            "--tasks", "vqa_rad_closed,pmc_vqa_mcq,slake_open", "--max-new-tokens", "2"]
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    medmax = json.loads((out / "results_medmax.json").read_text())
    assert set(medmax) == {"vqa_rad_closed", "pmc_vqa_mcq"}  # open answers need a judge in MedMax's layout
    assert medmax["vqa_rad_closed"]["accuracy"] == results["vqa_rad_closed"]["score"]
    assert results["vqa_rad_closed"]["protocol"] == "toolkit"
    assert "| vqa_rad_closed | toolkit |" in (out / "report.md").read_text()


def test_readme_table_is_what_the_command_prints():
    """README's table of where the protocols disagree is reproduced by `python -m eval.compare_protocols`."""
    printed = subprocess.run([sys.executable, "-m", "eval.compare_protocols"], cwd=ROOT, capture_output=True, text=True,
                             check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- protocol-table -->\n(.*?)<!-- /protocol-table -->", readme, re.S).group(1)
    assert table.strip() == printed.strip()
    assert "not sure" in table and "(B)" in table


def test_compare_protocols_on_a_predictions_folder(tmp_path):
    from eval.compare_protocols import compare_folder

    pred = tmp_path / "predictions"
    pred.mkdir()
    rows = [{"uid": "a", "task": "vqa_rad_closed", "answer": "no", "output": "not sure", "question": "q"},
            {"uid": "b", "task": "vqa_rad_closed", "answer": "yes", "output": "Yes", "question": "q"},
            {"uid": "c", "task": "pmc_vqa_mcq", "answer": "B", "output": "(B)", "question": "q\n(A) x\n(B) y"}]
    (pred / "vqa_rad_closed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (pred / "pmc_vqa_mcq.jsonl").write_text(json.dumps(rows[2]) + "\n")
    summary = compare_folder(pred)
    assert summary["vqa_rad_closed"]["rows"] == 2 and summary["vqa_rad_closed"]["disagree"] == 1
    assert summary["vqa_rad_closed"]["toolkit"] == 1 and summary["vqa_rad_closed"]["medmax"] == 2
    assert summary["pmc_vqa_mcq"] == {"rows": 1, "toolkit": 1, "medmax": 0, "disagree": 1, "examples": [rows[2]["uid"]]}
