"""Speculative Jacobi decoding of image codes: greedy codes equal plain decoding's, samples follow the same distribution."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch

from medmax.errors import UserError
from medmax.generation import END_OF_TURN, GenerationConfig, Generator, ImageCodes
from medmax.generation.image import guidance_streams
from medmax.generation.jacobi import speculative_accept
from medmax.generation.sampling import instruct_guidance, processed_probs

ALPHA = 0.01  # significance of the chi-square test
PROMPTS = [["Generate an image of a brain MRI", END_OF_TURN], ["CT"],
           ["Generate an image of a chest radiograph with a small nodule in the right lung."], ["liver"]]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


@contextlib.contextmanager
def rigged_head(gen: Generator, scale: float, bias: dict[int, float]):
    """Temporarily scale the image-code rows of the output layer and add a bias on some token ids."""
    old = gen.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.weight[gen.image_decoder.code_ids] *= scale
        head.bias.zero_()
        for token, amount in bias.items():
            head.bias[token] = amount
    gen.model.lm_head = head
    try:
        yield
    finally:
        gen.model.lm_head = old


def codes(gen, prompts, cfg, **kw):
    return [o.images[0].codes for o in gen.generate(prompts, dataclasses.replace(cfg, **kw))]


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sjd_equals_plain_decoding(gen, guidance, batch):
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, guidance=guidance, batch_size=batch)
    prompts = PROMPTS[:batch]
    assert codes(gen, prompts, cfg, decoding="sjd") == codes(gen, prompts, cfg, decoding="plain")


@pytest.mark.parametrize("guidance, bias", [(True, 0.5), (False, 0.4)])
def test_greedy_sjd_equals_plain_with_long_accepted_runs(gen, guidance, bias):
    """A head biased toward code 7 makes runs of 7s that the drafts guess; other codes still break them."""
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, guidance=guidance, batch_size=4)
    prompts = [*PROMPTS[:3], [ImageCodes(tuple(range(gen.vqgan.n_codes_per_image))), "lower left"]]
    with rigged_head(gen, 1.0, {int(gen.image_decoder.code_ids[7]): bias}):
        plain = codes(gen, prompts, cfg, decoding="plain")
        sjd = codes(gen, prompts, cfg, decoding="sjd", sjd_window=8)
    stats = gen.image_decoder.stats
    assert sjd == plain
    assert any(set(c) != {7} for c in plain)  # not a constant image: drafts are also rejected
    assert stats["accepted"] / stats["drafts"] > 0.3  # long runs were accepted
    assert stats["forwards"] < gen.vqgan.n_codes_per_image / 2


def test_plain_decoding_matches_transformers_forward(gen):
    """The static per-row cache gives the codes a full forward over the whole sequence picks (greedy, no guidance)."""
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, guidance=False, decoding="plain")
    (out,) = gen.generate([PROMPTS[0]], cfg)
    ids = gen.encode_prompts([PROMPTS[0]])[0] + [gen.vocab.boi_id] + gen.image_decoder.code_ids[out.images[0].codes].tolist()
    logits = gen.model(torch.tensor([ids])).logits[0, -len(out.images[0].codes) - 1 : -1]  # (n, V)
    assert logits[:, gen.image_decoder.code_ids].argmax(-1).tolist() == out.images[0].codes


# ------------------------------------------------------------------------------------------ sampling
def test_seeds_stay_per_row_with_sjd(gen):
    cfg = GenerationConfig(mode="image", decode_images=False, decoding="sjd")
    together = gen.generate(PROMPTS, cfg, seeds=[5, 6, 7, 8])
    alone = gen.generate([PROMPTS[2]], cfg, seeds=[7])
    assert together[2].images[0].codes == alone[0].images[0].codes
    assert together[0].images[0].codes != gen.generate([PROMPTS[0]], cfg, seeds=[9])[0].images[0].codes


N_CODES, N_STEPS, SAMPLES = 3, 3, 2000
SAMPLING = GenerationConfig(mode="image", image_temperature=1.0, image_top_p=1.0, decode_images=False,
                            decoding="sjd", sjd_window=3, seed=0)
DEFAULT_SAMPLING = dataclasses.replace(SAMPLING, image_temperature=GenerationConfig.image_temperature,
                                       image_top_p=GenerationConfig.image_top_p)  # top-p cuts: zero-probability codes


def exact_distribution(gen, context: list[int], cfg: GenerationConfig) -> torch.Tensor:
    """(N_CODES ** N_STEPS,) autoregressive probabilities of the first codes, by enumerating every prefix.

    One batched forward over (every prefix) x (the three guidance streams), no cache, then guidance and
    the sampling transform, exactly as plain decoding applies them to one step.
    """
    code_ids, run = gen.image_decoder.code_ids, gen.runner
    prefixes = [p for k in range(N_STEPS) for p in itertools.product(range(N_CODES), repeat=k)]
    seqs = [s + code_ids[list(p)].tolist() for p in prefixes for s in guidance_streams(gen.vocab, context)]
    ids, mask, positions = run.left_pad(seqs)
    hidden = run.forward(ids, mask, positions, run.new_cache())  # (3 * prefixes, C)
    logits = run.logits(hidden, run.output_rows(code_ids), code_ids).view(len(prefixes), 3, -1)
    guided = instruct_guidance(logits[:, 0], logits[:, 1], logits[:, 2], cfg.guidance_scale_text, cfg.guidance_scale_image)
    probs = dict(zip(prefixes, processed_probs(guided, cfg.image_temperature, cfg.image_top_p, cfg.image_top_k)))
    return torch.stack([torch.stack([probs[seq[:k]][seq[k]] for k in range(N_STEPS)]).prod()
                        for seq in itertools.product(range(N_CODES), repeat=N_STEPS)])


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test; cells expecting fewer than 5 are pooled. -> p-value (regularised upper gamma)."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0), stat / 2))


def sampled_histogram(gen, context: list[int], cfg: GenerationConfig) -> torch.Tensor:
    rng = torch.Generator().manual_seed(cfg.seed)
    drawn = gen.image_decoder.draw([context] * SAMPLES, cfg, rng, n_steps=N_STEPS)  # (SAMPLES, N_STEPS)
    cell = (drawn * N_CODES ** torch.arange(N_STEPS - 1, -1, -1)).sum(-1)
    return torch.bincount(cell, minlength=N_CODES ** N_STEPS).double()


@pytest.fixture
def three_codes(gen, monkeypatch):
    """The image sampler restricted to three codes, with a sharp, context-dependent head."""
    monkeypatch.setattr(gen.image_decoder, "code_ids", gen.image_decoder.code_ids[:N_CODES])
    with rigged_head(gen, 3.0, {}):
        yield gen.encode_prompts([PROMPTS[0]])[0]


@pytest.mark.parametrize("cfg", [SAMPLING, DEFAULT_SAMPLING], ids=["t1", "defaults"])
def test_sjd_samples_follow_the_autoregressive_distribution(gen, three_codes, cfg):
    """Chi-square at ALPHA over the first three codes (27 cells), 2000 draws with guidance, fixed seed."""
    expected = exact_distribution(gen, three_codes, cfg).double() * SAMPLES
    observed = sampled_histogram(gen, three_codes, cfg)
    stats = gen.image_decoder.stats
    assert 0 < stats["accepted"] < stats["drafts"]  # drafts were accepted and rejected: both branches ran
    assert observed[expected == 0].sum() == 0  # nothing outside the top-p nucleus
    assert chi_square_p(observed[expected > 0], expected[expected > 0]) > ALPHA


def test_accepting_every_draft_fails_the_distribution_test(gen, three_codes, monkeypatch):
    monkeypatch.setattr(type(gen.image_decoder), "accept", staticmethod(lambda p, q, u: torch.ones_like(p, dtype=torch.bool)))
    expected = exact_distribution(gen, three_codes, SAMPLING).double() * SAMPLES
    assert chi_square_p(sampled_histogram(gen, three_codes, SAMPLING), expected) < ALPHA


def test_the_acceptance_rule_is_min_one_p_over_q():
    p, q = torch.tensor([[0.2, 0.5, 0.9]]), torch.tensor([[0.4, 0.5, 0.3]])
    assert speculative_accept(p, q, torch.tensor([[0.49, 0.99, 0.99]])).tolist() == [[True, True, True]]
    assert speculative_accept(p, q, torch.tensor([[0.51, 0.0, 0.0]])).tolist() == [[False, True, True]]


# ------------------------------------------------------------------------------------------ other modes
def test_interleaved_greedy_is_unchanged_by_sjd(gen):
    boi = gen.vocab.boi_id
    cfg = GenerationConfig(mode="interleaved", max_new_tokens=6, do_sample=False, image_temperature=0.0,
                           repetition_penalty=1.0, decode_images=False)
    with rigged_head(gen, 1.0, {boi: 50.0}):  # text draws begin-of-image at once
        outs = {d: gen.generate(PROMPTS[:2], dataclasses.replace(cfg, decoding=d)) for d in ("plain", "sjd")}
    assert all(o.images for o in outs["sjd"])
    assert [o.token_ids for o in outs["sjd"]] == [o.token_ids for o in outs["plain"]]


def test_guidance_prompts_run_once_each_and_unpadded(gen, monkeypatch):
    """Four text prompts with guidance: the shared <s><racm3:break> prefills once, and short prompts are not padded
    to the longest (groups of similar length)."""
    widths = []
    forward = gen.runner.forward_window
    monkeypatch.setattr(gen.runner, "forward_window", lambda ids, cache: widths.append(tuple(ids.shape)) or forward(ids, cache))
    cfg = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, decoding="plain", batch_size=4)
    out = codes(gen, PROMPTS, cfg)
    prefill = widths[: -(gen.vqgan.n_codes_per_image - 1)]  # then one forward per code after the first
    assert sum(rows for rows, _ in prefill) == len(PROMPTS) + 1  # the unconditional prompt once, not once per prompt
    widest = max(width for _, width in prefill)
    assert sum(rows * width for rows, width in prefill) < len(PROMPTS) * widest + 2 * widest  # less than all padded
    assert out == [codes(gen, [p], cfg)[0] for p in PROMPTS]  # alone, each prompt prefills at its own width


def test_auto_decoding_is_decided_by_the_settings_and_the_device():
    one, eight = GenerationConfig(mode="image", batch_size=1), GenerationConfig(mode="image", batch_size=8)
    # a CPU: plain at every batch (the trained quickstart model accepted 5 % of drafts: SJD measured 0.76x there)
    assert (one.image_decoding("cpu"), eight.image_decoding("cpu")) == ("plain", "plain")
    assert (one.image_decoding("cuda"), eight.image_decoding("cuda")) == ("sjd", "sjd")
    assert GenerationConfig(mode="image", batch_size=32).image_decoding("cuda") == "plain"
    assert GenerationConfig(mode="image", batch_size=8, decoding="sjd").image_decoding("cpu") == "sjd"
    with pytest.raises(UserError, match="decoding"):
        GenerationConfig(decoding="jacobi")


# ------------------------------------------------------------------------------------------ shaped layout
def _shaped(gen, out):
    """The image block of an output, read back as the shaped layout: -> (h, w, (h, w) codes)."""
    from medmax.image_layout import ShapedTokens

    tokens = ShapedTokens.from_tokenizer(gen.tokenizer)
    ids = out.token_ids
    start = ids.index(gen.vocab.boi_id)
    h, w, grid = tokens.read_block(gen.vocab, ids[start : ids.index(gen.vocab.eoi_id, start) + 1])
    return h, w, gen.vocab.ids_to_codes(grid)


@pytest.mark.parametrize("size, grid", [((64, 96), (8, 12)), ((96, 64), (12, 8))])
def test_shaped_greedy_sjd_equals_plain_and_keeps_the_layout(gen, size, grid):
    """--size HxW: end-of-line exactly every w codes, h rows, an H x W picture; SJD's drafts cross line ends."""
    cfg = GenerationConfig(mode="image", image_temperature=0.0, image_size=size, batch_size=2)
    with rigged_head(gen, 1.0, {int(gen.image_decoder.code_ids[7]): 0.5}):
        plain = gen.generate(PROMPTS[:2], dataclasses.replace(cfg, decoding="plain"))
        sjd = gen.generate(PROMPTS[:2], dataclasses.replace(cfg, decoding="sjd", sjd_window=8))
    stats = gen.image_decoder.stats
    assert [o.token_ids for o in sjd] == [o.token_ids for o in plain]
    assert stats["accepted"] / stats["drafts"] > 0.3 and stats["codes"] == 2 * grid[0] * (grid[1] + 1)
    for out in sjd:
        (image,) = out.images
        h, w, codes_hw = _shaped(gen, out)
        assert (h, w) == image.grid == grid and codes_hw.reshape(-1).tolist() == image.codes
        assert image.image.size == (size[1], size[0])  # PIL: (width, height)


