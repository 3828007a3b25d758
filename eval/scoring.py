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
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from medmax.errors import UserError

_ARTICLES = {"a", "an", "the"}
_CJK = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f])")
YES_WORDS = frozenset({"yes", "yep", "yeah"})
NO_WORDS = frozenset({"no", "nope"})
YES_PHRASES = frozenset({"present", "seen", "visible", "positive"})
NO_PHRASES = frozenset({"absent", "not present", "not seen", "not visible", "negative"})
LETTERS = "ABCDEFGH"


def _is_separator(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def normalize(text: str) -> str:
    """NFKC, case folded, Unicode punctuation and symbols to spaces, CJK characters split, articles dropped."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = "".join(" " if _is_separator(c) else c for c in text)
    words = _CJK.sub(r" \1 ", text).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize(text).split()


# ---------------------------------------------------------------- closed (yes / no)
def yes_no(text: str) -> str | None:
    """'yes' or 'no': a short whole-answer phrase, else the first yes/no word; None when neither (see the module doc)."""
    words = tokens(text)
    whole = " ".join(words)
    if whole in YES_PHRASES:
        return "yes"
    if whole in NO_PHRASES:
        return "no"
    for word in words:
        if word in YES_WORDS:
            return "yes"
        if word in NO_WORDS:
            return "no"
    return None


def score_closed(output: str, answer: str) -> bool:
    """Yes/no answers by :func:`yes_no`; other answers by normalised match of the leading words."""
    gold = normalize(answer)
    if gold in ("yes", "no"):
        return yes_no(output) == gold
    gold_tokens, out_tokens = gold.split(), tokens(output)
    return bool(gold_tokens) and out_tokens[: len(gold_tokens)] == gold_tokens


# ---------------------------------------------------------------- multiple choice
class UnresolvedGold(UserError):
    """An MCQ row whose gold answer names no single option: the row cannot be scored."""


# a letter alone at the start, in either case, behind optional brackets/"option", followed by the end or punctuation
# (a dash or apostrophe after it makes a word: "B-cell", "A's")
_LEADING_LETTER = re.compile(r"^\W*(?:(?:option|choice)\W*)?([A-Ha-h])(?![^\W_])(?=\s*$|\s*(?![-\u2010-\u2015\u2212'\u2019])[^\w\s])",
                             re.IGNORECASE)
_OPTION_LETTER = re.compile(r"\b(?:option|choice)\s*\(?([A-Ha-h])(?![^\W_])", re.IGNORECASE)
_STATED_LETTER = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s+)?\(?((?-i:[A-H]))\)?(?![A-Za-z])", re.IGNORECASE)
_LETTER_AND_TEXT = re.compile(r"^\(?([A-Ha-h])[).:]\s*(\S.*)$", re.DOTALL)


def resolve_gold(answer, options: dict[str, str] | None) -> str:
    """The gold option letter (see the module doc); raises :class:`UnresolvedGold` naming the answer and options."""
    text = unicodedata.normalize("NFKC", str(answer)).strip()
    bare = text.strip("()[].: ").upper()
    if len(bare) == 1 and bare in LETTERS and (not options or bare in options):
        return bare
    if not options:
        raise UnresolvedGold(f"MCQ answer {str(answer)!r} is not an option letter and the row has no options")
    exact = [k for k, v in options.items() if unicodedata.normalize("NFKC", str(v)).strip() == text]
    if len(exact) == 1:
        return exact[0]
    paired = _LETTER_AND_TEXT.match(text)  # "B) Skeletal muscle": PathMMU writes the letter and the option
    if paired and paired.group(1).upper() in options:
        letter = paired.group(1).upper()
        if normalize(options[letter]) == normalize(paired.group(2)):
            return letter
        raise UnresolvedGold(f"MCQ answer {str(answer)!r} names option {letter}, whose text is {options[letter]!r}")
    gold = normalize(text)
    similar = [k for k, v in options.items() if normalize(v) == gold]
    if len(similar) == 1 and not exact:
        return similar[0]
    named = ", ".join(exact or similar or options)
    why = "matches options" if (exact or similar) else "matches none of the options"
    raise UnresolvedGold(f"MCQ answer {str(answer)!r} {why} {named}")


def answer_letter(answer, options: dict[str, str] | None) -> str | None:
    """:func:`resolve_gold`, or None when the gold names no single option."""
    try:
        return resolve_gold(answer, options)
    except UnresolvedGold:
        return None


def parse_mcq(output: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an output names: "B", "b", "(b)", "B.", "option b", "Answer: B", else the quoted option text."""
    allowed = set(options) if options else set(LETTERS)
    text = unicodedata.normalize("NFKC", str(output))
    for pattern in (_LEADING_LETTER, _STATED_LETTER, _OPTION_LETTER):
        match = pattern.search(text)
        if match and match.group(1).upper() in allowed:
            return match.group(1).upper()
    return _letter_from_option_text(text, options) if options else None


def _letter_from_option_text(output: str, options: dict[str, str]) -> str | None:
    """The one option whose normalised text appears as whole words in the output; an option quoted only as part
    of a longer quoted option ("cell" in "giant cell tumor") does not count; two or more gives None."""
    padded = f" {normalize(output)} "
    hits = {k: normalize(v) for k, v in options.items() if normalize(v) and f" {normalize(v)} " in padded}
    kept = [k for k, v in hits.items() if not any(v != w and f" {v} " in f" {w} " for w in hits.values())]
    return kept[0] if len(kept) == 1 else None


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
