"""Scoring rules for the evaluation suite, written to avoid MedMax's known miscounts.

MedMax's published suite scores closed questions by substring (``'no' in output``), so "not",
"none", "normal" or "node" count as "no", generates a single token, and compares MCQ output to the
letter verbatim, so "(B)" or "Answer: B" score zero. Here every rule works on whole words of a
normalised text, and every metric carries n and its standard error.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
YES_WORDS = frozenset({"yes"})
NO_WORDS = frozenset({"no"})
LETTERS = "ABCDEFGH"


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize(text).split()


# ---------------------------------------------------------------- closed (yes / no)
def yes_no(text: str) -> str | None:
    """'yes' or 'no' from the first whole word that is one of them, else None ("not", "none" never count)."""
    for word in tokens(text):
        if word in YES_WORDS:
            return "yes"
        if word in NO_WORDS:
            return "no"
    return None


def score_closed(output: str, answer: str) -> bool:
    """Yes/no answers by the first yes/no word; other answers by normalised match of the leading words."""
    gold = normalize(answer)
    if gold in ("yes", "no"):
        return yes_no(output) == gold
    gold_tokens, out_tokens = gold.split(), tokens(output)
    return bool(gold_tokens) and out_tokens[: len(gold_tokens)] == gold_tokens


# ---------------------------------------------------------------- multiple choice
_LEADING_LETTER = re.compile(r"^\s*(?:option\s+)?\(?([A-H])\)?(?=$|[\s]*[.:)\],;]|\s*$)")
_STATED_LETTER = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s+)?\(?((?-i:[A-H]))\)?(?![A-Za-z])", re.IGNORECASE)


def answer_letter(answer: str, options: dict[str, str] | None) -> str | None:
    """The gold option letter: the answer itself when it is one, or the option whose text it matches (OmniMedVQA)."""
    text = str(answer).strip()
    letter = text.strip("().: ").upper()
    if len(letter) == 1 and letter in LETTERS and (not options or letter in options):
        return letter
    if options:
        gold = normalize(text)
        for key, value in options.items():
            if normalize(value) == gold:
                return key
    return None


def parse_mcq(output: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an output names: "B", "(B)", "B.", "Answer: B", "the answer is B", else the quoted option text."""
    allowed = set(options) if options else set(LETTERS)
    for pattern in (_LEADING_LETTER, _STATED_LETTER):
        match = pattern.search(output)
        if match and match.group(1).upper() in allowed:
            return match.group(1).upper()
    return _letter_from_option_text(output, options) if options else None


def _letter_from_option_text(output: str, options: dict[str, str]) -> str | None:
    """The one option whose normalised text appears as whole words in the output; an option quoted only as part
    of a longer quoted option ("cell" in "giant cell tumor") does not count; two or more gives None."""
    padded = f" {normalize(output)} "
    hits = {k: normalize(v) for k, v in options.items() if normalize(v) and f" {normalize(v)} " in padded}
    kept = [k for k, v in hits.items() if not any(v != w and f" {v} " in f" {w} " for w in hits.values())]
    return kept[0] if len(kept) == 1 else None


def score_mcq(output: str, answer: str, options: dict[str, str] | None) -> bool:
    gold = answer_letter(answer, options)
    return gold is not None and parse_mcq(output, options) == gold


# ---------------------------------------------------------------- open
def token_recall(output: str, answer: str) -> float:
    """Share of the answer's distinct tokens found in the output (LLaVA-Med's open-question recall)."""
    gold = set(tokens(answer))
    if not gold:
        return 0.0
    return len(gold & set(tokens(output))) / len(gold)


def token_f1(output: str, answer: str) -> float:
    """SQuAD-style token F1 on normalised text."""
    pred, gold = tokens(output), tokens(answer)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(output: str, answer: str) -> bool:
    return normalize(output) == normalize(answer)


def score_open(output: str, answer: str) -> dict:
    return {"recall": token_recall(output, answer), "f1": token_f1(output, answer), "exact_match": float(exact_match(output, answer))}


# ---------------------------------------------------------------- ProbMed pairs
def paired_accuracy(rows: list[dict]) -> list[float]:
    """ProbMed's paired metric: one value per pair, 1 only when every question of the pair is right.

    ``rows`` hold ``pair_id`` and ``correct``; rows without a pair id stand alone (ProbMed's abnormality questions).
    """
    groups: dict[str, list[bool]] = {}
    for i, row in enumerate(rows):
        key = row.get("pair_id") or f"__single_{i}"
        groups.setdefault(str(key), []).append(bool(row["correct"]))
    return [float(all(v)) for v in groups.values()]


# ---------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class Metric:
    n: int
    score: float | None
    stderr: float | None

    def as_dict(self) -> dict:
        return {"n": self.n, "score": self.score, "stderr": self.stderr}


def mean_stderr(values) -> Metric:
    """Mean and standard error of the mean (sample std, ddof 1); n 0 gives None, n 1 a stderr of None, never NaN."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Metric(0, None, None)
    mean = sum(vals) / n
    if n == 1:
        return Metric(1, mean, None)
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return Metric(n, mean, math.sqrt(var / n))
