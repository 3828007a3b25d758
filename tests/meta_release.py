"""Tiny checkpoints in Meta's original Chameleon layout, and a forward pass written in that parameterisation.

The files follow the Chameleon / Anole / MedMax releases as their readers take them (Meta's
``chameleon/inference/loader.py`` and ``transformer.py``, transformers' ``convert_chameleon_weights_to_hf.py``):

- ``models/<size>/params.json``: ``ModelArgs`` fields (``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
  ``vocab_size``, ``multiple_of``, ``ffn_dim_multiplier``, ``norm_eps``, ``rope_theta``, ``qk_normalization``,
  ``swin_norm``) under ``"model"`` (Meta's loader reads ``params["model"]``);
- ``models/<size>/consolidate_params.json``: ``model_parallel_size`` (Meta's loader requires this file and
  merges it last; transformers reads ``model_parallel_size`` from the merge, so it is at the top level of one
  of the two files; which one the readers do not show, and the reader here accepts either);
- ``consolidated.pth`` (7B) or ``consolidated.00.pth`` .. ``03.pth`` (30B): flat dicts of tensors, each
  shard with its slice of every split weight, its own copy of the replicated norms, its own
  ``q_normalization`` / ``k_normalization`` (they differ between the 30B's shards) and ``rope.freqs``;
- ``tokenizer/text_tokenizer.json`` with ``<reserved08707>``, and for MedMax ``text_tokenizer_modified.json``
  where that id is ``<image>``; ``tokenizer/vqgan.yaml`` (taming: ``target``, ``params`` with ``ckpt_path``
  and ``lossconfig``, which transformers' converter deletes) and ``vqgan.ckpt`` (a Lightning checkpoint:
  ``state_dict`` with discriminator ``loss.*`` leftovers, ``epoch``, ``global_step``).

:func:`meta_forward` is an independent reference: queries and keys are rotated as complex numbers over
adjacent pairs, as Meta's code does (xformers ``rope_padded``), with each shard's heads normalised by
that shard's LayerNorm and the row-parallel outputs summed, as the model-parallel ranks do.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
import yaml

from medmax.vocab import IMAGE_PLACEHOLDER


def _rand(gen, *shape, scale=0.2):
    return torch.randn(*shape, generator=gen) * scale


def release_params(dim=32, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=9272, multiple_of=16,
                   swin_norm=False, rope_theta=10000.0, qk_normalization=True) -> dict:
    model = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "vocab_size": vocab_size, "multiple_of": multiple_of,
             "ffn_dim_multiplier": None, "norm_eps": 1e-05, "rope_theta": rope_theta,
             "qk_normalization": qk_normalization, "swin_norm": swin_norm}
    if n_kv_heads is not None:
        model["n_kv_heads"] = n_kv_heads
    return {"model": model}


def _ffn_width(dim: int, multiple_of: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_shards(params: dict, shards: int, dtype=torch.float32, seed=0) -> list[dict[str, torch.Tensor]]:
    """Random weights in Meta's names and per-shard shapes; replicated norms equal, qk-norms per shard."""
    p = params["model"]
    gen = torch.Generator().manual_seed(seed)
    dim, heads, kv = p["dim"], p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    hd, ffn, vocab = dim // heads, _ffn_width(dim, p["multiple_of"]), p["vocab_size"]
    replicated = {"norm.weight": 1 + _rand(gen, dim, scale=0.1)}
    for i in range(p["n_layers"]):
        for name in ("attention_norm", "ffn_norm"):
            replicated[f"layers.{i}.{name}.weight"] = 1 + _rand(gen, dim, scale=0.1)
    freqs = 1.0 / p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    out = []
    for _ in range(shards):
        s = {"tok_embeddings.weight": _rand(gen, vocab, dim // shards, scale=1.0),
             "output.weight": _rand(gen, vocab // shards, dim), "rope.freqs": freqs.clone()}
        for i in range(p["n_layers"]):
            a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
            s[f"{a}.wq.weight"] = _rand(gen, heads // shards * hd, dim)
            s[f"{a}.wk.weight"] = _rand(gen, kv // shards * hd, dim)
            s[f"{a}.wv.weight"] = _rand(gen, kv // shards * hd, dim)
            s[f"{a}.wo.weight"] = _rand(gen, dim, heads // shards * hd)
            for norm in ("q_normalization", "k_normalization"):
                s[f"{a}.{norm}.weight"] = 1 + _rand(gen, hd, scale=0.3)
                s[f"{a}.{norm}.bias"] = _rand(gen, hd, scale=0.3)
            s[f"{f}.w1.weight"] = _rand(gen, ffn // shards, dim)
            s[f"{f}.w3.weight"] = _rand(gen, ffn // shards, dim)
            s[f"{f}.w2.weight"] = _rand(gen, dim, ffn // shards)
        s.update({k: v.clone() for k, v in replicated.items()})
        out.append({k: v.to(dtype) for k, v in s.items()})
    return out


def chameleon_tokenizer_json(tokenizer) -> str:
    """Chameleon's own text_tokenizer.json: the MedMax tokenizer with <image> named <reserved08707> again."""
    doc = json.loads(tokenizer.to_str())
    doc["model"]["vocab"]["<reserved08707>"] = doc["model"]["vocab"].pop(IMAGE_PLACEHOLDER)
    for token in doc["added_tokens"]:
        if token["content"] == IMAGE_PLACEHOLDER:
            token["content"] = "<reserved08707>"
    return json.dumps(doc)


def write_release(root, tokenizer, vqgan, shards=1, dtype=torch.float32, seed=0, medmax=True, size="7b", **params):
    """Write a tiny release into ``root``; returns (root, the Meta-layout shard dicts written)."""
    params_doc = release_params(**params)
    model_dir = root / "models" / size
    model_dir.mkdir(parents=True)
    (model_dir / "params.json").write_text(json.dumps(params_doc, indent=2))
    (model_dir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": shards}))
    state = random_shards(params_doc, shards, dtype, seed)
    names = ["consolidated.pth"] if shards == 1 else [f"consolidated.{i:02d}.pth" for i in range(shards)]
    for name, shard in zip(names, state):
        torch.save(shard, model_dir / name)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "text_tokenizer.json").write_text(chameleon_tokenizer_json(tokenizer))
    if medmax:
        tokenizer.save(str(tok_dir / "text_tokenizer_modified.json"))
    vq_params = dict(vqgan.params, ckpt_path="/checkpoint/vqgan.ckpt",
                     lossconfig={"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                 "params": {"disc_start": 0, "codebook_weight": 1.0}})
    (tok_dir / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-06,
                                                                   "target": "taming.models.vqgan.VQModel",
                                                                   "params": vq_params}}))
    vq_state = dict(vqgan.state_dict())
    vq_state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": vq_state, "epoch": 3, "global_step": 1000}, tok_dir / "vqgan.ckpt")
    return root, state


# ---------------------------------------------------------------------------------------------------------------------
# Reference forward in Meta's parameterisation


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_pairs(x, theta):
    """(T, H, hd): rotate each adjacent pair (2i, 2i+1) by position * theta^(-2i/hd), as complex numbers."""
    t, _, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)  # (T, hd/2)
    z = torch.view_as_complex(x.reshape(t, x.shape[1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None, :]).reshape(x.shape)


def _attention_shard(x, s, i, p, shards):
    a = f"layers.{i}.attention"
    heads, kv = p["n_heads"] // shards, (p.get("n_kv_heads") or p["n_heads"]) // shards
    hd, t = p["dim"] // p["n_heads"], x.shape[0]
    q, k, v = (x @ s[f"{a}.{w}.weight"].T for w in ("wq", "wk", "wv"))
    q = F.layer_norm(q.view(t, heads, hd), (hd,), s[f"{a}.q_normalization.weight"], s[f"{a}.q_normalization.bias"])
    k = F.layer_norm(k.view(t, kv, hd), (hd,), s[f"{a}.k_normalization.weight"], s[f"{a}.k_normalization.bias"])
    theta = p.get("rope_theta", 10000.0)
    q, k = _rotate_pairs(q, theta), _rotate_pairs(k, theta)
    k = k.repeat_interleave(heads // kv, dim=1)
    v = v.view(t, kv, hd).repeat_interleave(heads // kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
    return out @ s[f"{a}.wo.weight"].T  # this rank's part of the all-reduced output


def meta_forward(shards: list[dict[str, torch.Tensor]], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """(T,) token ids -> (T, vocab) logits, in float64, the way Meta's model-parallel ranks compute them."""
    p, n = params["model"], len(shards)
    shards = [{k: v.double() for k, v in s.items()} for s in shards]
    eps = p.get("norm_eps", 1e-5)  # a field params.json leaves out takes ModelArgs' default
    h = torch.cat([s["tok_embeddings.weight"][tokens] for s in shards], dim=-1)  # all-gather of embedding columns
    for i in range(p["n_layers"]):
        def attn(x):
            return sum(_attention_shard(x, s, i, p, n) for s in shards)

        def ffn(x):
            f = f"layers.{i}.feed_forward"
            return sum((F.silu(x @ s[f"{f}.w1.weight"].T) * (x @ s[f"{f}.w3.weight"].T)) @ s[f"{f}.w2.weight"].T
                       for s in shards)

        an, fn = shards[0][f"layers.{i}.attention_norm.weight"], shards[0][f"layers.{i}.ffn_norm.weight"]
        if p.get("swin_norm", False):
            h = h + _rms(attn(h), an, eps)
            h = h + _rms(ffn(h), fn, eps)
        else:
            h = h + attn(_rms(h, an, eps))
            h = h + ffn(_rms(h, fn, eps))
    h = _rms(h, shards[0]["norm.weight"], eps)
    return torch.cat([h @ s["output.weight"].T for s in shards], dim=-1)  # all-gather of vocabulary slices
