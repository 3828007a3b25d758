"""Meta's original Chameleon layout (Chameleon, Anole, MedMax releases) and its mapping to transformers' Chameleon.

The layout, as Meta's ``chameleon`` inference code (``chameleon/inference/loader.py``) and transformers'
``convert_chameleon_weights_to_hf.py`` read it::

    CKPT/models/7b/params.json              ModelArgs fields, nested under "model"
    CKPT/models/7b/consolidate_params.json  merged over params.json (Meta's loader requires the file)
    CKPT/models/7b/consolidated.pth         one file, or the model-parallel shards consolidated.00.pth ..
    CKPT/tokenizer/text_tokenizer.json      MedMax: text_tokenizer_modified.json, <image> at <reserved08707>'s id
    CKPT/tokenizer/vqgan.yaml, vqgan.ckpt   taming VQModel; the .ckpt holds {"state_dict": {...}}

Facts the mapping rests on (Meta's ``chameleon/inference/transformer.py``, transformers' converter):

- Meta rotates query/key features in adjacent pairs (2i, 2i+1) (xformers ``rope_padded``); transformers
  rotates halves (i, i + head_dim/2). Each head's rows of ``wq`` / ``wk`` are permuted accordingly.
- ``attention.q_normalization`` / ``k_normalization`` are one ``LayerNorm(head_dim)`` per model-parallel
  shard, applied to each of that shard's heads before the rotation, in the pair order. transformers'
  ``q_norm`` / ``k_norm`` hold one (weight, bias) row per head, in the half order: each head carries its
  shard's row. (The 30B release's shards hold different rows.)
- Model parallelism: ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` and ``output`` are split by rows (dim 0),
  ``wo`` and ``w2`` by columns (dim 1), ``tok_embeddings`` by embedding columns (dim 1);
  ``attention_norm``, ``ffn_norm`` and ``norm`` are replicated.
- ``rope.freqs`` is a derived buffer that Meta's loader expects and ignores; it is recomputed from ``rope_theta``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .torch_files import CheckpointError, check_zip_crc

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
CONSOLIDATE_FILE = "consolidate_params.json"
ROPE_FREQS = "rope.freqs"
CONFIG_KEY = "chameleon_original_params"  # where a model folder's config.json remembers the original params files
IMAGE_PLACEHOLDER = "<image>"
IMAGE_PLACEHOLDER_ORIGINAL = "<reserved08707>"  # the token MedMax renames to <image>
_MODEL_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "qk_normalization", "swin_norm")
# Meta's ModelArgs defaults: a field left out of params.json takes these
_META_DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                  "rope_theta": 10000.0, "qk_normalization": False, "swin_norm": False, "max_seq_len": None}
_REQUIRED = object()


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width for ``hidden_dim=4*dim`` (``chameleon/inference/transformer.py``)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class MetaParams:
    """The model arguments of one checkpoint, from ``params.json`` + ``consolidate_params.json``."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_normalization: bool = False
    swin_norm: bool = False
    model_parallel_size: int = 1
    max_seq_len: int | None = None
    files: dict = field(default_factory=dict, compare=False)  # the raw JSON, kept for writing the layout back

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def max_position_embeddings(self) -> int:
        """``max_seq_len`` when the files give it, else transformers' converter's rule (16384 above theta 10000)."""
        if self.max_seq_len:
            return int(self.max_seq_len)
        return 16384 if self.rope_theta > 10000.0 else 4096

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "MetaParams":
        """Read ``params.json`` (and ``consolidate_params.json`` when present) the way Meta's loader merges them."""
        model_dir = Path(model_dir)
        files = {PARAMS_FILE: _read_json(model_dir / PARAMS_FILE)}
        if (model_dir / CONSOLIDATE_FILE).is_file():
            files[CONSOLIDATE_FILE] = _read_json(model_dir / CONSOLIDATE_FILE)
        return cls.from_files(files, model_dir / PARAMS_FILE)

    @classmethod
    def from_files(cls, files: dict, where: str | Path = PARAMS_FILE) -> "MetaParams":
        """``where``: the path of ``params.json`` (``consolidate_params.json`` sits beside it), for messages."""
        params = files[PARAMS_FILE]
        nested = params.get("model") if isinstance(params.get("model"), dict) else {}
        merged = {**params, **nested, **files.get(CONSOLIDATE_FILE, {})}
        missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if merged.get(k) is None]
        if missing:
            raise CheckpointError(f"{where}: missing {', '.join(missing)} (looked at the top level and under 'model')")
        known = {k: merged[k] for k in (*_MODEL_ARGS, "model_parallel_size", "max_seq_len") if merged.get(k) is not None}
        for key, value in known.items():
            _check_field(key, value, _source(files, key, Path(where)))
        out = cls(**known, files=files)
        out.validate(where)
        return out

    def validate(self, where: str | Path) -> None:
        mp = self.model_parallel_size
        if self.dim % self.n_heads or self.head_dim % 2:
            raise CheckpointError(f"{where}: dim {self.dim} must split into {self.n_heads} heads of an even size")
        for name, value in (("n_heads", self.n_heads), ("n_kv_heads", self.kv_heads), ("dim", self.dim),
                            ("vocab_size", self.vocab_size), ("FFN width", self.hidden_dim)):
            if value % mp:
                raise CheckpointError(f"{where}: {name} {value} is not divisible by model_parallel_size {mp}")
        if self.n_heads % self.kv_heads:
            raise CheckpointError(f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if not self.qk_normalization:
            raise CheckpointError(
                f"{where}: qk_normalization is false; transformers' Chameleon always normalises queries and keys "
                "per head, so a checkpoint without that normalisation has no equivalent there")

    def hf_fields(self) -> dict:
        """The ``ChameleonConfig`` fields these arguments decide."""
        return dict(
            hidden_size=self.dim, intermediate_size=self.hidden_dim, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab_size,
            rms_norm_eps=self.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            max_position_embeddings=self.max_position_embeddings, model_parallel_size=self.model_parallel_size,
            swin_norm=bool(self.swin_norm), **{CONFIG_KEY: self.files},
        )

    @classmethod
    def from_hf_config(cls, config, shards: int) -> "MetaParams":
        """The arguments that rebuild ``config`` in Meta's code with ``shards``-way model parallelism."""
        remembered = getattr(config, CONFIG_KEY, None) or {}
        old = cls._remembered(remembered)
        multiple_of, multiplier = _ffn_settings(config.hidden_size, config.intermediate_size, old)
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        kv = config.num_key_value_heads
        if kv == config.num_attention_heads and (old is None or old.n_kv_heads is None):
            kv = None  # Meta's default: as many as query heads
        out = cls(
            dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
            n_kv_heads=kv, vocab_size=config.vocab_size, multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier, norm_eps=config.rms_norm_eps, rope_theta=rope, qk_normalization=True,
            swin_norm=bool(config.swin_norm), model_parallel_size=shards,
            max_seq_len=old.max_seq_len if old else None, files=remembered,
        )
        out.validate(f"model config with {shards} shard(s)")
        return out

    @classmethod
    def _remembered(cls, files: dict) -> "MetaParams | None":
        try:
            return cls.from_files(files) if PARAMS_FILE in files else None
        except (ValueError, TypeError) as exc:  # stale or foreign; the config's own fields decide
            logger.warning("ignoring the remembered original params (%s)", exc)
            return None

    def to_files(self) -> dict:
        """``params.json`` and ``consolidate_params.json`` contents: the remembered files with these values.

        A field is written where the original had it (top level or under "model"), or under "model" when it
        is new and differs from Meta's ``ModelArgs`` default; ``model_parallel_size`` always goes to
        ``consolidate_params.json`` (and wherever else the original had it).
        """
        params = json.loads(json.dumps(self.files.get(PARAMS_FILE, {})))
        consolidate = json.loads(json.dumps(self.files.get(CONSOLIDATE_FILE, {})))
        nested = params.setdefault("model", {})
        values = {k: getattr(self, k) for k in (*_MODEL_ARGS, "max_seq_len")}
        for key, value in values.items():
            if key in params and key not in nested:
                params[key] = value
            elif key in nested or value != _META_DEFAULTS.get(key, _REQUIRED):
                nested[key] = value
        for where in (params, nested, consolidate):
            if "model_parallel_size" in where or where is consolidate:
                where["model_parallel_size"] = self.model_parallel_size
        return {PARAMS_FILE: params, CONSOLIDATE_FILE: consolidate}


# what each params field must be: "count" a positive integer, "number" a positive number, "flag" a boolean
_FIELD_KINDS = {"dim": "count", "n_layers": "count", "n_heads": "count", "n_kv_heads": "count", "vocab_size": "count",
                "multiple_of": "count", "model_parallel_size": "count", "max_seq_len": "count",
                "ffn_dim_multiplier": "number", "norm_eps": "number", "rope_theta": "number",
                "qk_normalization": "flag", "swin_norm": "flag"}
_KIND_WORDS = {"count": "a positive integer (below 2**53)", "number": "a positive number (below 2**53)",
               "flag": "true or false"}


def _check_field(key: str, value, where: Path) -> None:
    """One params field of the right JSON type and range, or a CheckpointError naming its file and key."""
    kind = _FIELD_KINDS[key]
    if kind == "flag":
        fits = isinstance(value, bool)
    else:
        number = isinstance(value, int) if kind == "count" else isinstance(value, (int, float))
        fits = number and not isinstance(value, bool) and 0 < value < 2**53
    if not fits:
        raise CheckpointError(f"{where}: {key} is {json.dumps(value)}; it must be {_KIND_WORDS[kind]}")


def _source(files: dict, key: str, params_path: Path) -> Path:
    """The file whose ``key`` Meta's merge keeps: consolidate_params.json over params.json."""
    return params_path.with_name(CONSOLIDATE_FILE) if key in files.get(CONSOLIDATE_FILE, {}) else params_path


def _ffn_settings(dim: int, width: int, old: MetaParams | None) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give an FFN of ``width``: the original's, else the simplest that fit."""
    base = int(2 * 4 * dim / 3)
    candidates = [(old.multiple_of, old.ffn_dim_multiplier)] if old else []
    candidates += [(256, None), (width, None), (1, (width + 0.5) / base)]
    for multiple_of, multiplier in candidates:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == width:
            return multiple_of, multiplier
    raise CheckpointError(f"no multiple_of / ffn_dim_multiplier gives an FFN width of {width} for dim {dim}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return doc


# ---------------------------------------------------------------------------------------------------------------------
# Per-head rotary order: Meta's adjacent pairs <-> transformers' halves


def pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a (n_heads*head_dim, ...) projection, or a (head_dim,) norm vector, from pair to half order."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`pairs_to_halves`."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Meta -> transformers, one tensor at a time


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and dtype known before any data is read, built on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]
    sources: tuple[torch.Tensor, ...] = ()  # the input tensors it reads (their pages can be released after)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


# (Meta name, transformers name, split dim: 0 rows / 1 columns / None replicated, rotary heads: "q" / "k" / None)
_LAYER_MAP = (
    ("attention.wq.weight", "self_attn.q_proj.weight", 0, "q"),
    ("attention.wk.weight", "self_attn.k_proj.weight", 0, "k"),
    ("attention.wv.weight", "self_attn.v_proj.weight", 0, None),
    ("attention.wo.weight", "self_attn.o_proj.weight", 1, None),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", 0, None),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", 0, None),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", 1, None),
    ("attention_norm.weight", "input_layernorm.weight", None, None),
    ("ffn_norm.weight", "post_attention_layernorm.weight", None, None),
)
_QK_NORMS = (("attention.q_normalization", "self_attn.q_norm", "q"), ("attention.k_normalization", "self_attn.k_norm", "k"))
_TOP_MAP = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", 1),
    ("output.weight", "lm_head.weight", 0),
    ("norm.weight", "model.norm.weight", None),
)


