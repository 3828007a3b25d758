"""``--protocol medmax``: MedMax's published VQA evaluation, rule for rule, so numbers compare with its paper.

Facts read from MedMax's code (github.com/Hritikbansal/medmax, ``evaluation/vqa.py``,
``evaluation/eval_utils.py``, ``inference/inference_utils.py``); the rules are rewritten here, not copied:

- Tasks: the 12 VQA tasks, result id ``f"{task_name}_{question_type}"`` (ProbMed is ``probmed_closed``).
- Closed (and ProbMed): 1 new token (``max_gen_len=1``), lower-cased; right when the gold is exactly
  ``yes`` and the text contains ``yes`` and not ``no``, or the gold is exactly ``no`` and the text contains
  ``no`` and not ``yes``. These are substring tests: "not sure", "none" and "normal" count as no and
  "eyes" as yes; a gold spelled "Yes", or any gold other than yes/no, is never right.
- MCQ: 1 new token, upper-cased and stripped, right when equal to the gold as stored: "(B)", "B." and
  "Answer: B" are wrong.
- Open: 60 new tokens, lower-cased, sent with the question and the gold to a GPT judge (``gpt-4o-mini``
  in MedMax). The reply scores 1 when it contains ``Correctness: 1``, else 0 when it contains
  ``Correctness: 0`` (case and spacing exact); a reply with neither is dropped from the task
  (MedMax ``continue``s past the row). Here dropped rows are counted (``n_dropped`` in results.json and
  the report), and so are failed judge requests (``n_judge_failed``), which would stop MedMax's run.
- Results: ``{task_id: {"accuracy": mean, "std_err": np.std(scores, ddof=1) / sqrt(n)}}``. numpy gives
  NaN for one row (and for none); JSON has no NaN, so those are written as null.

What the exact rules cannot see, counted and said (the rules themselves stay exact):
- A gold that the rule can never call right ("Yes" for a closed question, "b" or "(B)" for an MCQ one;
  171 of VQA-RAD's 272 closed test golds are "Yes"/"No") is counted as ``n_unmatchable`` in results.json,
  results_medmax.json and the report, with ``accuracy_gold_normalised``: the accuracy against golds
  lower-cased (closed) or upper-cased (MCQ) and stripped, as the rule treats the model's text.
- A gold the tokenizer splits into several tokens cannot be generated in the protocol's one new token as
  it is spelled (the quickstart's tokenizer splits "yes" into ``y`` + ``es``): eval.run warns, naming the pieces.

Where this differs from MedMax's run, on purpose, and what to do about it:
- Decoding is greedy. MedMax's ``chameleon_generate`` samples with Chameleon's text defaults
  (temperature 0.7, top-p 0.9, repetition penalty 1.2) and no seed, so its own numbers vary between
  runs; ``--repetition-penalty 1.2`` applies its penalty to the greedy choice.
- The judge request sends temperature 0 (MedMax sends none, so the API's default applies), so that
  verdicts can be cached. Its prompt is the toolkit's wording of MedMax's (question, correct answer,
  answer to judge, a ``Correctness:`` line); ``--judge-prompt FILE`` sends any text verbatim, MedMax's included.
"""

from __future__ import annotations

from .scoring import mean_stderr
from .tasks import Task

PROTOCOLS = ("toolkit", "medmax")
KINDS = ("closed", "probmed", "mcq", "open")
MAX_NEW_TOKENS = {"closed": 1, "probmed": 1, "mcq": 1, "open": 60}


def applies(protocol: str, task: Task) -> bool:
    """MedMax's vqa.py covers the VQA kinds; other tasks keep the toolkit's rules under either protocol."""
    return protocol == "medmax" and task.kind in KINDS


def closed_text(output: str) -> str:
    return output.lower()


def closed_correct(text: str, answer) -> bool:
    return (answer == "yes" and "yes" in text and "no" not in text) or (answer == "no" and "no" in text and "yes" not in text)


def mcq_text(output: str) -> str:
    return output.upper().strip()


def mcq_correct(text: str, answer) -> bool:
    return answer == text


def open_text(output: str) -> str:
    return output.lower()


def judge_verdict(reply: str) -> int | None:
    if "Correctness: 1" in reply:
        return 1
    if "Correctness: 0" in reply:
        return 0
    return None


def score(kind: str, output: str, answer) -> dict:
    """Row fields for one generated text: ``medmax_text`` (what MedMax compares) and, except for open
    answers (the judge decides those), ``correct``."""
    if kind in ("closed", "probmed"):
        text = closed_text(output)
        return {"medmax_text": text, "correct": closed_correct(text, answer)}
    if kind == "mcq":
        text = mcq_text(output)
        return {"medmax_text": text, "correct": mcq_correct(text, answer)}
    if kind == "open":
        return {"medmax_text": open_text(output)}
    raise ValueError(f"MedMax's VQA protocol has no rule for task kind {kind!r}")


