"""The demo sequences follow the one prompt layout, so a model trained on them is asked the same way at generation."""

import numpy as np

from finetune.demo_data import QUESTION, demo_rows
from medmax.generation import Generator, ImageCodes
from medmax.prompting import prompt_segments
from medmax.data.loader import IGNORE_INDEX


def test_demo_prompt_is_what_generation_builds(tiny_model_dir, tiny_tokenizer, tiny_vocab):
    gen = Generator.from_dir(tiny_model_dir)
    v = tiny_vocab
    for ids, labels in demo_rows(tiny_tokenizer, 3, n_codes=gen.vqgan.n_codes_per_image, seed=4):
        prompt = ids[: ids.index(v.eot_id) + 1]
        codes = v.ids_to_codes(np.asarray(ids[ids.index(v.boi_id) + 1 : ids.index(v.eoi_id)]))
        assert gen.encode_prompts([prompt_segments(QUESTION, [ImageCodes(codes)], end_of_turn=True)]) == [prompt]
        assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])


def test_image_targets_put_the_loss_on_the_codes_only(tiny_tokenizer, tiny_vocab):
    v = tiny_vocab
    for ids, labels in demo_rows(tiny_tokenizer, 3, n_codes=16, image_targets=True):
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert [ids[i] for i in trained] == [labels[i] for i in trained]
        assert trained == list(range(ids.index(v.boi_id) + 1, ids.index(v.eoi_id) + 1))  # codes, then eoi
