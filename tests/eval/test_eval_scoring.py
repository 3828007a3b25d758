"""Scoring rules on crafted outputs, MedMax's miscounts among them."""

import math

import pytest

from eval.scoring import (answer_letter, exact_match, mean_stderr, normalize, paired_accuracy, parse_mcq, score_closed,
                          score_mcq, token_f1, token_recall, yes_no)


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
                                    "answer: b is wrong, the answer is B", " B ", "Option B"])
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
