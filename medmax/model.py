"""The model class, and the model folder every later step loads.

transformers' ``ChameleonForConditionalGeneration.forward`` sets every image-code logit to the dtype's
minimum on every call, so a model trained through it sees an infinite loss on image codes and can
never draw one (Anole issue #30). :class:`MedMaxChameleon` computes the same logits without that
mask and saves as a standard Chameleon checkpoint.

The named model sizes (:data:`MODEL_PRESETS`, from the tests' tiny model to Chameleon 7B) and
:func:`chameleon_config`, which turns a size into a config for a tokenizer and VQGAN, live here beside
the model class.

A model folder (what ``finetune.export`` writes and generation / evaluation load)::

    DIR/config.json, DIR/model.safetensors   Hugging Face Chameleon (from_pretrained, no custom code)
    DIR/tokenizer.json                        the text + image tokenizer
    DIR/vqgan/vqgan.yaml, vqgan.safetensors   the complete VQGAN, decoder included
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .data.inputs import file_digest
from .errors import UserError
from .memory import MemoryBudgetError, available_bytes, check_fits
from .vocab import IGNORE_INDEX, Vocabulary, load_tokenizer
from .vqgan import VQGAN, hf_vq_config, load_vqgan, save_vqgan

logger = logging.getLogger(__name__)

STANDARD_ARCHITECTURE = "ChameleonForConditionalGeneration"
SKIP_MEMORY_CHECK = "--skip-memory-check"  # how the programs name the override of the check below


ModelTooLargeError = MemoryBudgetError  # a config whose parameters cannot fit; the message names the file and sizes


# ------------------------------------------------------------------------------ memory check before allocating
def _vq_encoder_parameters(vq) -> int:
    """Parameters of the VQGAN encoder, quantizer and 1x1 convs a Chameleon checkpoint carries (weights only)."""
    ch, mult = vq.base_channels, list(vq.channel_multiplier)
    n, block_in = 9 * vq.in_channels * ch, ch
    for level, m in enumerate(mult):
        block_out = ch * m
        for _ in range(vq.num_res_blocks):  # two 3x3 convs, and a 1x1 shortcut when the width changes
            n += 9 * block_in * block_out + 9 * block_out * block_out + (block_in * block_out if block_in != block_out else 0)
            block_in = block_out
        n += 9 * block_in * block_in if level < len(mult) - 1 else 0  # downsampling conv
    n += 2 * 18 * block_in * block_in + 4 * block_in * block_in  # middle: two residual blocks and attention
    n += 9 * block_in * vq.latent_channels * (2 if vq.double_latent else 1)
    return n + vq.num_embeddings * vq.embed_dim + 2 * vq.latent_channels * vq.embed_dim


def estimate_parameter_bytes(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the parameters of a ``ChameleonConfig`` take in ``dtype``, from the sizes alone (nothing allocated).

    Counts the weight matrices (biases and norms are a rounding error); within a few percent of the
    real count for every preset (tests/medmax/test_model.py).
    """
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = h // heads * (config.num_key_value_heads or heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    heads_out = 1 if config.tie_word_embeddings else 2
    n = config.num_hidden_layers * layer + heads_out * config.vocab_size * h + _vq_encoder_parameters(config.vq_config)
    return n * torch.tensor([], dtype=dtype).element_size()


