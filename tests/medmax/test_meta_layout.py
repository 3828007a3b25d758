"""medmax.meta_layout: params, the rotary row order, per-shard query/key norms and the tokenizer variants."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ChameleonConfig

from medmax.meta_layout import (
    CONSOLIDATE_FILE,
    PARAMS_FILE,
    MetaParams,
    exact_shard_counts,
    ffn_hidden_dim,
    halves_to_pairs,
    hf_to_meta,
    pairs_to_halves,
    text_tokenizer_variants,
)


def test_pairs_to_halves_moves_each_heads_pair_members_into_the_two_halves():
    rows = torch.arange(16.0)[:, None]  # two heads of head_dim 8: rows 0..7 and 8..15
    halves = pairs_to_halves(rows, n_heads=2)[:, 0].tolist()
    assert halves == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(halves_to_pairs(pairs_to_halves(rows, 2), 2), rows)
    assert pairs_to_halves(torch.arange(4.0), 1).tolist() == [0, 2, 1, 3]  # a (head_dim,) norm vector


def test_pair_rotation_equals_half_rotation_after_the_permutation():
    """Meta's complex rotation of adjacent pairs, then the permutation, equals transformers' rotate_half."""
    from transformers.models.chameleon.modeling_chameleon import rotate_half

    torch.manual_seed(0)
    x, pos, hd = torch.randn(8, dtype=torch.float64), 5, 8
    angle = pos / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    meta = torch.view_as_real(torch.view_as_complex(x.view(4, 2)) * torch.polar(torch.ones(4, dtype=torch.float64), angle))
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()
    xh = pairs_to_halves(x, 1)
    torch.testing.assert_close(xh * cos + rotate_half(xh) * sin, pairs_to_halves(meta.reshape(8), 1))


def test_ffn_width_follows_metas_rule():
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Chameleon 7B
    assert ffn_hidden_dim(8192, 256, None) == 22016  # Chameleon 30B
    assert ffn_hidden_dim(32, 16, None) == 96


def _files(**model):
    return {PARAMS_FILE: {"model": {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "qk_normalization": True,
                                    **model}},
            CONSOLIDATE_FILE: {"model_parallel_size": 1}}


def test_params_are_merged_the_way_metas_loader_merges_them():
    files = _files(rope_theta=500000.0)
    files[CONSOLIDATE_FILE]["model_parallel_size"] = 4
    params = MetaParams.from_files(files)
    assert (params.model_parallel_size, params.rope_theta, params.max_position_embeddings) == (4, 500000.0, 16384)
    flat = MetaParams.from_files({PARAMS_FILE: {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64,
                                                "qk_normalization": True}})
    assert (flat.dim, flat.kv_heads, flat.max_position_embeddings) == (32, 4, 4096)


@pytest.mark.parametrize("change, message", [
    ({"dim": None}, "missing dim"),
    ({"n_heads": 3}, "must split into 3 heads"),
    ({"vocab_size": 66}, "vocab_size 66 is not divisible by model_parallel_size 4"),
    ({"n_kv_heads": 3}, "n_kv_heads 3 is not divisible by model_parallel_size 4"),
])
def test_params_that_cannot_describe_a_model_are_refused(change, message):
    files = _files(**change)
    files[CONSOLIDATE_FILE]["model_parallel_size"] = 4
    with pytest.raises(ValueError, match=message):
        MetaParams.from_files(files, "ckpt/models/7b/params.json")


def _config(**fields):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=96, vocabulary_map={})
    return ChameleonConfig(**{**base, **fields})


@pytest.mark.parametrize("width", [64, 96, 128, 200])
def test_params_from_a_config_rebuild_its_ffn_width(width):
    params = MetaParams.from_hf_config(_config(intermediate_size=width), shards=1)
    assert params.hidden_dim == width
    files = params.to_files()
    assert MetaParams.from_files(files).hidden_dim == width
    assert files[CONSOLIDATE_FILE] == {"model_parallel_size": 1}
    assert files[PARAMS_FILE]["model"]["qk_normalization"] is True


def test_remembered_params_files_come_back_unchanged():
    files = _files(multiple_of=16, norm_eps=1e-05, swin_norm=False)
    files[PARAMS_FILE]["other_field"] = "kept"
    params = MetaParams.from_files(files)
    config = _config(**params.hf_fields())
    assert MetaParams.from_hf_config(config, shards=1).to_files() == files


def _norm_getter(config, rows):
    def get(name):
        if "_norm." in name:
            return rows.clone()
        raise KeyError(name)
    return get


def test_shard_counts_that_hold_per_head_norms_exactly():
    config = _config()
    shared = torch.ones(4, 8)
    assert exact_shard_counts(_norm_getter(config, shared), config) == [1, 2, 4]
    per_pair = torch.tensor([[1.0] * 8, [1.0] * 8, [2.0] * 8, [2.0] * 8])  # two shards' rows, as the 30B has
    assert exact_shard_counts(_norm_getter(config, per_pair), config) == [2, 4]
    drifted = torch.arange(32.0).view(4, 8)  # every head its own row, as after fine-tuning
    assert exact_shard_counts(_norm_getter(config, drifted), config) == [4]


def test_hf_to_meta_refuses_heads_of_one_shard_with_different_norm_rows():
    from transformers import ChameleonForConditionalGeneration

    config = _config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChameleonForConditionalGeneration(config).state_dict().items()}
    state = {k: torch.zeros(shape) for k, shape in shapes.items() if "vqmodel" not in k}
    state["model.layers.0.self_attn.q_norm.weight"] = torch.arange(32.0).view(4, 8)
    params = MetaParams.from_hf_config(config, shards=1)
    with pytest.raises(ValueError, match="layers.0.self_attn.q_norm.weight: the heads of one model-parallel shard"):
        hf_to_meta(state.__getitem__, params)
    params = MetaParams.from_hf_config(config, shards=4)
    assert [s["layers.0.attention.q_normalization.weight"][0].item() for s in hf_to_meta(state.__getitem__, params)] \
        == [0.0, 8.0, 16.0, 24.0]


def test_medmax_tokenizer_gets_chameleons_file_back(tiny_tokenizer):
    files = text_tokenizer_variants(tiny_tokenizer)
    assert set(files) == {"text_tokenizer.json", "text_tokenizer_modified.json"}
    original = json.loads(files["text_tokenizer.json"])
    assert original["model"]["vocab"]["<reserved08707>"] == 8711 and "<image>" not in original["model"]["vocab"]
    assert any(t["content"] == "<reserved08707>" and t["id"] == 8711 for t in original["added_tokens"])
    assert json.loads(files["text_tokenizer_modified.json"])["model"]["vocab"]["<image>"] == 8711
