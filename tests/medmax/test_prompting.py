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


def test_an_escaped_placeholder_is_text_as_build_sequences_reads_it():
    # \<image> is the text "<image>" in a training row (medmax.vocab.split_markers); a prompt reads it the same way
    assert prompt_segments("\\<image> is a tag", []) == ["<image> is a tag"]
    assert prompt_segments("\\<image> beside <image>", ["img"]) == ["<image> beside ", "img"]
    assert prompt_segments("a\\\\<image>", ["img"]) == ["a\\", "img"]  # an escaped backslash, then the placeholder
    assert place_images("\\<image> is a tag", 1) == "<image>\\<image> is a tag"  # no placeholder: the image goes first
    assert place_images("\\<image> beside <image>", 1) == "\\<image> beside <image>"


@pytest.mark.parametrize("text, n_images", [("\\<image> is a tag", 0), ("\\<image> beside <image>", 1),
                                            ("What is \\<image>?", 1), ("a\\\\<image>b", 1)])
def test_training_and_generation_give_one_layout_for_escaped_placeholders(tiny_tokenizer, tiny_vocab, text, n_images):
    from medmax.data.rows import SequenceBuilder
    from medmax.generation.prompts import ImageCodes, PromptEncoder

    codes = [3, 1, 4, 1, 5, 9, 2, 6]
    built = SequenceBuilder(tiny_tokenizer).build({"text": place_images(text, n_images) + "<reserved08706>yes",
                                                    "image_tokens": [codes] * n_images})
    prompt_ids = built.input_ids[: built.answer_mask().argmax()]

    class Grid:  # the encoder asks a VQGAN only for the size of its code grid
        n_codes_per_image, n_embed, grid_shape = len(codes), 16, (2, 4)

    encoder = PromptEncoder(tiny_tokenizer, tiny_vocab, Grid(), context_length=4096)
    segments = prompt_segments(text, [ImageCodes(codes)] * n_images, end_of_turn=True)
    assert encoder.encode(encoder.check([segments], "text")[0])[0] == prompt_ids.tolist()


def test_removing_the_placeholders_keeps_escaped_ones_as_text():
    from medmax.prompting import strip_placeholders

    assert strip_placeholders("<image>What is \\<image>?") == "What is \\<image>?"
    assert prompt_segments(strip_placeholders("<image>What is \\<image>?"), ["img"]) == ["img", "What is <image>?"]
    assert strip_placeholders("a\\\\<image>b") == "a\\b"  # the escaped backslash stays one backslash of text
    assert strip_placeholders("plain \\ text") == "plain \\ text"


def test_eval_removes_only_real_placeholders_from_a_vqa_prompt():
    from eval.data import EvalRecord
    from eval.prompts import build_prompt
    from eval.tasks import TASKS
    from pathlib import Path

    task = next(t for t in TASKS if t.kind == "closed")
    rec = EvalRecord("u:1", task.name, "closed", "<image>Is the \\<image> tag shown?", "yes", "a.png")
    assert build_prompt(rec, task, "default", Path("a.png")) == [Path("a.png"), "Is the <image> tag shown?"]
