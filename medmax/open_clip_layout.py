"""BiomedCLIP's open_clip layout (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``) read from a local
folder and run with transformers' BERT and ViT, not with open_clip.

Why not open_clip itself: its image tower is a timm model, and timm and open_clip both require torchvision, which
this toolkit does not install beside its torch (pip would resolve a torchvision that replaces or mismatches the
installed torch). The two towers BiomedCLIP uses are standard architectures transformers already implements:

- image: timm's ``vit_base_patch16_224`` with ``timm_pool: ""`` and ``timm_proj: linear``. open_clip's
  ``TimmModel`` then keeps the trunk's own pooling (``global_pool='token'``: the CLS token after the final
  LayerNorm, no ``fc_norm``), resets the classifier, and projects with ``head.proj`` (a Linear; with a bias
  in open_clip versions before ``proj_bias``, which the weights show).
  transformers' ``ViTModel`` (no pooler) computes the same thing: pre-norm blocks, exact GELU, LayerNorm eps 1e-6,
  CLS prepended before the position embedding. The weights map one to one, except timm's fused ``qkv`` Linear,
  which is split into query/key/value (timm reshapes it as (3, heads, head_dim), so the rows are q, then k, then v).
  A well-kept implementation with a key map is preferred to a hand-written ViT; tests/eval/test_open_clip_layout.py
  checks it against a reference that follows timm's ``VisionTransformer.forward`` literally.
- text: open_clip's ``HFTextEncoder`` around a BERT (``AutoModel`` without the pooling layer), attention mask
  ``input_ids != pad_token_id``, ``cls_last_hidden_state_pooler`` (``last_hidden_state[:, 0]``) and the ``mlp``
  projection ``Linear(d, (d+e)//2, bias=False) -> GELU -> Linear((d+e)//2, e, bias=False)``; the state dict's
  ``text.transformer.*`` are BERT's own keys.

The folder holds no BERT or ViT config (open_clip fetches the text config from the Hub by ``hf_model_name``), so
the sizes are read from the weights' shapes; the head count is width / 64, as in every ViT-B/S/L and BERT-base.
A BERT ``config.json`` in the folder, if present, is used for the text tower instead. The tokenizer files
(``tokenizer.json`` / ``vocab.txt``, as the BiomedCLIP repository ships them) must be in the folder.
The ``.bin`` is read by :func:`medmax.torch_files.load_torch_file` (``torch.load(weights_only=True)``): never
unpickled beyond that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_pytorch_model.bin"
HEAD_DIM = 64  # ViT-B/S/L and BERT-base: width / heads
TIMM_EPS = 1e-6  # timm's ViT LayerNorm
BERT_DROPPED = ("embeddings.position_ids", "pooler.")  # a non-persistent buffer and the unused pooler


class OpenClipLayoutError(UserError):
    """An open_clip folder this reader cannot use; the message names the file and the reason."""


def is_open_clip_dir(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def _heads(width: int, what: str) -> int:
    if width % HEAD_DIM:
        raise OpenClipLayoutError(f"{what}: width {width} is not a multiple of {HEAD_DIM}, so the head count is unknown")
    return width // HEAD_DIM


def vit_config(trunk: dict[str, torch.Tensor], image_size: int):
    """transformers ViTConfig for timm ViT weights (``visual.trunk.*`` without the prefix)."""
    from transformers import ViTConfig

    width, _, patch, _ = trunk["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in trunk if k.startswith("blocks.")})
    n_pos = trunk["pos_embed"].shape[1]
    if n_pos != (image_size // patch) ** 2 + 1:
        raise OpenClipLayoutError(f"{WEIGHTS_FILE}: pos_embed has {n_pos} positions, not 1 + ({image_size}/{patch})^2 "
                                  f"for image_size {image_size}")
    return ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=_heads(width, "visual.trunk"),
                     intermediate_size=trunk["blocks.0.mlp.fc1.weight"].shape[0], hidden_act="gelu",
                     layer_norm_eps=TIMM_EPS, image_size=image_size, patch_size=patch, qkv_bias=True)


# timm block key -> transformers ViTModel block key, in transformers 5 and in 4.x (the installed one is detected)
_VIT_NAMES = {
    "layers.{i}.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "q": "attention.q_proj", "k": "attention.k_proj",
                    "v": "attention.v_proj"},
    "encoder.layer.{i}.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "q": "attention.attention.query",
                           "k": "attention.attention.key", "v": "attention.attention.value"},
}


def timm_to_hf_vit(trunk: dict[str, torch.Tensor], depth: int, hf_keys) -> dict[str, torch.Tensor]:
    """timm ViT keys -> the keys ``hf_keys`` of a transformers ViTModel (fused qkv split into q, k, v)."""
    out = {"embeddings.cls_token": trunk["cls_token"], "embeddings.position_embeddings": trunk["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": trunk["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": trunk["patch_embed.proj.bias"],
           "layernorm.weight": trunk["norm.weight"], "layernorm.bias": trunk["norm.bias"]}
    block = next(b for b in _VIT_NAMES if b.format(i=0) + "layernorm_before.weight" in hf_keys)
    names = _VIT_NAMES[block]
    for i in range(depth):
        src, dst = f"blocks.{i}.", block.format(i=i)
        for p in ("weight", "bias"):
            for a in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{names[a]}.{p}"] = trunk[f"{src}{a}.{p}"]
            for name, part in zip("qkv", trunk[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):  # timm: (3, heads, head_dim)
                out[f"{dst}{names[name]}.{p}"] = part
    return out


def bert_config(text: dict[str, torch.Tensor], folder: Path, pad_token_id: int):
    """The text tower's BertConfig: the folder's config.json when it is a BERT's, else read from the shapes."""
    from transformers import BertConfig

    if (folder / "config.json").is_file():
        return BertConfig.from_pretrained(folder, local_files_only=True)
    vocab, width = text["embeddings.word_embeddings.weight"].shape
    return BertConfig(vocab_size=vocab, hidden_size=width, num_attention_heads=_heads(width, "text.transformer"),
                      num_hidden_layers=len({k.split(".")[2] for k in text if k.startswith("encoder.layer.")}),
                      intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=text["embeddings.token_type_embeddings.weight"].shape[0], pad_token_id=pad_token_id)


