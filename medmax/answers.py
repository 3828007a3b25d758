"""How an answer to a VQA question is read: normalised text, yes / no, MCQ options and their letters.

Shared by the evaluation (``eval.scoring`` scores with these rules; ``eval.data`` reads a row's options)
and by preference curation (``finetune.make_preferences`` tells a right answer from a wrong one and swaps
in another option), so both read a question the same way.

Normalisation (:func:`normalize`), in this order: Unicode NFKC; case folded; every punctuation and symbol
character (categories ``P*`` and ``S*``) becomes a space; each CJK ideograph (and kana) is a word of its
own; the articles a, an, the are dropped; whitespace is collapsed.

Yes / no (:func:`yes_no`): a short whole-answer phrase (``absent``, ``not seen`` ...), else the first yes or
no word; words that merely contain "no" (``not``, ``none``, ``normal``) never decide.

Multiple choice: a row's options are ``{"A": text, ...}`` or its JSON string (:func:`parse_options`), else
the lines "A: text" of the prompt (:func:`options_from_prompt`). The gold letter (:func:`resolve_gold`) is
the answer itself when it is a letter, else the option whose text equals it; :func:`parse_mcq` reads the
letter an output names. ``eval.scoring``'s docstring gives every rule with its reasons.
"""

from __future__ import annotations

import json
import re
import unicodedata

from .errors import UserError

# ---------------------------------------------------------------- normalisation
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


# ---------------------------------------------------------------- a row's options
def parse_options(value) -> dict | None:
    """A row's ``options``: ``{"A": text, ...}`` or its JSON string (MedMax's eval schema) -> ``{LETTER: text}``.

    None when absent; anything else (a list, a number, JSON that is no object) raises ``ValueError``.
    """
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    try:
        mapping = dict(json.loads(value) if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"options {value!r:.80}: expected {{letter: text}} or its JSON string") from None
    return {str(k).strip().upper(): str(v) for k, v in mapping.items() if v is not None}


_OPTION_LINE = re.compile(r"^\s*\(?([A-H])[).:]\s*(\S.*?)\s*$", re.MULTILINE)


def options_from_prompt(prompt: str) -> dict | None:
    """Options written into an MCQ prompt as lines "A: text", "(A) text", "A. text" (MedMax's rows carry no
    options column); None unless the letters run A, B, ... with at least two of them."""
    found = {}
    for letter, text in _OPTION_LINE.findall(prompt or ""):
        found.setdefault(letter, text)
    letters = sorted(found)
    if len(letters) < 2 or "".join(letters) != LETTERS[: len(letters)]:
        return None
    return {k: found[k] for k in letters}
