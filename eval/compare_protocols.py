"""Where the toolkit's scoring and MedMax's disagree, on the same model outputs.

Usage::

    python -m eval.compare_protocols                          # the README's table: typical outputs, both verdicts, why
    python -m eval.compare_protocols --predictions OUT/predictions   # counts on a finished run's predictions

The first form scores a fixed list of realistic outputs (closed and multiple-choice questions) with both
rules and prints a Markdown table; the README's table is exactly this output (a test checks it). The
second reads the merged ``<task>.jsonl`` files of a run and, for each closed, ProbMed and MCQ task,
counts the rows each protocol scores right and the rows where they disagree.

Open answers are not compared: the toolkit scores them by token recall / F1 (and an optional judge
read leniently), MedMax only by a judge, so the two never see the same question the same way.
Under ``--protocol medmax`` the model also gets 1 new token for closed and MCQ questions, so an answer
such as "Yes, but no mass." is cut to "Yes" before MedMax's rule ever sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medmax.cli import program
from medmax.jsonl import read_jsonl

from . import medmax_protocol as mp
from .data import options_from_prompt
from .scoring import score_closed, score_mcq
from .tasks import TASKS_BY_KEY

OPTIONS = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}

# (kind, gold, model output, why they differ or agree)
CASES = [
    ("closed", "yes", "Yes", "both read a plain yes"),
    ("closed", "no", "not sure", "MedMax: 'no' is a substring of 'not'; the toolkit needs the word yes or no"),
    ("closed", "no", "I don't know", "MedMax: 'no' is a substring of 'know'"),
    ("closed", "no", "normal", "MedMax: 'no' is a substring of 'normal'"),
    ("closed", "yes", "Both eyes.", "MedMax: 'yes' is a substring of 'eyes'"),
    ("closed", "yes", "Yes, but no mass.", "MedMax: the text contains 'no' as well; the toolkit takes the first yes/no word"),
    ("closed", "Yes", "yes", "MedMax compares the gold as stored ('Yes' is not 'yes'); the toolkit normalises both"),
    ("closed", "left", "left", "MedMax's closed rule knows only yes/no golds; the toolkit matches the gold's words"),
    ("mcq", "B", "B", "both read a bare letter"),
    ("mcq", "B", "(B)", "MedMax: '(B)' is not 'B' (exact match after upper-casing and stripping)"),
    ("mcq", "B", "B. liver", "MedMax: exact match only; the toolkit reads a leading option letter"),
    ("mcq", "B", "The answer is B", "MedMax: exact match only; the toolkit reads a stated answer"),
    ("mcq", "B", "liver", "MedMax: exact match only; the toolkit maps an option's text to its letter"),
]


def toolkit_correct(kind: str, output: str, gold, options: dict | None) -> bool:
    if kind == "mcq":
        return score_mcq(output, str(gold), options)
    return score_closed(output, str(gold))


def medmax_correct(kind: str, output: str, gold) -> bool:
    return bool(mp.score("probmed" if kind == "probmed" else kind, output, gold)["correct"])


def _verdict(right: bool) -> str:
    return "right" if right else "wrong"


def _cell(text: str) -> str:
    return f"`{text}`" if text else "(empty)"


def table() -> str:
    """The Markdown table of CASES, verdicts computed by both protocols' own functions."""
    lines = ["| question | gold | model output | toolkit | MedMax | why |", "|---|---|---|---|---|---|"]
    for kind, gold, output, why in CASES:
        options = OPTIONS if kind == "mcq" else None
        question = "MCQ" if kind == "mcq" else "closed"
        lines.append(f"| {question} | {_cell(gold)} | {_cell(output)} | {_verdict(toolkit_correct(kind, output, gold, options))} "
                     f"| {_verdict(medmax_correct(kind, output, gold))} | {why} |")
    return "\n".join(lines)


def compare_folder(pred_dir: Path, examples: int = 5) -> dict:
    """Per closed / ProbMed / MCQ task of a predictions folder: rows, rows right under each protocol, rows
    where they disagree, and the first ``examples`` uids of those."""
    summary = {}
    for path in sorted(pred_dir.glob("*.jsonl")):
        task = TASKS_BY_KEY.get(path.stem)
        if task is None or task.kind not in ("closed", "probmed", "mcq"):
            continue
        entry = {"rows": 0, "toolkit": 0, "medmax": 0, "disagree": 0, "examples": []}
        for row in read_jsonl(path):
            if row.get("error") or row.get("output") is None:
                continue
            options = options_from_prompt(str(row.get("question") or "")) if task.kind == "mcq" else None
            ours = toolkit_correct(task.kind, row["output"], row["answer"], options)
            theirs = medmax_correct(task.kind, row.get("raw_output", row["output"]), row["answer"])
            entry["rows"] += 1
            entry["toolkit"] += ours
            entry["medmax"] += theirs
            if ours != theirs:
                entry["disagree"] += 1
                if len(entry["examples"]) < examples:
                    entry["examples"].append(row["uid"])
        summary[task.key] = entry
    return summary


def folder_table(summary: dict) -> str:
    lines = ["| task | rows | right (toolkit) | right (MedMax) | disagree | e.g. |", "|---|---|---|---|---|---|"]
    for key, e in summary.items():
        lines.append(f"| {key} | {e['rows']} | {e['toolkit']} | {e['medmax']} | {e['disagree']} | {', '.join(e['examples'])} |")
    return "\n".join(lines)


@program("eval.compare_protocols")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval.compare_protocols", description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", type=Path, help="a run's predictions/ folder (default: the README's cases)")
    args = parser.parse_args(argv)
    if args.predictions is None:
        print(table())
        return 0
    if not args.predictions.is_dir():
        parser.error(f"--predictions {args.predictions}: not a folder")
    print(folder_table(compare_folder(args.predictions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
