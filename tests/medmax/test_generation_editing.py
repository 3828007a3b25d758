"""Image-conditioned generation: guidance streams of an edit prompt, SJD against plain decoding, inpainting, edit regions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from medmax.generation import END_OF_TURN, GenerationConfig, Generator, ImageCodes
from medmax.generation.editing import EditMaskError, EditRegion, region_from_box, region_from_mask, region_from_spec
from medmax.generation.image import guidance_streams


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


def _codes(gen, seed: int) -> ImageCodes:
    n, limit = gen.vqgan.n_codes_per_image, min(gen.vqgan.n_embed, gen.vocab.n_codes)
    return ImageCodes(tuple(torch.randint(0, limit, (n,), generator=torch.Generator().manual_seed(seed)).tolist()))


def _edit_prompts(gen):
    one = [_codes(gen, 1), "Remove the lesion.", END_OF_TURN]
    two = [_codes(gen, 2), _codes(gen, 3), "Translate the first scan to the second's contrast.", END_OF_TURN]
    return [one, two, ["Generate a scan", END_OF_TURN]]


def _draw(gen, prompts, cfg, edits=None, **kw):
    return [o.images[0].codes for o in gen.generate(prompts, dataclasses.replace(cfg, **kw), edits=edits)]


def test_edit_prompt_streams_hold_full_condition_images_only_and_nothing(gen):
    v = gen.vocab
    (ids,) = gen.encode_prompts([_edit_prompts(gen)[1]])
    full, image_only, uncond = guidance_streams(v, ids)
    assert full == ids + [v.boi_id]
    blocks = [t for t in ids if v.is_image_code(torch.tensor([t])).item() or t in (v.boi_id, v.eoi_id)]
    assert image_only == [v.bos_id, *blocks, v.boi_id]  # both input images, no instruction, no end of turn
    assert len(blocks) == 2 * gen.n_image_tokens
    assert uncond == [v.bos_id, v.boi_id]


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_sjd_equals_plain_under_image_conditioned_guidance(gen, batch):
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, batch_size=batch,
                           guidance_scale_text=2.0, guidance_scale_image=1.5)
    prompts = _edit_prompts(gen)
    plain = [_draw(gen, [p], cfg, decoding="plain")[0] for p in prompts]
    assert _draw(gen, prompts, cfg, decoding="sjd") == plain


def _box_region(gen) -> np.ndarray:
    h, w = gen.vqgan.grid_shape
    region = np.zeros((h, w), dtype=bool)
    region[h // 4 : 3 * h // 4, : w // 2] = True
    return region


@pytest.mark.parametrize("decoding, temperature", [("plain", 1.0), ("sjd", 1.0), ("sjd", 0.0)])
def test_inpainting_keeps_every_code_outside_the_region(gen, decoding, temperature):
    prompts = _edit_prompts(gen)[:2]
    region = _box_region(gen)
    cfg = GenerationConfig(mode="image", image_temperature=temperature, image_top_p=1.0, decode_images=False,
                           batch_size=2, seed=3)
    out = _draw(gen, prompts, cfg, decoding=decoding, edits=[EditRegion(region), EditRegion(region, source=1)])
    outside = ~region.reshape(-1)
    for drawn, source in zip(out, [prompts[0][0], prompts[1][1]]):
        assert (np.array(drawn)[outside] == np.array(source.codes)[outside]).all()
    if decoding != "plain":
        return
    free = _draw(gen, prompts, cfg, decoding=decoding)  # without the edit region the outside changes: the test can fail
    assert any((np.array(f)[outside] != np.array(p.codes)[outside]).any() for f, p in zip(free, [prompts[0][0], prompts[1][1]]))


def test_greedy_inpainting_sjd_equals_plain_and_accepts_the_forced_drafts(gen):
    prompts = _edit_prompts(gen)
    edits = [EditRegion(_box_region(gen)), None, None]
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, batch_size=1)
    plain = _draw(gen, prompts[:1], cfg, decoding="plain", edits=edits[:1])
    sjd = _draw(gen, prompts[:1], cfg, decoding="sjd", edits=edits[:1])
    assert sjd == plain
    assert gen.image_decoder.stats["forwards"] < gen.vqgan.n_codes_per_image / 2  # forced runs accepted in windows
    assert _draw(gen, prompts, dataclasses.replace(cfg, batch_size=3), decoding="sjd", edits=edits)[0] == plain[0]


@pytest.mark.parametrize("mode, edit, prompt, match", [
    ("image", EditRegion(np.ones((3, 3), dtype=bool)), None, "code grid"),
    ("image", EditRegion(np.ones((1, 1), dtype=bool), source=0), ["Generate a scan"], "needs an input image"),
    ("text", None, None, "needs mode 'image'"),
])
def test_bad_edits_are_refused_before_model_work(gen, mode, edit, prompt, match):
    h, w = gen.vqgan.grid_shape
    if edit is not None and edit.region.shape == (1, 1):
        edit = EditRegion(np.ones((h, w), dtype=bool))
    edit = edit or EditRegion(np.ones((h, w), dtype=bool))
    with pytest.raises(EditMaskError, match=match):
        gen.generate([prompt or _edit_prompts(gen)[0]], GenerationConfig(mode=mode), edits=[edit])


def test_empty_region_is_refused():
    with pytest.raises(EditMaskError, match="empty"):
        EditRegion(np.zeros((4, 4), dtype=bool))


# ------------------------------------------------------------------------------------------ regions from pixels
def test_box_maps_to_the_codes_it_touches():
    region = region_from_box((0, 0, 48, 24), (96, 96), 64, (8, 8))  # top-left quarter's upper half
    expected = np.zeros((8, 8), dtype=bool)
    expected[:2, :4] = True
    assert (region == expected).all()
    assert region_from_box((47, 47, 49, 49), (96, 96), 64, (8, 8)).sum() == 4  # straddles four codes


def test_box_on_a_wide_image_goes_through_the_centre_crop():
    # a 192x96 image is resized to 128x64 and its centre 64x64 (x 32..96 of the resized, 48..144 of the image) kept
    region = region_from_box((48, 0, 96, 96), (192, 96), 64, (8, 8))
    assert region[:, :4].all() and not region[:, 4:].any()
    with pytest.raises(EditMaskError, match="outside the centre square"):
        region_from_box((0, 0, 40, 96), (192, 96), 64, (8, 8))


@pytest.mark.parametrize("box", [(0, 0, 97, 10), (10, 10, 10, 20), (-1, 0, 5, 5)])
def test_box_outside_the_image_or_empty_is_refused(box):
    with pytest.raises(EditMaskError, match="outside the 96x96 image or empty"):
        region_from_box(box, (96, 96), 64, (8, 8))


def test_masks_of_pixels_or_codes_and_their_errors():
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[60:70, 10:20] = 255
    region = region_from_mask(mask, (96, 96), 64, (8, 8))
    assert region_from_box((10, 60, 20, 70), (96, 96), 64, (8, 8)).tolist() == region.tolist()
    grid = np.zeros((8, 8), dtype=np.uint8)
    grid[2, 3] = 1
    assert np.argwhere(region_from_mask(grid, (96, 96), 64, (8, 8))).tolist() == [[2, 3]]
    with pytest.raises(EditMaskError, match="empty"):
        region_from_mask(np.zeros((96, 96)), (96, 96), 64, (8, 8))
    with pytest.raises(EditMaskError, match="neither the input image's 96x96 nor the model's 8x8 code grid"):
        region_from_mask(np.ones((32, 32)), (96, 96), 64, (8, 8))  # a mask for a 32x32 grid


def test_spec_reads_a_box_or_a_mask_file(tmp_path):
    image = Image.new("RGB", (96, 96))
    Image.fromarray(np.pad(np.full((12, 12), 255, np.uint8), ((0, 84), (0, 84)))).save(tmp_path / "m.png")
    assert region_from_spec(str(tmp_path / "m.png"), image, 64, (8, 8)).tolist() == \
        region_from_spec("0,0,12,12", image, 64, (8, 8)).tolist()
    with pytest.raises(EditMaskError, match="neither a box"):
        region_from_spec(str(tmp_path / "missing.png"), image, 64, (8, 8))