class OpenClipModel(nn.Module):
    """BiomedCLIP-style towers with the two methods :class:`medmax.clip_score.ClipScorer` calls."""

    def __init__(self, vit, bert, image_proj: nn.Linear, text_proj: nn.Sequential, pad_token_id: int):
        super().__init__()
        self.vit, self.bert, self.image_proj, self.text_proj = vit, bert, image_proj, text_proj
        self.pad_token_id = pad_token_id

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, E)
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state  # (B, 1 + P, D), after the final LayerNorm
        return self.image_proj(hidden[:, 0])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:  # (B, T) -> (B, E)
        mask = (input_ids != self.pad_token_id).long()  # open_clip's HFTextEncoder mask, whatever the tokenizer gave
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        return self.text_proj(hidden[:, 0])


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        model, vision, text = cfg["model_cfg"], cfg["model_cfg"]["vision_cfg"], cfg["model_cfg"]["text_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise OpenClipLayoutError(f"{path}: not an open_clip config with model_cfg.vision_cfg/text_cfg ({e})") from None
    if "timm_model_name" not in vision or "hf_model_name" not in text:
        raise OpenClipLayoutError(f"{path}: only a timm image tower with a Hugging Face text tower (BiomedCLIP's "
                                  "layout) is supported")
    for key, want in (("timm_pool", ""), ("timm_proj", "linear")):
        if vision.get(key, want) != want:
            raise OpenClipLayoutError(f"{path}: vision_cfg.{key} {vision[key]!r} is not supported (only {want!r})")
    for key, want in (("hf_proj_type", "mlp"), ("hf_pooler_type", "cls_last_hidden_state_pooler")):
        if text.get(key) != want:
            raise OpenClipLayoutError(f"{path}: text_cfg.{key} {text.get(key)!r} is not supported (only {want!r})")
    return cfg


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_open_clip_dir(folder: str | Path):
    """-> (OpenClipModel, tokenizer, image_size, mean, std, context_length) from a local open_clip folder."""
    from transformers import AutoTokenizer, BertModel, ViTModel

    from .torch_files import load_torch_file

    folder = Path(folder)
    cfg = read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise OpenClipLayoutError(f"{folder}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    state = load_torch_file(folder / WEIGHTS_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model_cfg, image_size = cfg["model_cfg"], int(cfg["model_cfg"]["vision_cfg"].get("image_size", 224))
    trunk = _split(state, "visual.trunk.")
    vconf = vit_config(trunk, image_size)
    vit = ViTModel(vconf, add_pooling_layer=False)
    vit.load_state_dict(timm_to_hf_vit(trunk, vconf.num_hidden_layers, vit.state_dict().keys()), strict=True)
    text = {k: v for k, v in _split(state, "text.transformer.").items() if not k.startswith(BERT_DROPPED)}
    bert = BertModel(bert_config(text, folder, tokenizer.pad_token_id), add_pooling_layer=False)
    bert.load_state_dict(text, strict=True)
    embed = int(model_cfg["embed_dim"])
    # open_clip 2.x before ``proj_bias`` gave head.proj a bias (BiomedCLIP's era); newer versions do not
    image_proj = nn.Linear(vconf.hidden_size, embed, bias="visual.head.proj.bias" in state)
    image_proj.load_state_dict(_split(state, "visual.head.proj."))
    d = bert.config.hidden_size
    text_proj = nn.Sequential(nn.Linear(d, (d + embed) // 2, bias=False), nn.GELU(), nn.Linear((d + embed) // 2, embed, bias=False))
    text_proj.load_state_dict(_split(state, "text.proj."))
    pre = cfg.get("preprocess_cfg", {})
    return (OpenClipModel(vit, bert, image_proj, text_proj, tokenizer.pad_token_id), tokenizer, image_size,
            pre.get("mean"), pre.get("std"), int(model_cfg["text_cfg"].get("context_length", 77)))