def test_sampled_shaped_images_have_the_requested_shape_every_time(gen):
    for decoding in ("plain", "sjd"):
        cfg = GenerationConfig(mode="image", image_temperature=1.0, image_size=(32, 48), decoding=decoding,
                               decode_images=False, seed=3, batch_size=4)
        for out in gen.generate(PROMPTS, cfg):
            assert _shaped(gen, out)[:2] == (4, 6) and len(out.images[0].codes) == 24


def test_the_model_picks_the_grid_without_a_size(gen):
    from medmax.image_layout import ShapedTokens

    sizes = ShapedTokens.from_tokenizer(gen.tokenizer).size_ids
    cfg = GenerationConfig(mode="image", image_temperature=0.0, image_layout="shaped")
    with rigged_head(gen, 1.0, {int(sizes[3]): 60.0}):  # a model that learned 3-code sides
        (out,) = gen.generate([PROMPTS[0]], cfg)
    assert out.images[0].grid == (3, 3) and out.images[0].image.size == (24, 24) and _shaped(gen, out)[:2] == (3, 3)


def test_a_size_the_vqgan_cannot_tile_is_refused_before_drawing(gen, monkeypatch):
    from medmax.image_layout import ImageLayoutError

    monkeypatch.setattr(gen.image_decoder, "draw", lambda *a, **k: pytest.fail("drew an image"))
    with pytest.raises(ImageLayoutError, match="cannot tile"):
        gen.generate([PROMPTS[0]], GenerationConfig(mode="image", image_size=(60, 96)))
    with pytest.raises(UserError, match="image_size"):
        GenerationConfig(mode="image", image_size=(0, 8))


