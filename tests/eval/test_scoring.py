"""Scoring rules on crafted outputs, MedMax's miscounts among them."""

import math

import pytest

from eval.scoring import (UnresolvedGold, answer_letter, exact_match, mean_stderr, normalize, paired_accuracy, parse_mcq,
                          resolve_gold, score_closed, score_mcq, token_f1, token_recall, tokens, yes_no)


@pytest.mark.parametrize("output", ["not sure", "none", "Normal study.", "a lymph node", "nothing", "Noted.", "unknown"])
def test_words_containing_no_never_count_as_no(output):
    # MedMax: `'no' in output` scored all of these as "no"
    assert yes_no(output) is None
    assert not score_closed(output, "no")


@pytest.mark.parametrize("output,expected", [
    ("No.", "no"), ("no", "no"), ("NO, there is none", "no"), ("Yes", "yes"), ("yes, but there is no mass", "yes"),
    ("The answer is no.", "no"), ("There is a lesion: yes", "yes"),
])
def test_yes_no_first_whole_word_decides(output, expected):
    assert yes_no(output) == expected
    assert score_closed(output, expected)
    assert not score_closed(output, "no" if expected == "yes" else "yes")


def test_yes_answer_with_a_word_containing_no_is_right():
    # MedMax: "yes ... normal" contains 'no', so a right "yes" scored as wrong
    assert score_closed("Yes, the heart looks normal", "yes")


def test_closed_answers_that_are_not_yes_no_use_normalised_match():
    assert score_closed("The left lung.", "left lung")
    assert score_closed("Left lung, upper lobe", "left lung")
    assert not score_closed("right lung", "left lung")
    assert not score_closed("", "left lung")


@pytest.mark.parametrize("output", ["B", "(B)", "B.", "B) liver", "Answer: B", "the answer is B", "The answer is (B).",
                                    "answer: b is wrong, the answer is B", " B ", "Option B",
                                    # lower case and Unicode: real model output
                                    "b", "(b)", "b)", "b.", "option b", "Option (b)", "I choose option b.", "（Ｂ）", "«B»",
                                    "B。", "choice b"])
def test_mcq_letter_formats(output):
    options = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}
    assert parse_mcq(output, options) == "B"
    assert score_mcq(output, "B", options)


def test_mcq_letters_medmax_missed_and_false_letters():
    options = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}
    # MedMax compared output.upper().strip() to the letter: "(B)" and "B." scored 0
    assert score_mcq("(B)", "B", options) and score_mcq("B.", "B", options)
    # an article is not option A, and a lowercase 'a' after "answer is" is not a letter either
    assert parse_mcq("A lesion in the liver", options) == "B"  # falls back to the quoted option text
    assert parse_mcq("the answer is a mass", options) is None
    assert parse_mcq("E", options) is None  # not an offered option


def test_mcq_falls_back_to_option_text():
    options = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}
    assert parse_mcq("It is the brain.", options) == "C"
    assert parse_mcq("lung or liver", options) is None  # two options quoted, no winner
    longer = {"A": "cell", "B": "giant cell tumor"}
    assert parse_mcq("a giant cell tumor", longer) == "B"  # the longest quoted option wins


def test_omnimed_text_answers_map_to_letters():
    options = {"A": "Fundus photography", "B": "CT", "C": "MRI"}
    assert answer_letter("MRI", options) == "C"
    assert answer_letter("fundus photography.", options) == "A"
    assert answer_letter("ultrasound", options) is None
    assert score_mcq("C", "MRI", options)
    assert score_mcq("The image is an MRI", "MRI", options)
    assert not score_mcq("B", "MRI", options)


def test_open_metrics():
    assert normalize("The Left  Lung!") == "left lung"
    assert token_recall("a mass in the left lung", "left lung") == 1.0
    assert token_recall("right lung", "left lung") == 0.5
    assert math.isclose(token_f1("left upper lung", "left lung"), 0.8)
    assert token_f1("", "left lung") == 0.0
    assert exact_match("The left lung.", "left lung") and not exact_match("left lung mass", "left lung")


def test_probmed_paired_metric():
    rows = [
        {"pair_id": "1:modality", "correct": True}, {"pair_id": "1:modality", "correct": False},
        {"pair_id": "2:modality", "correct": True}, {"pair_id": "2:modality", "correct": True},
        {"pair_id": None, "correct": True},  # abnormality question: stands alone
    ]
    assert paired_accuracy(rows) == [0.0, 1.0, 1.0]


def test_mean_stderr_never_nan():
    assert mean_stderr([]).as_dict() == {"n": 0, "score": None, "stderr": None}
    one = mean_stderr([1.0])
    assert one.n == 1 and one.score == 1.0 and one.stderr is None
    m = mean_stderr([1, 0, 1, 0])
    assert m.score == 0.5 and math.isclose(m.stderr, math.sqrt((4 * 0.25 / 3) / 4))


