"""BiomedCLIP's open_clip layout read without open_clip, against references that follow open_clip's and timm's
computation literally on the same tiny random weights.

open_clip and timm cannot be installed beside this stack (both require torchvision), so the references here are
written from their source: timm ``VisionTransformer.forward_features`` + ``forward_head(global_pool='token')``
(patch conv, CLS prepended, position embedding added, pre-norm blocks with one fused qkv Linear reshaped
(B, N, 3, heads, head_dim), final norm, token 0) followed by open_clip ``TimmModel.head.proj``; and open_clip
``HFTextEncoder.forward`` (mask ``ids != pad_token_id``, ``AutoModel`` without pooler, ``last_hidden_state[:, 0]``,
mlp projection).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, BertConfig, BertTokenizerFast

from medmax.clip_score import ClipScorer
from medmax.open_clip_layout import OpenClipLayoutError

WIDTH, DEPTH, PATCH, SIZE, EMBED, TEXT_WIDTH = 128, 2, 16, 32, 48, 128
WORDS = ["a", "round", "lesion", "in", "the", "upper", "left", "liver", "ct", "scan", "of", "chest", "x", "ray"]


def _timm_trunk(g: torch.Generator) -> dict:
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    trunk = {"cls_token": r(1, 1, WIDTH), "pos_embed": r(1, (SIZE // PATCH) ** 2 + 1, WIDTH),
             "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
             "norm.weight": 1 + r(WIDTH), "norm.bias": r(WIDTH)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        trunk.update({b + "norm1.weight": 1 + r(WIDTH), b + "norm1.bias": r(WIDTH), b + "norm2.weight": 1 + r(WIDTH),
                      b + "norm2.bias": r(WIDTH), b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
                      b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
                      b + "mlp.fc1.weight": r(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": r(4 * WIDTH),
                      b + "mlp.fc2.weight": r(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": r(WIDTH)})
    return trunk


def _bert_config(vocab: int) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=TEXT_WIDTH // 64,
                      intermediate_size=256, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)


def _state(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    state = {f"visual.trunk.{k}": v for k, v in _timm_trunk(g).items()}
    state["visual.head.proj.weight"] = torch.randn(EMBED, WIDTH, generator=g) * 0.2
    torch.manual_seed(1)
    bert = AutoModel.from_config(_bert_config(vocab), add_pooling_layer=False)
    state.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    hidden = (TEXT_WIDTH + EMBED) // 2
    state["text.proj.0.weight"] = torch.randn(hidden, TEXT_WIDTH, generator=g) * 0.2
    state["text.proj.2.weight"] = torch.randn(EMBED, hidden, generator=g) * 0.2
    state["logit_scale"] = torch.tensor(4.6052)
    return state


def _config(**vision) -> dict:
    return {"model_cfg": {"embed_dim": EMBED,
                          "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                         "timm_pool": "", "timm_proj": "linear", "image_size": SIZE, **vision},
                          "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                       "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                       "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                       "context_length": 16}},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("biomedclip")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.save(_state(len(tokenizer)), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps(_config()))
    return folder


def _timm_vit_reference(trunk: dict, x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer, global_pool='token', no fc_norm, classifier reset: the CLS token after ``norm``."""
    x = F.conv2d(x, trunk["patch_embed.proj.weight"], trunk["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # (B, P, C)
    x = torch.cat([trunk["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + trunk["pos_embed"]
    heads = WIDTH // 64
    for i in range(DEPTH):
        p = lambda n: trunk[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (WIDTH,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        B, N, C = y.shape
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(x, (WIDTH,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    x = F.layer_norm(x, (WIDTH,), trunk["norm.weight"], trunk["norm.bias"], eps=1e-6)
    return x[:, 0]


def _reference_image(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    # TimmModel.head: drop, proj (with a bias in open_clip 2.x)
    return F.linear(_timm_vit_reference(trunk, pixels), state["visual.head.proj.weight"], state.get("visual.head.proj.bias"))


def _reference_text(state: dict, vocab: int, ids: torch.Tensor) -> torch.Tensor:
    bert = AutoModel.from_config(_bert_config(vocab), add_pooling_layer=False).eval()
    bert.load_state_dict({k[len("text.transformer."):]: v for k, v in state.items() if k.startswith("text.transformer.")})
    mask = (ids != bert.config.pad_token_id).long()
    pooled = bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0, :]  # ClsLastHiddenStatePooler
    return F.linear(F.gelu(F.linear(pooled, state["text.proj.0.weight"])), state["text.proj.2.weight"])


def test_open_clip_layout_equals_the_timm_and_open_clip_reference(open_clip_dir):
    scorer = ClipScorer.from_dir(open_clip_dir)
    state = torch.load(open_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.radial_gradient("L").convert("RGB").resize((48, 64))]
    pixels = torch.stack([scorer.pixels(im) for im in images])
    assert pixels.shape == (2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = scorer.model.get_image_features(pixels)
        want = _reference_image(state, pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    texts = ["a round lesion in the upper left", "chest x ray"]
    ids = scorer.tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want_text = _reference_text(state, len(scorer.tokenizer), ids)
    cos = (F.normalize(want, dim=-1) * F.normalize(want_text, dim=-1)).sum(-1)
    # the scorer pads to the batch's longest text, open_clip to context_length: the mask makes them equal
    assert scorer.image_text(images, texts) == pytest.approx(cos.tolist(), abs=1e-5)
    alone = [scorer.image_text([im], [t])[0] for im, t in zip(images, texts)]
    assert alone == pytest.approx(cos.tolist(), abs=1e-5)
    assert scorer.image_text(images[:1], ["  chest \n x  ray "]) == pytest.approx(scorer.image_text(images[:1], ["chest x ray"]), abs=1e-6)


def _copy(open_clip_dir, tmp_path):
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "open_clip_pytorch_model.bin"):
        if (open_clip_dir / name).is_file():
            (tmp_path / name).write_bytes((open_clip_dir / name).read_bytes())


def test_an_image_projection_with_a_bias_as_older_open_clip_saved_it(open_clip_dir, tmp_path):
    _copy(open_clip_dir, tmp_path)
    state = torch.load(open_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.head.proj.bias"] = torch.randn(EMBED, generator=torch.Generator().manual_seed(5))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_config()))
    scorer = ClipScorer.from_dir(tmp_path)
    pixels = scorer.pixels(Image.new("RGB", (40, 40), (90, 10, 160)))[None]
    with torch.no_grad():
        torch.testing.assert_close(scorer.model.get_image_features(pixels), _reference_image(state, pixels), rtol=1e-4, atol=1e-5)


def test_open_clip_layout_refuses_what_it_cannot_compute(open_clip_dir, tmp_path):
    _copy(open_clip_dir, tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_config(timm_pool="avg")))
    with pytest.raises(OpenClipLayoutError, match="timm_pool 'avg' is not supported"):
        ClipScorer.from_dir(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_config(image_size=64)))
    with pytest.raises(OpenClipLayoutError, match="pos_embed has 5 positions"):
        ClipScorer.from_dir(tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(OpenClipLayoutError, match="not an open_clip config"):
        ClipScorer.from_dir(tmp_path)


def test_the_open_clip_image_tower_as_an_fid_extractor(open_clip_dir):
    from eval.fid import load_extractor
    from medmax.image_metrics import extract

    extractor = load_extractor(open_clip_dir)  # auto: open_clip_config.json -> clip
    images = [Image.new("RGB", (40, 40), (i * 60, 20, 200 - i * 60)) for i in range(3)]
    feats = extract(extractor, images, batch_size=2)
    assert extractor.kind == "clip" and feats.shape == (3, EMBED)
    torch.testing.assert_close(feats, extractor.scorer.image_embeds(images))
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
