"""Image-conditioned rows (editing, modality translation): user images in, an assistant image out, loss on the answer only."""

import numpy as np
import pytest

from medmax.data.rows import IGNORE_INDEX, SequenceBuilder, SequenceConfig
from medmax.vocab import END_OF_TURN as EOT


def codes(seed: int, n: int = 16, high: int = 8192) -> list[int]:
    return np.random.default_rng(seed).integers(0, high, n).tolist()


def _blocks(built, vocab) -> list[tuple[int, int]]:
    """(start, end) of each image block, boi to eoi inclusive."""
    boi = np.flatnonzero(built.input_ids == vocab.boi_id)
    eoi = np.flatnonzero(built.input_ids == vocab.eoi_id)
    return list(zip(boi.tolist(), eoi.tolist()))


def _check_edit_row(built, vocab, inputs: list[list[int]], target: list[int]) -> None:
    blocks = _blocks(built, vocab)
    assert len(blocks) == len(inputs) + 1
    for (start, end), image in zip(blocks, [*inputs, target]):
        assert vocab.ids_to_codes(built.input_ids[start + 1 : end]).tolist() == image
    for start, end in blocks[:-1]:  # the user's images: context, never labels
        assert (built.labels[start : end + 1] == IGNORE_INDEX).all()
    start, end = blocks[-1]  # the answer image: every token, boi to eoi, is a label
    assert built.labels[start : end + 1].tolist() == built.input_ids[start : end + 1].tolist()
    assert (built.labels[:start] == IGNORE_INDEX).all()  # instruction and end of turn carry no loss


@pytest.mark.parametrize("n_inputs", [1, 3])
def test_conversation_with_user_images_and_an_assistant_image(tiny_tokenizer, tiny_vocab, n_inputs):
    inputs, target = [codes(i) for i in range(n_inputs)], codes(99)
    row = {"conversations": [{"role": "user", "content": "<image>" * n_inputs + "Translate the CT to MRI."},
                             {"role": "assistant", "content": "<image>"}],
           "images": [*inputs, target]}
    built = SequenceBuilder(tiny_tokenizer, SequenceConfig()).build(row)
    _check_edit_row(built, tiny_vocab, inputs, target)
    assert built.input_ids[-2:].tolist() == [tiny_vocab.eot_id, tiny_vocab.eos_id]


def test_medmax_row_with_two_inputs_and_an_answer_image(tiny_tokenizer, tiny_vocab):
    inputs, target = [codes(1), codes(2)], codes(3)
    row = {"text": f"<image><image>Remove the lesion.{EOT}<image>", "image_tokens": [*inputs, target]}
    built = SequenceBuilder(tiny_tokenizer, SequenceConfig()).build(row)
    _check_edit_row(built, tiny_vocab, inputs, target)


def test_answer_image_without_image_loss_trains_nothing_but_its_turn_end(tiny_tokenizer, tiny_vocab):
    row = {"conversations": [{"role": "user", "content": "<image>Make the lesion larger."},
                             {"role": "assistant", "content": "<image>"}], "images": [codes(1), codes(2)]}
    built = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_loss=False)).build(row)
    assert not tiny_vocab.is_image_code(built.labels[built.labels != IGNORE_INDEX]).any()
