"""Scoring rules for the evaluation suite (the default ``toolkit`` protocol), written to avoid MedMax's
known miscounts.

MedMax's published suite scores closed questions by substring (``'no' in output``), so "not",
"none", "normal" or "node" count as "no", generates a single token, and compares MCQ output to the
letter verbatim, so "(B)" or "Answer: B" score zero. Here every rule works on whole words of a
normalised text, and every metric carries n and its standard error.

Normalisation (:func:`normalize`), in this order:

- Unicode NFKC, so full-width ``Ｙｅｓ``, ligatures and the ideographic space read as their plain forms;
- case folded;
- every Unicode punctuation and symbol character (categories ``P*`` and ``S*``: em dash, ellipsis,
  guillemets, CJK full stop, check marks, arrows ...) becomes a space, so it separates words;
- each CJK ideograph (and kana) is a word of its own, since those scripts write no spaces (SLAKE's
  Chinese answers compare character by character, as Chinese VQA metrics usually do);
- the articles a, an, the are dropped; whitespace is collapsed.

Closed (yes/no) answers, :func:`yes_no`:

- the first whole word that is a yes word (``yes``, ``yep``, ``yeah``) or a no word (``no``,
  ``nope``) decides; words that merely contain "no" (``not``, ``none``, ``normal``, ``node``) never do;
- when the whole answer is one of a few short phrases a reader takes as yes or no, that decides:
  no = ``absent``, ``not present``, ``not seen``, ``not visible``, ``negative``;
  yes = ``present``, ``seen``, ``visible``, ``positive``. Only the whole answer counts, so
  "absent from the left lung but present on the right" decides nothing.

Multiple choice, :func:`parse_mcq`: a leading letter in either case (``B``, ``b``, ``(b)``, ``B.``,
``option b``, ``（Ｂ）``), a stated upper-case letter (``Answer: B``, ``the answer is B``; a lower-case
``a`` after "answer is" is an article), a letter after ``option``/``choice`` in either case, else the one
option whose text the answer quotes. The gold letter (:func:`resolve_gold`) is the answer itself when it
is a letter, else the option whose text equals the answer exactly, else the one option whose normalised
text equals it; a gold that resolves to no option, or to two, raises :class:`UnresolvedGold`. The
converters call it when they load a row, so such a row is a reported problem, never a silent "wrong".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

# The reading rules below (normalisation, yes / no, options and letters) live in medmax.answers, shared with
# finetune.make_preferences; they are re-exported here.
from medmax.answers import (  # noqa: F401
    LETTERS, NO_PHRASES, NO_WORDS, YES_PHRASES, YES_WORDS, UnresolvedGold, answer_letter, normalize, parse_mcq,
    resolve_gold, tokens, yes_no,
)


# ---------------------------------------------------------------- closed (yes / no)
def score_closed(output: str, answer: str) -> bool:
    """Yes/no answers by :func:`yes_no`; other answers by normalised match of the leading words."""
    gold = normalize(answer)
    if gold in ("yes", "no"):
        return yes_no(output) == gold
    gold_tokens, out_tokens = gold.split(), tokens(output)
    return bool(gold_tokens) and out_tokens[: len(gold_tokens)] == gold_tokens


# ---------------------------------------------------------------- multiple choice
def score_mcq(output: str, answer: str, options: dict[str, str] | None) -> bool:
    """Whether the output names the gold option; a gold naming no single option raises :class:`UnresolvedGold`."""
    return parse_mcq(output, options) == resolve_gold(answer, options)


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