def accuracy_and_std_err(scores) -> tuple[float | None, float | None]:
    """Mean and ``np.std(scores, ddof=1) / sqrt(n)``, with None where numpy gives NaN."""
    metric = mean_stderr(scores)
    return metric.score, metric.stderr


ONE_TOKEN_KINDS = ("closed", "probmed", "mcq")


def normalised_gold(kind: str, answer) -> str:
    """The gold as the rule treats the model's text: lower-cased (closed) or upper-cased (MCQ), stripped."""
    text = str(answer).strip()
    return text.upper() if kind == "mcq" else text.lower()


def matchable(kind: str, answer) -> bool:
    """Whether the rule can ever call a row with this gold right (it compares the gold as stored)."""
    if kind == "mcq":
        return isinstance(answer, str) and answer != "" and answer == mcq_text(answer)
    return answer in ("yes", "no")


def _correct_gold_normalised(kind: str, row: dict) -> bool:
    gold = normalised_gold(kind, row["answer"])
    text = row["medmax_text"]
    return mcq_correct(text, gold) if kind == "mcq" else closed_correct(text, gold)


def task_metrics(task: Task, rows: list[dict]) -> dict:
    """results.json entry for a task scored by MedMax's rules (dropped and failed judge rows counted; for the
    one-token kinds, the golds the rule can never match and the accuracy against normalised golds)."""
    good = [r for r in rows if not r.get("error")]
    metric = mean_stderr(r["correct"] for r in good if r.get("correct") is not None).as_dict()
    entry = {"metric": "accuracy", **metric, "metrics": {"accuracy": metric}, "n_errors": len(rows) - len(good),
             "protocol": "medmax"}
    if task.kind == "open":
        entry["n_dropped"] = sum(r.get("judge_status") == "unparseable" for r in good)
        entry["n_judge_failed"] = sum(r.get("judge_status") == "failed" for r in good)
    if task.kind in ONE_TOKEN_KINDS:
        entry["n_unmatchable"] = sum(not matchable(task.kind, r.get("answer")) for r in good)
        if entry["n_unmatchable"]:
            entry["metrics"]["accuracy_gold_normalised"] = mean_stderr(
                _correct_gold_normalised(task.kind, r) for r in good if "medmax_text" in r).as_dict()
    return entry


def unmatchable_warning(key: str, entry: dict) -> str | None:
    """One line for a task whose golds the rule can partly never match, with the score against normalised golds."""
    if not entry.get("n_unmatchable"):
        return None
    normalised = entry["metrics"]["accuracy_gold_normalised"]["score"]
    return (f"{key}: {entry['n_unmatchable']} of {entry['n']} golds can never match under --protocol medmax, which "
            f"compares the gold as stored (e.g. 'Yes' is not 'yes'); accuracy {_fmt(entry['score'])}, against "
            f"normalised golds {_fmt(normalised)} (accuracy_gold_normalised)")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def split_gold_warnings(golds: dict[str, set[str]], pieces) -> list[str]:
    """Lines for golds of the one-token kinds that the tokenizer splits: ``golds`` maps a task key to its
    distinct matchable golds, ``pieces(text)`` gives the tokens a text encodes to."""
    lines = []
    for key in sorted(golds):
        for gold in sorted(golds[key]):
            split = pieces(gold)
            if len(split) > 1:
                lines.append(f"{key}: the tokenizer splits the gold {gold!r} into {len(split)} tokens "
                             f"({' + '.join(map(repr, split))}), and --protocol medmax answers in 1 new token: "
                             f"a model that answers {gold!r} as it is spelled is never right")
    return lines


def layout_scores(task: Task, rows: list[dict], protocol: str) -> list | None:
    """The per-row scores behind a task's entry in MedMax's results layout; None when it has none
    (tasks outside the 12 VQA tasks, or open answers that no judge scored)."""
    if task.kind not in KINDS:
        return None
    good = [r for r in rows if not r.get("error")]
    field = "judge" if task.kind == "open" and protocol == "toolkit" else "correct"
    if task.kind == "open" and not any(field in r for r in good):
        return None
    return [r[field] for r in good if r.get(field) is not None]


def results_layout(scores_by_task: dict[str, list], unmatchable: dict[str, int] | None = None) -> dict:
    """MedMax's results file: ``{task_id: {"accuracy", "std_err"}}``, plus ``n_unmatchable`` for the tasks
    ``unmatchable`` names (those scored by MedMax's one-token rules)."""
    out = {}
    for key, scores in scores_by_task.items():
        accuracy, std_err = accuracy_and_std_err(scores)
        out[key] = {"accuracy": accuracy, "std_err": std_err}
        if unmatchable and key in unmatchable:
            out[key]["n_unmatchable"] = unmatchable[key]
    return out
