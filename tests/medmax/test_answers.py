"""medmax.answers: the reading of a VQA answer that eval and preference curation share."""

import pytest

from medmax.answers import options_from_prompt, parse_options, resolve_gold


def test_options_are_a_mapping_or_its_json_string_and_anything_else_is_a_value_error():
    assert parse_options('{"a": "left", "B": "right"}') == {"A": "left", "B": "right"}
    assert parse_options({"A": "left", "B": None}) == {"A": "left"}
    assert parse_options(None) is None and parse_options("") is None
    for bad in ([1, 2], 3, "[1, 2]", "not json"):
        with pytest.raises(ValueError, match="options"):
            parse_options(bad)


def test_a_rows_options_decide_its_gold_letter_the_same_way_everywhere():
    options = options_from_prompt("Which side?\nA: left\nB: right")
    assert options == {"A": "left", "B": "right"} and resolve_gold("right", options) == "B"


def test_eval_reports_options_of_the_wrong_shape_as_a_problem_row():
    from eval.data import BadRow, record_from_row

    row = {"task_name": "pmc_vqa", "question_type": "mcq", "prompt": "Which?", "answer": "A", "image_path": "a.png",
           "options": [1, 2]}
    with pytest.raises(BadRow, match="options"):
        record_from_row(row, "f:1")
