"""``eval.run --circular-eval``: MMBench's CircularEval for multiple-choice questions.

A question with N options is asked N times: as released (rotation 0), then with its option texts rotated
by 1 .. N-1 places (rotation k puts the text of option ``(i + k) mod N`` at letter i, and the gold letter
moves with its text). It counts as correct only if every rotation is answered right (Liu et al. 2023,
MMBench, section 3.2). Only the option texts move, in place: the prompt keeps its own layout (options as
lines, ``A: text`` / ``(A) text`` / ``A. text``, or inline as the quickstart writes them, ``Where? A) left
B) right``), since a model may know only the layout it was trained on. A prompt without such options (or
whose written options differ from the row's ``options``) cannot be rotated, and its row says why.

Each MCQ row gets ``circular: {"letters", "correct", "all_correct", "follows_position"}``: the option
letter read from each rotation's answer, whether each was right, and whether the same letter was chosen
in every rotation (the answer follows the option's position, not its text). results.json's ``circular``
per task: the circular accuracy and the plain accuracy of the same questions (each with a 95 % CI), and
the share of questions whose answer follows the position.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from .data import EvalRecord
from .scoring import LETTERS, answer_letter, normalize, parse_mcq
from .stats import summary


_MARKER = re.compile(r"(?:(?<=\s)|^)\(?([A-H])[).:][ \t]*")


def option_spans(prompt: str) -> list[tuple[int, int]] | None:
    """Where each option's text sits in the prompt, for the last run of markers A, B, C, ... (at least two), written
    as lines ("A: text", "(A) text") or inline ("Where? A) left B) right"); None when there is no such run.
    An option's text ends at the next marker or at the end of its line."""
    runs, run = [], []
    for m in _MARKER.finditer(prompt):
        if len(run) < len(LETTERS) and m.group(1) == LETTERS[len(run)]:
            run.append(m)
        elif m.group(1) == "A":
            runs.append(run)
            run = [m]
    runs.append(run)
    best = next((r for r in reversed(runs) if len(r) >= 2), None)
    if best is None:
        return None
    spans = []
    for i, m in enumerate(best):
        end = best[i + 1].start() if i + 1 < len(best) else len(prompt)
        line_end = prompt.find("\n", m.end(), end)
        spans.append((m.end(), (end if line_end < 0 else line_end)))
    return [(a, a + len(prompt[a:b].rstrip())) for a, b in spans]


def options_of(rec: EvalRecord) -> dict[str, str] | None:
    spans = option_spans(rec.prompt)
    return {LETTERS[i]: rec.prompt[a:b] for i, (a, b) in enumerate(spans)} if spans else None


def rotation(rec: EvalRecord, k: int) -> EvalRecord:
    """The row with its option texts rotated by ``k`` places where they stand in the prompt (everything else kept
    as written); the gold letter moves with its text."""
    spans = option_spans(rec.prompt)
    options = options_of(rec)
    letters = list(options)
    n = len(letters)
    texts = [options[x] for x in letters]
    rotated = {LETTERS[i]: texts[(i + k) % n] for i in range(n)}
    prompt, last = [], 0
    for i, (a, b) in enumerate(spans):
        prompt += [rec.prompt[last:a], rotated[LETTERS[i]]]
        last = b
    gold = letters.index(answer_letter(rec.answer, options))
    return dataclasses.replace(rec, prompt="".join(prompt) + rec.prompt[last:], options=rotated, answer=LETTERS[(gold - k) % n])


def why_not(rec: EvalRecord) -> str | None:
    """Why a row cannot be rotated, or None."""
    options = options_of(rec)
    if not options:
        return "its options are not written in the prompt (as lines or inline A) ... B) ...), so they cannot be reordered"
    if rec.options and [normalize(v) for v in options.values()] != [normalize(v) for v in rec.options.values()]:
        return "the options written in the prompt differ from the row's options"
    if answer_letter(rec.answer, options) is None:
        return "its gold names no single option"
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
            row["circular"] = {"letters": [parse_mcq(row.get("output") or "", options_of(rec))],
                               "correct": [bool(row.get("correct"))]}
            todo.append((rec, row))
    sizes = {rec.uid: len(options_of(rec)) for rec, _ in todo}
    for k in range(1, max(sizes.values(), default=0)):
        batch = [(rotation(rec, k), row) for rec, row in todo if k < sizes[rec.uid]]
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
