"""Named model sizes, and the tiny tokenizer / VQGAN / model used by tests, benchmarks and the quickstart.

The tiny tokenizer keeps the exact Chameleon id layout (DESIGN.md): ``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, the 8192 ``IMGIMG`` codes at 4..8195, ``<eoss>`` 8196, ``<racm3:break>`` 8197,
``<reserved08706>`` 8710 and ``<image>`` 8711, followed by a small byte-level BPE for text.
Sequences built with it therefore match the real layout id for id.
"""

from __future__ import annotations

import json
import logging

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .vocab import BOI, BOS, END_OF_TURN, EOI, EOS, IMAGE_PLACEHOLDER, PAD, image_token_name

logger = logging.getLogger(__name__)

N_IMAGE_CODES = 8192
FIRST_TEXT_ID = 8712  # after <image> at 8711

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

# taming-transformers VQModel `model.params` blocks (the content of a vqgan.yaml).
VQGAN_PRESETS: dict[str, dict] = {
    # 64 px -> 8x8 codes; 32 base channels because GroupNorm needs 32
    "tiny": dict(
        embed_dim=32,
        n_embed=512,
        ddconfig=dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                      ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
    ),
    # Chameleon's real configuration: 512 px -> 32x32 codes, 8192-entry codebook
    "chameleon": dict(
        embed_dim=256,
        n_embed=8192,
        ddconfig=dict(double_z=False, z_channels=256, resolution=512, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
    ),
}

# Text the tiny BPE is trained on: the words the synthetic tasks and tests use, plus the alphabet.
_CORPUS = [
    "Is there a lesion in the image? Yes. No. Is the scan normal? The image shows a bright round lesion.",
    "Where is the lesion located? upper left, upper right, lower left, lower right, centre, center.",
    "Which organ is shown? A) lung B) liver C) brain D) kidney. Answer: B. The answer is C.",
    "What modality is this? CT MRI X-ray ultrasound pathology microscopy histology slide.",
    "Describe the image. Generate an image of a chest radiograph with a small nodule in the right lung.",
    "Question: How many lesions are visible? Answer: one two three none. small large medium size.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?()[]{}'\"-+*/=<>_",
]


def chameleon_layout_tokens() -> list[str]:
    """Token strings for ids 0..8711, in the Chameleon / MedMax order."""
    tokens = [BOS, PAD, EOS, "<unk>"]
    tokens += [image_token_name(c) for c in range(N_IMAGE_CODES)]  # ids 4..8195
    tokens += [EOI, BOI]  # 8196, 8197
    tokens += [f"<reserved{i - 4:05d}>" for i in range(8198, 8710)]
    tokens += [END_OF_TURN, IMAGE_PLACEHOLDER]  # 8710, 8711
    assert len(tokens) == FIRST_TEXT_ID
    return tokens


def build_tiny_tokenizer(text_vocab_size: int = 1000) -> Tokenizer:
    """A small byte-level BPE tokenizer with the exact Chameleon special/image id layout."""
    text = Tokenizer(models.BPE())
    text.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text.train_from_iterator(_CORPUS * 4, trainer=trainer)
    trained = json.loads(text.to_str())["model"]
    layout = chameleon_layout_tokens()
    vocab = {tok: i for i, tok in enumerate(layout)}
    for tok, idx in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS, PAD, EOS, EOI, BOI, END_OF_TURN, IMAGE_PLACEHOLDER)]
    )
    return tok


def chameleon_config(preset: str, tokenizer: Tokenizer, vqgan_params: dict, **overrides):
    """A transformers ``ChameleonConfig`` of a named size for this tokenizer and VQGAN."""
    from transformers import ChameleonConfig

    from .vocab import Vocabulary
    from .vqgan import hf_vq_config

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")
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


def make_model_dir(folder, model_preset: str = "tiny", vqgan_preset: str = "tiny", seed: int = 0, vqgan=None, **overrides):
    """Write a randomly initialised model folder (tokenizer, model, VQGAN) of named sizes.

    Tests, benchmarks and the quickstart start from this; pass ``vqgan`` to reuse a trained one.
    """
    import torch

    from .model import new_model, save_model_dir
    from .vqgan import VQGAN

    tokenizer = build_tiny_tokenizer()
    if vqgan is None:
        torch.manual_seed(seed)
        vqgan = VQGAN.from_params(VQGAN_PRESETS[vqgan_preset])
    model = new_model(model_preset, tokenizer, vqgan, seed=seed, **overrides)
    return save_model_dir(folder, model, tokenizer, vqgan)