def _full_shapes(p: MetaParams) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of each Meta tensor (layer tensors by their name after ``layers.N.``)."""
    d, q, kv = p.dim, p.n_heads * p.head_dim, p.kv_heads * p.head_dim
    shapes = {
        "attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, q), "feed_forward.w1.weight": (p.hidden_dim, d),
        "feed_forward.w3.weight": (p.hidden_dim, d), "feed_forward.w2.weight": (d, p.hidden_dim),
        "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
    }
    return shapes | {"tok_embeddings.weight": (p.vocab_size, d), "output.weight": (p.vocab_size, d), "norm.weight": (d,)}


def _shard_shape(shape: tuple[int, ...], dim: int | None, shards: int) -> tuple[int, ...]:
    if dim is None:
        return shape
    out = list(shape)
    out[dim] //= shards
    return tuple(out)


class ShardSet:
    """The model-parallel shards of one checkpoint, checked against its params before anything is converted."""

    def __init__(self, shards: list[Mapping[str, torch.Tensor]], params: MetaParams, names: list[str],
                 allow_norm_mismatch: bool = False):
        if len(shards) != params.model_parallel_size:
            raise CheckpointError(f"{names[0]}: {len(shards)} checkpoint file(s) but model_parallel_size "
                                  f"{params.model_parallel_size} in params")
        self.shards, self.params, self.names = shards, params, names
        self.allow_norm_mismatch = allow_norm_mismatch
        self._check_layer_count()
        self._check_tensors()

    def _check_layer_count(self) -> None:
        """params.json's n_layers against the layers the first shard holds, before any per-layer work."""
        held = {int(k.split(".")[1]) for k in self.shards[0] if k.startswith("layers.") and k.split(".")[1].isdigit()}
        count = max(held) + 1 if held else 0
        if count != self.params.n_layers:
            raise CheckpointError(f"{self.names[0]}: holds {count} layers, but params.json says n_layers "
                                  f"{self.params.n_layers}")

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name a shard must hold, with its per-shard shape."""
        p, full = self.params, _full_shapes(self.params)
        out = {meta: _shard_shape(full[meta], dim, p.model_parallel_size) for meta, _, dim in _TOP_MAP}
        for i in range(p.n_layers):
            for meta, _, dim, _ in _LAYER_MAP:
                out[f"layers.{i}.{meta}"] = _shard_shape(full[meta], dim, p.model_parallel_size)
            for meta, _, _ in _QK_NORMS:
                out[f"layers.{i}.{meta}.weight"] = out[f"layers.{i}.{meta}.bias"] = (p.head_dim,)
        return out

    def _check_tensors(self) -> None:
        expected = self.expected()
        for shard, name in zip(self.shards, self.names):
            keys = set(shard) - {ROPE_FREQS}
            missing, extra = sorted(expected.keys() - keys), sorted(keys - expected.keys())
            if missing or extra:
                raise CheckpointError(f"{name}: does not match params.json (missing {missing[:4]}, unexpected {extra[:4]})")
            for key, shape in expected.items():
                value = shard[key]
                if not torch.is_tensor(value) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise CheckpointError(f"{name}: {key} is {got}, params.json implies shape {shape}")
                if not value.dtype.is_floating_point:
                    raise CheckpointError(f"{name}: {key} is {str(value.dtype).removeprefix('torch.')}; a model's "
                                          "weights are floating point")
                if value.dtype != self.shards[0][key].dtype:
                    raise CheckpointError(f"{name}: {key} is {value.dtype}, {self.names[0]} has {self.shards[0][key].dtype}")

    def check_replicated(self) -> None:
        """Norms every shard holds a copy of must be equal (averaged, with a warning, if allowed)."""
        names = ["norm.weight"] + [f"layers.{i}.{m}" for i in range(self.params.n_layers)
                                   for m, _, dim, _ in _LAYER_MAP if dim is None]
        for key in names:
            first = self.shards[0][key]
            for s, shard in enumerate(self.shards[1:], start=1):
                if torch.equal(first, shard[key]):
                    continue
                diff = (first.float() - shard[key].float()).abs().max().item()
                if not self.allow_norm_mismatch:
                    raise CheckpointError(f"{self.names[s]}: {key} differs from {self.names[0]} by up to {diff:.3g}; "
                                          "replicated norms must be equal (--allow-norm-mismatch averages them)")
                logger.warning("%s: %s differs between shards by up to %.3g; averaging", self.names[s], key, diff)

    def check_rope_freqs(self) -> None:
        """Warn when a stored ``rope.freqs`` disagrees with ``rope_theta`` (Meta's code ignores it; theta decides)."""
        stored = self.shards[0].get(ROPE_FREQS)
        if not torch.is_tensor(stored):
            return
        expected = rope_freqs(self.params, torch.float32)
        if stored.shape != expected.shape or not torch.allclose(stored.float(), expected, rtol=1e-2):
            logger.warning("%s: rope.freqs does not match rope_theta %s; the converted model uses rope_theta",
                           self.names[0], self.params.rope_theta)

    def _merged(self, meta: str, dim: int | None) -> torch.Tensor:
        parts = [s[meta] for s in self.shards]
        if len(parts) == 1:
            return parts[0]
        if dim is not None:
            return torch.cat(parts, dim=dim)
        if all(torch.equal(parts[0], x) for x in parts[1:]):
            return parts[0]
        return torch.stack([x.float() for x in parts]).mean(0).to(parts[0].dtype)  # only with allow_norm_mismatch

    def _qk_norm(self, meta: str, heads: int) -> torch.Tensor:
        """(heads, head_dim): each shard's LayerNorm row, in half order, repeated for that shard's heads."""
        rows = [pairs_to_halves(s[meta], 1) for s in self.shards]
        return torch.stack(rows).repeat_interleave(heads // len(self.shards), dim=0)

    def plan(self, dtype: torch.dtype | None = None) -> list[PlannedTensor]:
        """Every transformers tensor, converted on demand (``dtype``: cast to it; default: as stored)."""
        p, full = self.params, _full_shapes(self.params)
        heads = {"q": p.n_heads, "k": p.kv_heads}
        items = []

        def add(name: str, meta: str, shape: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> None:
            stored = self.shards[0][meta].dtype
            out = dtype or stored
            build = fn if out == stored else (lambda: fn().to(out))
            items.append(PlannedTensor(name, tuple(shape), out, build, tuple(s[meta] for s in self.shards)))

        for meta, hf, dim in _TOP_MAP[:1]:
            add(hf, meta, full[meta], lambda m=meta, d=dim: self._merged(m, d))
        for i in range(p.n_layers):
            for meta, hf, dim, rot in _LAYER_MAP:
                key = f"layers.{i}.{meta}"
                if rot:
                    fn = lambda k=key, d=dim, h=heads[rot]: pairs_to_halves(self._merged(k, d), h)
                else:
                    fn = lambda k=key, d=dim: self._merged(k, d)
                add(f"model.layers.{i}.{hf}", key, full[meta], fn)
            for meta, hf, kind in _QK_NORMS:
                for part in ("weight", "bias"):
                    key = f"layers.{i}.{meta}.{part}"
                    add(f"model.layers.{i}.{hf}.{part}", key, (heads[kind], p.head_dim),
                        lambda k=key, h=heads[kind]: self._qk_norm(k, h))
        for meta, hf, dim in _TOP_MAP[1:]:
            add(hf, meta, full[meta], lambda m=meta, d=dim: self._merged(m, d))
        return items


def rope_freqs(params: MetaParams, dtype: torch.dtype) -> torch.Tensor:
    """(head_dim/2,) rotary inverse frequencies, the buffer Meta's checkpoints carry as ``rope.freqs``."""
    d = params.head_dim
    return (1.0 / (params.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# transformers -> Meta


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous tensor with storage of its own (torch.save writes a view's whole storage)."""
    t = t if dtype is None else t.to(dtype)
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _rows_per_shard(norm: torch.Tensor, shards: int) -> list[torch.Tensor] | None:
    """(heads, head_dim) -> one row per shard, or None when the heads of a shard do not share their row."""
    groups = norm.reshape(shards, norm.shape[0] // shards, norm.shape[1])
    if not all(torch.equal(g, g[:1].expand_as(g)) for g in groups):
        return None
    return [g[0] for g in groups]


def _qk_norm_names(config) -> Iterator[str]:
    for i in range(config.num_hidden_layers):
        for _, hf, _ in _QK_NORMS:
            yield f"model.layers.{i}.{hf}.weight"
            yield f"model.layers.{i}.{hf}.bias"


def exact_shard_counts(get: Callable[[str], torch.Tensor], config) -> list[int]:
    """Shard counts Meta's layout can hold this model in exactly: every size divides, and the heads of
    each shard share their query/key norm rows (fine-tuning can make every head's rows differ)."""
    sizes = (config.num_attention_heads, config.hidden_size, config.vocab_size, config.intermediate_size)
    kv = config.num_key_value_heads
    counts = [s for s in range(1, kv + 1) if kv % s == 0 and all(n % s == 0 for n in sizes)]
    norms = [get(name) for name in _qk_norm_names(config)]
    return [s for s in counts if all(_rows_per_shard(n, s) is not None for n in norms)]


def hf_to_meta(get: Callable[[str], torch.Tensor], params: MetaParams,
               dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Meta's shards (``consolidated.pth`` dicts) from transformers' tensors, read one at a time by ``get``.

    ``dtype``: cast every tensor to it; default: keep each tensor's dtype. Raises when the heads of a
    shard do not share their query/key norm rows (see :func:`exact_shard_counts`).
    """
    s, p = params.model_parallel_size, params
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(s)]
    heads = {"q": p.n_heads, "k": p.kv_heads}

    def put(meta: str, value: torch.Tensor, dim: int | None) -> None:
        parts = [value] * s if dim is None else value.chunk(s, dim=dim)
        for shard, part in zip(shards, parts):
            shard[meta] = _owned(part, dtype)

    for meta, hf, dim in _TOP_MAP[:1]:
        put(meta, get(hf), dim)
    for i in range(p.n_layers):
        for meta, hf, dim, rot in _LAYER_MAP:
            value = get(f"model.layers.{i}.{hf}")
            put(f"layers.{i}.{meta}", halves_to_pairs(value, heads[rot]) if rot else value, dim)
        for meta, hf, _ in _QK_NORMS:
            for part in ("weight", "bias"):
                name = f"model.layers.{i}.{hf}.{part}"
                rows = _rows_per_shard(get(name), s)
                if rows is None:
                    raise CheckpointError(f"{name}: the heads of one model-parallel shard have different rows, but Meta's "
                                          f"layout holds one row per shard; export with more shards")
                for shard, row in zip(shards, rows):
                    shard[f"layers.{i}.{meta}.{part}"] = _owned(halves_to_pairs(row, 1), dtype)
    for meta, hf, dim in _TOP_MAP[1:]:
        put(meta, get(hf), dim)
    freqs = rope_freqs(p, shards[0]["tok_embeddings.weight"].dtype)
    for shard in shards:
        shard[ROPE_FREQS] = freqs
    return shards


def hf_transformer_names(config) -> Iterator[str]:
    """The names of the transformer tensors (everything but ``model.vqmodel.*``) a Chameleon model holds."""
    yield from (hf for _, hf, _ in _TOP_MAP)
    for i in range(config.num_hidden_layers):
        for _, hf, _, _ in _LAYER_MAP:
            yield f"model.layers.{i}.{hf}"
    yield from _qk_norm_names(config)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a release folder


TOKENIZER_DIR = "tokenizer"
TEXT_TOKENIZER = "text_tokenizer.json"
MEDMAX_TOKENIZER = "text_tokenizer_modified.json"


def find_model_dir(root: str | Path, model_size: str | None = None) -> Path:
    """``root`` itself when it holds params.json, else ``root/models/<size>`` (the only one, or ``model_size``)."""
    root = Path(root)
    if (root / PARAMS_FILE).is_file():
        return root
    sizes = sorted(p.parent.name for p in root.glob(f"models/*/{PARAMS_FILE}"))
    if model_size is not None:
        if model_size not in sizes:
            raise FileNotFoundError(f"{root}/models/{model_size}/{PARAMS_FILE}: missing (found sizes: {sizes or 'none'})")
        return root / "models" / model_size
    if not sizes:
        raise FileNotFoundError(f"{root}: no {PARAMS_FILE} here or in models/<size>/")
    if len(sizes) > 1:
        raise CheckpointError(f"{root}: several model sizes {sizes}; name one with --model-size")
    return root / "models" / sizes[0]


def release_root(model_dir: Path) -> Path:
    """The release folder that holds ``tokenizer/`` (``CKPT`` for ``CKPT/models/7b``)."""
    for candidate in (model_dir, model_dir.parent.parent):
        if (candidate / TOKENIZER_DIR).is_dir():
            return candidate
    raise FileNotFoundError(f"{model_dir}: no {TOKENIZER_DIR}/ beside it or two levels up")


def shard_files(model_dir: Path) -> list[Path]:
    """``consolidated.pth``, or ``consolidated.00.pth`` .. ``consolidated.NN.pth`` numbered without gaps."""
    single = model_dir / "consolidated.pth"
    numbered = sorted(model_dir.glob("consolidated.[0-9][0-9].pth"))
    if single.is_file() and numbered:
        raise CheckpointError(f"{model_dir}: holds both consolidated.pth and consolidated.NN.pth; keep one layout")
    if single.is_file():
        return [single]
    if not numbered:
        raise FileNotFoundError(f"{model_dir}: no consolidated.pth or consolidated.00.pth")
    want = [model_dir / f"consolidated.{i:02d}.pth" for i in range(len(numbered))]
    if numbered != want:
        raise CheckpointError(f"{model_dir}: shard files {[p.name for p in numbered]} are not numbered 00..{len(numbered) - 1:02d}")
    return numbered


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One ``consolidated*.pth``, memory-mapped (its tensors are read from disk only when used).

    The file must hold plain tensors: it is opened with ``weights_only=True`` and never fully unpickled. Its
    zip CRCs are checked first (``torch.load`` does not; the conversion reads every byte anyway).
    """
    check_zip_crc(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as exc:
        if "zip" not in str(exc).lower() and "mmap" not in str(exc).lower():
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from exc
        logger.warning("%s: legacy (non-zip) format cannot be memory-mapped; reading it whole", path)
        state = _load_plain(path)
    except Exception as exc:  # the safe unpickler refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _load_plain(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({type(exc).__name__}: {exc})") from exc


def original_tokenizer(root: Path) -> Path:
    """``tokenizer/text_tokenizer_modified.json`` (MedMax, with ``<image>``) when present, else ``text_tokenizer.json``."""
    for name in (MEDMAX_TOKENIZER, TEXT_TOKENIZER):
        if (root / TOKENIZER_DIR / name).is_file():
            return root / TOKENIZER_DIR / name
    raise FileNotFoundError(f"{root}/{TOKENIZER_DIR}: no {MEDMAX_TOKENIZER} or {TEXT_TOKENIZER}")


@dataclass
class OriginalCheckpoint:
    """A release folder opened for conversion: params, memory-mapped shards, where tokenizer and VQGAN are."""

    root: Path
    model_dir: Path
    params: MetaParams
    shards: ShardSet

    @classmethod
    def open(cls, path: str | Path, model_size: str | None = None, allow_norm_mismatch: bool = False):
        model_dir = find_model_dir(path, model_size)
        params = MetaParams.from_dir(model_dir)
        files = shard_files(model_dir)
        if not _given(params.files, "model_parallel_size"):
            params = _with_parallel_size(params, len(files))
        shards = ShardSet([load_shard(f) for f in files], params, [str(f) for f in files], allow_norm_mismatch)
        shards.check_replicated()
        shards.check_rope_freqs()
        return cls(root=release_root(model_dir), model_dir=model_dir, params=params, shards=shards)

    @property
    def tokenizer_path(self) -> Path:
        return original_tokenizer(self.root)

    @property
    def vqgan_dir(self) -> Path:
        return self.root / TOKENIZER_DIR


def _given(files: dict, key: str) -> bool:
    params = files.get(PARAMS_FILE, {})
    nested = params.get("model") if isinstance(params.get("model"), dict) else {}
    return any(key in d for d in (params, nested, files.get(CONSOLIDATE_FILE, {})))


def _with_parallel_size(params: MetaParams, shards: int) -> MetaParams:
    """params.json without model_parallel_size: Meta's loader counts the files; so do we."""
    files = json.loads(json.dumps(params.files))
    files.setdefault(CONSOLIDATE_FILE, {})["model_parallel_size"] = shards
    return MetaParams.from_files(files)


# ---------------------------------------------------------------------------------------------------------------------
# Writing a release folder


def text_tokenizer_variants(tokenizer) -> dict[str, str]:
    """The tokenizer file(s) of the original layout, as JSON strings.

    With ``<image>`` where Chameleon has ``<reserved08707>`` (MedMax's tokenizer): ``text_tokenizer.json``
    with the reserved name restored, and ``text_tokenizer_modified.json`` as it is. Otherwise only
    ``text_tokenizer.json``.
    """
    text = tokenizer.to_str(pretty=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if IMAGE_PLACEHOLDER not in vocab or IMAGE_PLACEHOLDER_ORIGINAL in vocab:
        return {TEXT_TOKENIZER: text}
    doc = json.loads(text)
    model_vocab = doc["model"]["vocab"]
    if IMAGE_PLACEHOLDER in model_vocab:
        model_vocab[IMAGE_PLACEHOLDER_ORIGINAL] = model_vocab.pop(IMAGE_PLACEHOLDER)
    for token in doc.get("added_tokens", []):
        if token.get("content") == IMAGE_PLACEHOLDER:
            token["content"] = IMAGE_PLACEHOLDER_ORIGINAL
    return {TEXT_TOKENIZER: json.dumps(doc, ensure_ascii=False, indent=2), MEDMAX_TOKENIZER: text}


_SIZE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_size_name(model_size: str) -> str:
    """``model_size`` as the one folder name ``models/<size>/`` (``7b``, ``30b``, ...): no path, nothing hidden."""
    if not _SIZE_NAME.fullmatch(model_size) or ".." in model_size:
        raise CheckpointError(f"--model-size {model_size!r}: must be one folder name such as 7b or 30b (letters, digits, "
                              "'.', '_', '-'; no path separators, no '..'), as models/<size>/ is written inside --output")
    return model_size


def write_original(out: str | Path, shards: list[dict[str, torch.Tensor]], params: MetaParams, tokenizer, vqgan,
                   model_size: str = "7b") -> Path:
    """Write Meta's layout (module docstring) into ``out``: shards, params files, tokenizer file(s), VQGAN."""
    import yaml

    check_size_name(model_size)
    out = Path(out)
    model_dir = out / "models" / model_size
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in params.to_files().items():
        (model_dir / name).write_text(json.dumps(doc, indent=2) + "\n")
    names = ["consolidated.pth"] if len(shards) == 1 else [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _save(shard, model_dir / name)
        logger.info("wrote %s (%d tensors)", model_dir / name, len(shard))
    tok_dir = out / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name, text in text_tokenizer_variants(tokenizer).items():
        (tok_dir / name).write_text(text)
    doc = {"model": {"target": "taming.models.vqgan.VQModel", "params": vqgan.params}}
    (tok_dir / "vqgan.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    state = {k: v.detach().cpu().contiguous() for k, v in vqgan.state_dict().items()}
    _save({"state_dict": state}, tok_dir / "vqgan.ckpt")
    return out


def _save(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk raises its OSError naming ``path`` (torch's own
    writer reports it as ``RuntimeError: unexpected pos``, and so does its end of archive after a failed write)."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            cause = err.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, str(path)) from None
            raise