def _available_bytes(device=None) -> int | None:
    """Free memory of a CUDA device, else what the host allows (``medmax.memory``); None when unknown."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return available_bytes()


def check_config_fits(config, where: str, dtype: torch.dtype | None = None, device=None, allow: bool = False,
                      override: str = SKIP_MEMORY_CHECK) -> None:
    """Refuse a ``ChameleonConfig`` (read from ``where``) whose parameters cannot fit, before anything is allocated.

    ``override`` names the flag or setting that skips the check, for the message.
    """
    dtype = dtype or torch.float32
    check_fits(estimate_parameter_bytes(config, dtype), f"{where}: the model's {config.num_hidden_layers} layers of "
               f"width {config.hidden_size} in {str(dtype).removeprefix('torch.')}", allow=allow,
               override=override, available=_available_bytes(device))


def check_model_fits(folder: str | Path, dtype: torch.dtype | None = None, device=None, allow: bool = False):
    """Read ``folder/config.json`` and refuse before loading when its parameters cannot fit; -> the config."""
    config = ChameleonConfig.from_pretrained(folder)
    check_config_fits(config, str(Path(folder) / "config.json"), dtype, device, allow)
    return config


# ------------------------------------------------------------------------------ model sizes
# Chameleon-architecture sizes. `vocab_size` and `vq_config` come from the tokenizer and VQGAN.
MODEL_PRESETS: dict[str, dict] = {
    # tests: hidden 32, 2 layers
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    # quickstart: learns the synthetic task on two CPU cores in minutes
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    # benchmarks: large enough that the matmuls dominate
    "base": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    # Chameleon / Anole / MedMax 7B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


def chameleon_config(preset: str, tokenizer: Tokenizer, vqgan_params: dict, **overrides):
    """A transformers ``ChameleonConfig`` of a named size for this tokenizer and VQGAN."""
    if preset not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
    vocab = Vocabulary.from_tokenizer(tokenizer)
    fields = dict(MODEL_PRESETS[preset])
    fields.update(
        vocab_size=vocab.size,
        bos_token_id=vocab.bos_id,
        pad_token_id=vocab.pad_id,
        eos_token_id=vocab.eos_id,
        max_position_embeddings=4096,
        vq_config=hf_vq_config(vqgan_params).to_dict(),
        vocabulary_map=tokenizer.get_vocab(with_added_tokens=True),
    )
    fields.update(overrides)
    return ChameleonConfig(**fields)


@dataclass
class LabelLogps(ModelOutput):
    """Per-token log-probabilities of the labels, (B, T-1), 0 where unlabelled; ``mask`` marks the labelled ones."""

    logps: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class MedMaxChameleon(ChameleonForConditionalGeneration):
    """Chameleon with unmasked logits: image codes can be trained on and sampled.

    In training mode with labels, the output head runs only on the positions that carry loss and
    ``logits`` is None: answers are a small share of VQA tokens, and with a small model the head
    over the whole vocabulary costs more than the transformer layers.
    """

    head_on_labelled_positions_only = True

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,  # transformers' name since 5.x; `past_key_values` is deprecated there
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        token_logps: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``token_logps=True`` with ``labels``: per-token log-probs of the labels instead (:class:`LabelLogps`)."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, T, C)
        if token_logps:
            from .dpo import labelled_token_logps

            return LabelLogps(*labelled_token_logps(self, hidden, labels))
        if labels is not None and self.training and self.head_on_labelled_positions_only:
            loss = self._labelled_loss(hidden, labels, kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (B, T', V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def _labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Next-token cross-entropy over labelled positions; the same value as transformers' ForCausalLMLoss."""
        targets = labels[:, 1:].to(hidden.device)  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep]).float()  # (N, V), N = labelled positions
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        if isinstance(denom, torch.Tensor):
            denom = denom.to(loss.device)
        return loss / denom

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain Chameleon checkpoint: config.json names the standard architecture."""
        super().save_pretrained(save_directory, *args, **kwargs)
        config_path = Path(save_directory) / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [STANDARD_ARCHITECTURE]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def new_model(preset: str, tokenizer: Tokenizer, vqgan: VQGAN, seed: int = 0, **overrides) -> MedMaxChameleon:
    """A randomly initialised model of a named size whose vqmodel holds this VQGAN's encoder."""
    config = chameleon_config(preset, tokenizer, vqgan.params, **overrides)
    torch.manual_seed(seed)
    model = MedMaxChameleon(config)
    encoder_state = {k: v for k, v in vqgan.state_dict().items() if not k.startswith("decoder.")}
    model.model.vqmodel.load_state_dict(encoder_state)
    return model


@dataclass
class ModelBundle:
    """Everything generation and evaluation need from one model folder."""

    model: MedMaxChameleon
    tokenizer: Tokenizer
    vocab: Vocabulary
    vqgan: VQGAN | None
    path: Path | None = None


def import_deepspeed_quietly() -> None:
    """Import an installed DeepSpeed telling it the accelerator, where its probe would only warn.

    ``save_pretrained`` unwraps the model through accelerate, which imports DeepSpeed whenever it is installed,
    only to test ``isinstance(model, DeepSpeedEngine)``. On import DeepSpeed probes for an accelerator and, with
    none, warns "Setting accelerator to CPU" on every export and conversion. Where torch sees no accelerator
    (CUDA, MPS, XPU, ...) that probe settles on the CPU; ``DS_ACCELERATOR=cpu`` (DeepSpeed's own override) says
    so, for that import only.
    """
    import importlib.util
    import os
    import sys

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if ("deepspeed" in sys.modules or "DS_ACCELERATOR" in os.environ or has_accelerator
            or importlib.util.find_spec("deepspeed") is None):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed  # noqa: F401
    finally:
        del os.environ["DS_ACCELERATOR"]


def save_model_dir(folder: str | Path, model, tokenizer: Tokenizer, vqgan: VQGAN | None) -> Path:
    """Write a model folder (layout in the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import_deepspeed_quietly()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if vqgan is not None:
        save_vqgan(vqgan, folder / "vqgan")
    return folder


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json")


def model_digest(folder: str | Path) -> str:
    """SHA-256 of what a model folder's weights are: its ``config.json`` and weight files (safetensors, ``.bin``
    and their indexes), by name and content, never the folder's path (a copied model is the same model).

    The tokenizer and ``vqgan/`` are left out: a training run names and fingerprints those separately.
    Each file is read once, streamed (budget one read of the weights).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_FILE_SUFFIXES)))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def load_model_dir(folder: str | Path, dtype: torch.dtype | None = None, device=None, trust_checkpoint: bool = False,
                   skip_memory_check: bool = False) -> ModelBundle:
    """Load a model folder once: model (eval mode), tokenizer, vocabulary and VQGAN (None if absent).

    A config whose parameters cannot fit in the available memory is refused before anything is
    allocated (:class:`ModelTooLargeError`), unless ``skip_memory_check``.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
    check_model_fits(folder, dtype, device, allow=skip_memory_check)
    model = MedMaxChameleon.from_pretrained(folder, dtype=dtype or torch.float32)
    model.to(device).eval()
    tokenizer = load_tokenizer(folder)
    vqgan = None
    if (folder / "vqgan").is_dir():
        vqgan = load_vqgan(folder / "vqgan", trust_checkpoint=trust_checkpoint, device=device)
    else:
        logger.warning("%s: no vqgan/ folder; images can be read but not drawn", folder)
    return ModelBundle(model=model, tokenizer=tokenizer, vocab=Vocabulary.from_tokenizer(tokenizer), vqgan=vqgan, path=folder)