# ---------------------------------------------------------------- real model output: Unicode, case, short answers
@pytest.mark.parametrize("output", ["Ｙｅｓ", "Yes—there is", "Yes…", "«Yes»", "Yes。", "✓ Yes", "Yes✓", "“Yes”", "¡Yes!",
                                    "Yes–no doubt", "【Yes】", "Yes・", "YES"])
def test_unicode_punctuation_and_symbols_separate_words(output):
    assert yes_no(output) == "yes"
    assert score_closed(output, "yes") and not score_closed(output, "no")


@pytest.mark.parametrize("output", ["Ｎｏ", "No—none seen", "No…", "«No»", "No。", "✗No"])
def test_unicode_no(output):
    assert yes_no(output) == "no" and score_closed(output, "no")


def test_normalize_is_nfkc_and_splits_on_every_punctuation_and_symbol():
    assert normalize("Ｌｅｆｔ　Ｌｕｎｇ") == "left lung"  # full-width letters and the ideographic space
    assert normalize("left—lung…") == "left lung"
    assert normalize("ﬁbrosis") == "fibrosis"  # the fi ligature
    assert normalize("left→lung ± mass ©") == "left lung mass"
    assert score_closed("Left lung。", "left lung")


def test_cjk_characters_are_words():
    # SLAKE's Chinese answers carry no spaces; each ideograph is a word so answers compare word by word
    assert tokens("是的，有") == ["是", "的", "有"]
    assert score_closed("是的", "是") and not score_closed("不是", "是")
    assert token_recall("左肺", "左肺") == 1.0


@pytest.mark.parametrize("output,expected", [
    ("Nope", "no"), ("nope.", "no"), ("Not present.", "no"), ("Absent", "no"), ("absent.", "no"), ("Negative.", "no"),
    ("not seen", "no"), ("Yep", "yes"), ("Yeah, there is", "yes"), ("Present.", "yes"), ("Positive", "yes"),
])
def test_short_answers_a_reader_calls_yes_or_no(output, expected):
    assert yes_no(output) == expected
    assert score_closed(output, expected)


@pytest.mark.parametrize("output", ["The mass is absent from the left lung but present on the right", "presentation",
                                    "not sure", "positively unclear", "absently"])
def test_short_answer_phrases_count_only_as_the_whole_answer(output):
    assert yes_no(output) is None


def test_mcq_lower_case_letters_are_not_articles():
    options = {"A": "lung", "B": "liver", "C": "brain", "D": "kidney"}
    assert parse_mcq("a mass", options) is None
    assert parse_mcq("a", options) == "A"  # the whole answer is the letter
    cells = {"A": "T-cell lymphoma", "B": "B-cell lymphoma"}
    assert parse_mcq("B-cell lymphoma", cells) == "B" and parse_mcq("A—T-cell lymphoma", cells) == "A"
    assert parse_mcq("B–cell lymphoma", {"A": "T-cell lymphoma", "C": "B-cell lymphoma"}) == "C"  # en dash: still a word


def test_gold_that_matches_no_option_is_an_error_not_a_wrong_answer():
    options = {"A": "CT", "B": "MRI"}
    with pytest.raises(UnresolvedGold, match="'ultrasound' matches none of the options A, B"):
        resolve_gold("ultrasound", options)
    with pytest.raises(UnresolvedGold):
        score_mcq("B", "ultrasound", options)
    with pytest.raises(UnresolvedGold, match="no options"):
        resolve_gold("MRI", None)


def test_gold_exact_option_text_wins_over_a_normalised_match():
    options = {"A": "T-1", "B": "T 1", "C": "T2"}  # A and B normalise alike
    assert resolve_gold("T 1", options) == "B" and resolve_gold("T-1", options) == "A"
    with pytest.raises(UnresolvedGold, match="A, B"):
        resolve_gold("t—1", options)  # neither exact: ambiguous
    assert resolve_gold("t2", options) == "C"


def test_gold_written_as_letter_and_text():
    options = {"A": "Hemorrhagic stroma", "B": "Both A) and C)", "C": "Fibrous (collagenous) stroma"}
    assert resolve_gold("B) Both A) and C)", options) == "B"  # PathMMU's answers repeat the option
    assert resolve_gold("(C) Fibrous (collagenous) stroma", options) == "C"
    assert resolve_gold("b", options) == "B"
    with pytest.raises(UnresolvedGold):
        resolve_gold("A) Fibrous (collagenous) stroma", options)  # the letter and the text disagree
