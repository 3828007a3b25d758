"""The one prompt layout (medmax.prompting): images before the text unless placeholders place them."""

import pytest

from medmax.prompting import END_OF_TURN, place_images, prompt_segments


def test_images_go_first_without_placeholders():
    assert prompt_segments("What is shown?", ["A", "B"], end_of_turn=True) == ["A", "B", "What is shown?", END_OF_TURN]
    assert place_images("What is shown?", 1) == "<image>What is shown?"


def test_placeholders_place_the_images():
    assert prompt_segments("Compare <image> with <image>.", [1, 2]) == ["Compare ", 1, " with ", 2, "."]
    assert prompt_segments("What is this?\n<image>", ["img"], strip=True) == ["What is this?", "img"]
    assert prompt_segments("<image>\nWhat is this?", ["img"]) == ["img", "\nWhat is this?"]


def test_text_without_images_is_unchanged():
    assert prompt_segments("Generate a scan", []) == ["Generate a scan"]


def test_placeholder_count_must_match():
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        prompt_segments("<image> and <image>", ["x"])
