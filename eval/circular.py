"""``eval.run --circular-eval``: MMBench's CircularEval for multiple-choice questions.

A question with N options is asked N times: as released (rotation 0), then with its option texts rotated
by 1 .. N-1 places (rotation k puts the text of option ``(i + k) mod N`` at letter i, and the gold letter
moves with its text). It counts as correct only if every rotation is answered right (Liu et al. 2023,
MMBench, section 3.2). The prompt of rotation k is the question's text with its option lines removed and
the rotated options written as the converters write them ("(A) text" lines); a prompt whose options are
not written in it as lines (``A: text``, ``(A) text``, ``A. text``) cannot be rotated and its row says so.

Each MCQ row gets ``circular: {"letters", "correct", "all_correct", "follows_position"}``: the option
letter read from each rotation's answer, whether each was right, and whether the same letter was chosen
in every rotation (the answer follows the option's position, not its text). results.json's ``circular``
per task: the circular accuracy and the plain accuracy of the same questions (each with a 95 % CI), and
the share of questions whose answer follows the position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .data import _OPTION_LINE, EvalRecord, mcq_prompt
from .scoring import LETTERS, answer_letter, parse_mcq
from .stats import summary


def stem(prompt: str) -> str:
    """The question without its option lines."""
    return _OPTION_LINE.sub("", prompt).strip()


def rotation(rec: EvalRecord, k: int) -> EvalRecord:
    """The row with its options rotated by ``k`` places (see the module doc); gold letter moved with its text."""
    letters = list(rec.options)
    texts = [rec.options[x] for x in letters]
    n = len(letters)
    rotated = {LETTERS[i]: texts[(i + k) % n] for i in range(n)}
    gold = letters.index(answer_letter(rec.answer, rec.options))
    return dataclasses.replace(rec, prompt=mcq_prompt(stem(rec.prompt), rotated), options=rotated,
                               answer=LETTERS[(gold - k) % n])


def why_not(rec: EvalRecord) -> str | None:
    """Why a row cannot be rotated, or None."""
    if not rec.options or len(rec.options) < 2:
        return "no options to rotate"
    if answer_letter(rec.answer, rec.options) is None:
        return "its gold names no single option"
    if stem(rec.prompt) == rec.prompt.strip():
        return "its options are not written in the prompt as lines, so they cannot be reordered"
    return None


def add_rotations(items: list[tuple[EvalRecord, dict]], build: Callable[[EvalRecord], list],
                  generate: Callable[[list], list], score: Callable[[EvalRecord, object], dict]) -> None:
    """Ask each (record, scored row) in every other rotation; the result goes into the row's ``circular``."""
    todo = []
    for rec, row in items:
        reason = why_not(rec)
        if reason:
            row["circular"] = {"error": reason}
        else:
            row["circular"] = {"letters": [parse_mcq(row.get("output") or "", rec.options)], "correct": [bool(row.get("correct"))]}
            todo.append((rec, row))
    for k in range(1, max((len(rec.options) for rec, _ in todo), default=0)):
        batch = [(rotation(rec, k), row) for rec, row in todo if k < len(rec.options)]
        for (rot, row), out in zip(batch, generate([build(rot) for rot, _ in batch])):
            if isinstance(out, BaseException):
                row["circular"] = {"error": f"rotation {k}: generation failed ({type(out).__name__}: {out})"}
            elif "error" not in row["circular"]:
                scored = score(rot, out)
                row["circular"]["letters"].append(parse_mcq(scored.get("output") or "", rot.options))
                row["circular"]["correct"].append(bool(scored.get("correct")))
    for _, row in todo:
        c = row["circular"]
        if "error" not in c:
            c["all_correct"] = all(c["correct"])
            c["follows_position"] = c["letters"][0] is not None and len(set(c["letters"])) == 1


def summarize(rows: list[dict], key: str) -> dict | None:
    """results.json's ``circular`` for a task's scored rows (None when no row was rotated)."""
    done = [r["circular"] for r in rows if isinstance(r.get("circular"), dict) and "all_correct" in r["circular"]]
    if not done:
        return None
    failed = sum(isinstance(r.get("circular"), dict) and "error" in r["circular"] for r in rows)
    return {"accuracy": summary([c["all_correct"] for c in done], f"{key}:circular"),
            "plain_accuracy": summary([c["correct"][0] for c in done], f"{key}:plain"),
            "follows_position": sum(c["follows_position"] for c in done) / len(done), "n_not_rotated": failed}


def report_lines(results: dict) -> list[str]:
    keys = sorted(k for k, e in results.items() if not k.startswith("_") and isinstance(e, dict) and e.get("circular"))
    if not keys:
        return []
    lines = ["", "## CircularEval (--circular-eval)", "",
             "Each MCQ asked once per rotation of its options; correct only if every rotation is right. follows "
             "position: the share of questions answered with the same letter in every rotation.", "",
             "| task | n | plain accuracy | circular accuracy | follows position | not rotated |", "|---|---|---|---|---|---|"]
    for key in keys:
        c = results[key]["circular"]
        plain, circ = c["plain_accuracy"], c["accuracy"]
        lines.append(f"| {key} | {circ['n']} | {plain['score']:.3f} [{plain['ci95']['low']:.2f}, {plain['ci95']['high']:.2f}] | "
                     f"{circ['score']:.3f} [{circ['ci95']['low']:.2f}, {circ['ci95']['high']:.2f}] | "
                     f"{c['follows_position']:.2f} | {c['n_not_rotated']} |")
    return lines