def exact_shaped_distribution(gen, context: list[int], cfg: GenerationConfig, layout) -> torch.Tensor:
    """(N_CODES ** h,) probabilities of a shaped h x 1 grid (code, end-of-line, code, end-of-line, ...) by enumerating
    every prefix: guidance, then end-of-line masked out of the code steps (the layout's only choice at its own steps)."""
    ids, run = layout.column_ids(gen.image_decoder.code_ids), gen.runner  # (N_CODES + 1,): the codes, then end-of-line
    eol = int(ids[-1])
    prefixes = [p for k in range(layout.h) for p in itertools.product(range(N_CODES), repeat=k)]
    seqs = [s + [t for c in p for t in (int(ids[c]), eol)] for p in prefixes
            for s in guidance_streams(gen.vocab, context, tuple(layout.prefix()))]
    tokens, mask, positions = run.left_pad(seqs)
    hidden = run.forward(tokens, mask, positions, run.new_cache())
    logits = run.logits(hidden, run.output_rows(ids), ids).view(len(prefixes), 3, -1)
    guided = instruct_guidance(logits[:, 0], logits[:, 1], logits[:, 2], cfg.guidance_scale_text, cfg.guidance_scale_image)
    guided[:, -1] = float("-inf")
    probs = dict(zip(prefixes, processed_probs(guided, cfg.image_temperature, cfg.image_top_p, cfg.image_top_k)))
    return torch.stack([torch.stack([probs[seq[:k]][seq[k]] for k in range(layout.h)]).prod()
                        for seq in itertools.product(range(N_CODES), repeat=layout.h)])


def test_shaped_sjd_samples_follow_the_autoregressive_distribution(gen, three_codes):
    """The shaped layout's sampled SJD (windows of 3 across end-of-lines, drafts forced there) draws the autoregressive
    distribution of a 3 x 1 grid: chi-square at ALPHA over its 27 cells, 2000 draws with guidance."""
    from medmax.generation.shaped import GridLayout
    from medmax.image_layout import ShapedTokens

    layout = GridLayout(ShapedTokens.from_tokenizer(gen.tokenizer), 3, 1, N_CODES)
    expected = exact_shaped_distribution(gen, three_codes, SAMPLING, layout).double() * SAMPLES
    drawn = gen.image_decoder.draw([three_codes] * SAMPLES, SAMPLING, torch.Generator().manual_seed(0), layout=layout)
    observed = torch.bincount((drawn * N_CODES ** torch.arange(2, -1, -1)).sum(-1), minlength=N_CODES ** 3).double()
    stats = gen.image_decoder.stats
    assert drawn.shape == (SAMPLES, 3) and 0 < stats["accepted"] < stats["drafts"]
    assert chi_square_p(observed, expected) > ALPHA
