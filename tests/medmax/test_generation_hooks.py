"""The two hooks the demo needs from Generator.generate: a seed per prompt, and a callback per step."""

from __future__ import annotations

import pytest

from medmax.generation import END_OF_TURN, GenerationConfig, Generator, ImageOutput


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


SAMPLED = dict(max_new_tokens=10, temperature=1.5, top_p=1.0)


@pytest.mark.parametrize("mode", ["text", "image"])
def test_a_prompt_with_its_own_seed_samples_the_same_in_any_batch(gen, mode):
    cfg = GenerationConfig(mode=mode, decode_images=False, **SAMPLED)
    prompt, other = ["Is there a lesion?", END_OF_TURN], ["Describe the scan in detail", END_OF_TURN]
    (alone,) = gen.generate([prompt], cfg, seeds=[11])
    batch = gen.generate([other, prompt, prompt], cfg, seeds=[5, 11, 12])
    assert batch[1].token_ids == alone.token_ids
    assert batch[2].token_ids != alone.token_ids  # another seed, another draw
    shared = gen.generate([other, prompt], GenerationConfig(mode=mode, decode_images=False, seed=11, **SAMPLED))
    assert shared[1].token_ids != alone.token_ids  # without seeds, the batch shares one generator


def test_on_step_reports_every_token_and_image_in_order(gen):
    seen = []
    cfg = GenerationConfig(mode="text", seed=4, **SAMPLED)
    outs = gen.generate([["Describe", END_OF_TURN], ["Is there a lesion?", END_OF_TURN]], cfg,
                        on_step=lambda i, item: seen.append((i, item)))
    for i, out in enumerate(outs):
        assert [item for j, item in seen if j == i] == out.token_ids
    drawn = []
    (out,) = gen.generate([["Generate an image"]], GenerationConfig(mode="image", seed=1),
                          on_step=lambda i, item: drawn.append(item))
    assert len(drawn) == 1 and isinstance(drawn[0], ImageOutput) and drawn[0].codes == out.images[0].codes


def test_seeds_must_match_the_prompts(gen):
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        gen.generate([["q"]], GenerationConfig(max_new_tokens=2), seeds=[1, 2])
