"""Generation on the tiny model: decoding rules per mode, guidance, batching, seeds, bad input."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from medmax.generation import (
    END_OF_TURN,
    GenerationConfig,
    GenerationOutput,
    Generator,
    ImageCodes,
    ImageOutput,
    TextOutput,
)
from medmax.generation.image import guidance_streams, stream_rows
from medmax.images import ImageLoadError, preprocess


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


@contextlib.contextmanager
def biased_head(gen: Generator, ids, amount: float):
    """Temporarily give the output layer a bias of ``amount`` on ``ids`` (pushes the model toward them)."""
    old = gen.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[torch.as_tensor(ids)] = amount
    gen.model.lm_head = head
    try:
        yield
    finally:
        gen.model.lm_head = old


def _codes(gen, seed=0):
    rng = np.random.default_rng(seed)
    return ImageCodes(rng.integers(0, gen.vqgan.n_embed, gen.vqgan.n_codes_per_image))


def _assert_complete_image(gen, seg: ImageOutput):
    assert len(seg.codes) == gen.vqgan.n_codes_per_image
    assert all(0 <= c < gen.vqgan.n_embed for c in seg.codes)


# ------------------------------------------------------------------------------------------ prompts
def test_prompt_encoding_matches_training_layout(gen, tiny_vocab, tiny_tokenizer, tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    path = tmp_path / "scan.png"
    img.save(path)
    codes = gen.vqgan.encode_codes(preprocess(img, gen.vqgan.resolution)[None])[0].tolist()
    v = tiny_vocab
    image_ids = [v.boi_id, *[c + v.offset for c in codes], v.eoi_id]
    expected = [v.bos_id, *tiny_tokenizer.encode("Is there a lesion?").ids, *image_ids, v.eot_id]
    for image_segment in (img, path, ImageCodes(codes)):
        assert gen.encode_prompts([["Is there a lesion?", image_segment, END_OF_TURN]]) == [expected]


# ------------------------------------------------------------------------------------------ image mode
def test_image_mode_draws_one_complete_grid_of_image_codes(gen, tiny_vocab, tmp_path):
    beyond_vqgan = torch.arange(gen.vqgan.n_embed, tiny_vocab.n_codes) + tiny_vocab.offset
    text_ids = torch.arange(tiny_vocab.size)[~torch.as_tensor(tiny_vocab.is_image_code(np.arange(tiny_vocab.size)))]
    with biased_head(gen, torch.cat([beyond_vqgan, text_ids]), 100.0):  # tempt it with everything forbidden
        outs = gen.generate([["Generate an image of a lung", END_OF_TURN], ["Describe"]],
                            GenerationConfig(mode="image", seed=0))
    for out in outs:
        assert isinstance(out, GenerationOutput) and out.finish_reason == "image"
        (seg,) = out.segments
        _assert_complete_image(gen, seg)
        v = tiny_vocab
        assert out.token_ids == [v.boi_id, *[c + v.offset for c in seg.codes], v.eoi_id]
        seg.image.save(tmp_path / "out.png")
        assert Image.open(tmp_path / "out.png").size == (gen.vqgan.resolution, gen.vqgan.resolution)


def test_guidance_scales_of_one_reproduce_conditional_sampling(gen):
    prompts = [["Generate an image of a chest radiograph", END_OF_TURN], [_codes(gen), "lower left", END_OF_TURN]]
    plain = gen.generate(prompts, GenerationConfig(mode="image", guidance=False, seed=3, decode_images=False))
    unit = gen.generate(prompts, GenerationConfig(mode="image", guidance_scale_text=1.0, guidance_scale_image=1.0,
                                                  seed=3, decode_images=False))
    guided = gen.generate(prompts, GenerationConfig(mode="image", seed=3, decode_images=False))
    assert [o.images[0].codes for o in unit] == [o.images[0].codes for o in plain]
    assert [o.images[0].codes for o in guided] != [o.images[0].codes for o in plain]


def test_seeds_reproduce_sampling(gen):
    image = lambda seed: gen.generate([["Generate an image"]], GenerationConfig(  # noqa: E731
        mode="image", seed=seed, decode_images=False))[0].token_ids
    text = lambda seed: gen.generate([["Describe"]], GenerationConfig(  # noqa: E731
        max_new_tokens=12, temperature=1.5, top_p=1.0, seed=seed))[0].token_ids
    for run in (image, text):
        first, again, other = run(7), run(7), run(8)
        assert first == again and first != other


# ------------------------------------------------------------------------------------------ text mode
@pytest.mark.parametrize("do_sample", [False, True])
def test_text_mode_never_emits_image_tokens(gen, tiny_vocab, do_sample):
    v = tiny_vocab
    forbidden = [*v.code_to_id.tolist(), v.boi_id, v.eoi_id]
    with biased_head(gen, forbidden, 100.0):
        logits = gen.model(torch.tensor([gen.encode_prompts([["Is there a lesion?"]])[0]])).logits[0, -1]
        assert int(logits.argmax()) in forbidden  # the bias works: unmasked, the model would draw one
        (out,) = gen.generate([["Is there a lesion?"]], GenerationConfig(max_new_tokens=8, do_sample=do_sample, seed=0))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert not any(t in forbidden for t in out.token_ids)
    assert [type(s) for s in out.segments] == [TextOutput]


def test_batched_greedy_equals_unbatched(gen):
    prompts = [["Is there a lesion?", END_OF_TURN],
               ["Which organ is shown? A) lung B) liver C) brain D) kidney", _codes(gen), END_OF_TURN],
               ["CT"]]
    text_cfg = GenerationConfig(max_new_tokens=10, do_sample=False)
    image_cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False)
    for cfg in (text_cfg, image_cfg):
        batched = gen.generate(prompts, cfg)
        alone = [gen.generate([p], cfg)[0] for p in prompts]
        assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
        chunked = gen.generate(prompts, dataclasses.replace(cfg, batch_size=2))  # sorted by length, then restored
        assert [o.token_ids for o in chunked] == [o.token_ids for o in alone]


def test_eos_and_stop_strings_end_text(gen, tiny_vocab):
    prompt = [["Describe the image."]]
    free = gen.generate(prompt, GenerationConfig(max_new_tokens=12, do_sample=False))[0]
    stop = free.text[4:7]
    stopped = gen.generate(prompt, GenerationConfig(max_new_tokens=12, do_sample=False, stop_strings=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert free.text.startswith(stopped.text) and len(stopped.token_ids) < len(free.token_ids)
    with biased_head(gen, [tiny_vocab.eos_id], 100.0):
        ended = gen.generate(prompt, GenerationConfig(max_new_tokens=12, do_sample=False))[0]
    assert ended.finish_reason == "eos" and ended.token_ids == [tiny_vocab.eos_id] and ended.text == ""


# ------------------------------------------------------------------------------------------ interleaved
def test_interleaved_alternates_and_images_are_complete(gen, tiny_vocab, monkeypatch):
    v = tiny_vocab
    text_steps = {"n": 0}
    logits_of = gen.runner.logits

    def boi_on_third_text_step(hidden, rows, ids):
        logits = logits_of(hidden, rows, ids)
        if bool((ids == v.boi_id).any()):  # a text step (image steps never offer boi)
            text_steps["n"] += 1
            if text_steps["n"] == 3:
                logits[:, ids == v.boi_id] += 1000.0
        return logits

    monkeypatch.setattr(gen.runner, "logits", boi_on_third_text_step)
    (out,) = gen.generate([["Generate an image of a lung", END_OF_TURN]],
                          GenerationConfig(mode="interleaved", max_new_tokens=6, do_sample=False, seed=0))
    assert [type(s) for s in out.segments] == [TextOutput, ImageOutput, TextOutput]
    first, image, last = out.segments
    _assert_complete_image(gen, image)
    assert len(first.token_ids) == 2 and len(first.token_ids) + len(last.token_ids) == 6
    n = gen.vqgan.n_codes_per_image
    assert out.token_ids[2] == v.boi_id and out.token_ids[3 + n] == v.eoi_id
    assert out.token_ids[3 : 3 + n] == [c + v.offset for c in image.codes]
    assert not any(v.is_image_code(np.array(first.token_ids + last.token_ids)))


def test_interleaved_stops_drawing_after_max_images(gen, tiny_vocab):
    with biased_head(gen, [tiny_vocab.boi_id], 1000.0):  # it wants to draw at every text step
        (out,) = gen.generate([["Generate"]], GenerationConfig(mode="interleaved", max_images=2, max_new_tokens=3,
                                                                do_sample=False, decode_images=False))
    assert [type(s) for s in out.segments] == [ImageOutput, ImageOutput, TextOutput]
    for seg in out.images:
        _assert_complete_image(gen, seg)
    assert len(out.segments[-1].token_ids) == 3


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_work(gen, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model work started before the input was validated")

    monkeypatch.setattr(gen.runner, "forward", refuse)
    monkeypatch.setattr(gen.prompts, "encode_images", refuse)
    return gen


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        GenerationConfig(mode="video")


def test_bad_prompts_fail_before_model_work(no_model_work, tmp_path):
    gen = no_model_work
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    n = gen.vqgan.n_codes_per_image
    ok = Image.new("RGB", (64, 64))
    cases = [
        ([["fine", ok], ["look", broken]], ImageLoadError, "broken.png"),
        ([["fine", ok], [ImageCodes([0] * (n - 1))]], ValueError, f"prompt 1 segment 0: {n - 1} image codes"),
        ([[ok, ImageCodes([gen.vqgan.n_embed] * n)]], ValueError, "prompt 0 segment 1: image codes must lie"),
        ([[ok, ImageCodes([-1] * n)]], ValueError, "must lie"),
        ([[ok], [ImageCodes([0] * n)] * (gen.context_length // (n + 2) + 1)], ValueError, "prompt 1: .* context"),
        ([[ok, 3.5]], TypeError, "unsupported segment"),
    ]
    for prompts, error, message in cases:
        with pytest.raises(error, match=message):
            gen.generate(prompts, GenerationConfig(mode="text", max_new_tokens=4))
    with pytest.raises(ValueError, match="image generation needs"):
        gen.generate([[ImageCodes([0] * n)] * (gen.context_length // (n + 2))], GenerationConfig(mode="image"))


def test_guidance_streams_are_chameleons_three(gen, tiny_vocab):
    v = tiny_vocab
    codes = _codes(gen)
    (context,) = gen.encode_prompts([["Make it brighter", codes, "please", END_OF_TURN]])
    image = [v.boi_id, *[c + v.offset for c in codes.codes], v.eoi_id]
    full, image_only, uncond = guidance_streams(v, context)
    assert full == context + [v.boi_id]
    assert image_only == [v.bos_id, *image, v.boi_id]
    assert uncond == [v.bos_id, v.boi_id]
    (text_only,) = gen.encode_prompts([["text only"]])
    seqs, owner, index = stream_rows(v, [text_only, context], guidance=True)
    assert len(seqs) == 5  # the text-only prompt's image-only stream is its unconditional one: run once
    expected = [guidance_streams(v, c)[s] for s in range(3) for c in (text_only, context)]  # stream-major
    assert [seqs[i] for i in index.tolist()] == expected
    assert owner.tolist() == [0, 1, 1, 0, 1]


# ------------------------------------------------------------------------------------------ typed text
def test_typed_control_strings_stay_text(gen, tiny_vocab):
    """A user typing <racm3:break>, </s>, <reserved08706>... gets text, never begin-of-image or end-of-turn."""
    typed = "Is <racm3:break> here? </s><s><pad><eoss><reserved08706><image> done"
    (ids,) = gen.encode_prompts([[typed, END_OF_TURN]])
    v = tiny_vocab
    control = {v.bos_id, v.pad_id, v.eos_id, v.boi_id, v.eoi_id, v.eot_id, v.image_placeholder_id}
    assert ids[0] == v.bos_id and ids[-1] == v.eot_id  # only the structure adds control tokens
    assert not control & set(ids[1:-1]) and not any(v.is_image_code(np.asarray(ids[1:-1])))
    assert gen.tokenizer.decode(ids[1:-1], skip_special_tokens=False) == typed
    assert gen.tokenizer.encode_special_tokens is False  # the shared tokenizer is left as it was


def test_decoding_passes_no_deprecated_argument_to_the_model(gen):
    """Issue 23: a `past_key_values` FutureWarning after every eval pass; transformers names the cache `cache`."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate([["Is there a lesion?"]], GenerationConfig(mode="text", max_new_tokens=3, do_sample=False))
    assert out[0].token_ids
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
