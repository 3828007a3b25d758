"""--circular-eval (issue 28): MMBench's rotations, the gold moving with its text, position-following answers."""

import json

from PIL import Image

import eval.run as run
from eval import circular
from eval.data import EvalRecord, mcq_prompt

OPTIONS = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}


def _rec(i, answer="B", prompt=None):
    return EvalRecord(f"f:{i}", "pmc_vqa", "mcq", prompt or mcq_prompt("Which organ?", OPTIONS), answer, "x.png",
                      options=dict(OPTIONS))


def test_a_rotation_moves_every_text_and_the_gold_with_it():
    rot = circular.rotation(_rec(0), 1)
    assert rot.options == {"A": "liver", "B": "brain", "C": "kidney", "D": "lung"}
    assert rot.answer == "A" and rot.prompt == "Which organ?\n(A) liver\n(B) brain\n(C) kidney\n(D) lung"
    assert circular.rotation(_rec(0, answer="liver"), 3).options[circular.rotation(_rec(0, answer="liver"), 3).answer] == "liver"
    assert "not written in the prompt" in circular.why_not(_rec(1, prompt="Which organ?"))


def test_inline_options_rotate_in_place_and_keep_the_prompt_s_layout():
    """The quickstart writes its options on the question's line; a letter inside the question is no option."""
    rec = EvalRecord("f:0", "synthetic", "mcq", "Vitamin A. deficiency? Where is it? A) upper left B) upper right "
                     "C) lower left D) lower right", "B", "x.png")
    assert circular.why_not(rec) is None
    rot = circular.rotation(rec, 1)
    assert rot.prompt == ("Vitamin A. deficiency? Where is it? A) upper right B) lower left C) lower right "
                          "D) upper left")
    assert rot.answer == "A" and rot.options["A"] == "upper right"


def _fake(answer_of):
    class Out:
        def __init__(self, text):
            self.text = text

    def generate(prompts):
        return [Out(answer_of(p[0])) for p in prompts]

    return generate


def _ask(answer_of, n=3):
    recs = [_rec(i) for i in range(n)]
    items = [(rec, {"output": answer_of(rec.prompt), "correct": answer_of(rec.prompt) == "B"}) for rec in recs]
    score = lambda rec, out: {"output": out.text, "correct": out.text == rec.answer}  # noqa: E731
    circular.add_rotations(items, lambda rec: [rec.prompt], _fake(answer_of), score)
    return [row for _, row in items]


def test_a_model_that_reads_the_text_passes_and_one_that_picks_a_letter_fails():
    def reads(prompt):
        return next(line[1] for line in prompt.splitlines() if line.endswith("liver"))

    rows = _ask(reads)
    assert all(r["circular"]["all_correct"] and not r["circular"]["follows_position"] for r in rows)
    assert rows[0]["circular"]["letters"] == ["B", "A", "D", "C"]
    rows = _ask(lambda prompt: "B")
    assert all(not r["circular"]["all_correct"] and r["circular"]["follows_position"] for r in rows)
    summary = circular.summarize(rows, "k")
    assert summary["plain_accuracy"]["score"] == 1.0 and summary["accuracy"]["score"] == 0.0
    assert summary["follows_position"] == 1.0


def test_eval_run_reports_circular_accuracy(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 40), (90, 20, 20)).save(data / "x.png")
    rows = [{"task_name": "pmc_vqa", "question_type": "mcq", "prompt": mcq_prompt(f"Which organ {i}?", OPTIONS),
             "answer": "C", "image_path": "x.png"} for i in range(3)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--tasks", "pmc_vqa",
                     "--max-new-tokens", "2", "--device", "cpu", "--circular-eval"]) == 0
    entry = json.loads((out / "results.json").read_text())["pmc_vqa_mcq"]
    assert entry["circular"]["accuracy"]["n"] == 3 and entry["circular"]["accuracy"]["score"] <= entry["score"]
    preds = [json.loads(x) for x in (out / "predictions" / "pmc_vqa_mcq.jsonl").read_text().splitlines()]
    assert all(len(p["circular"]["correct"]) == 4 for p in preds)
    assert "## CircularEval" in (out / "report.md").read_text()
