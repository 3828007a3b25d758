"""The tiny tokenizer / VQGAN / model used by tests, benchmarks and the quickstart, and ``preset:NAME`` specs.

Model sizes live beside the model class (:data:`medmax.model.MODEL_PRESETS`). A
setting that names a tokenizer, VQGAN or model may say ``preset:NAME`` instead of a path;
:func:`parse_preset` is the one reader of that form.

The tiny tokenizer keeps the exact Chameleon id layout (README, "Vocabulary"; ``medmax.vocab``): ``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, the 8192 ``IMGIMG`` codes at 4..8195, ``<eoss>`` 8196, ``<racm3:break>`` 8197,
``<reserved08706>`` 8710 and ``<image>`` 8711, followed by a small byte-level BPE for text
(:func:`medmax.tokenizer_training.fit_chameleon_bpe`, which fits the same layout to any corpus).
Sequences built with it therefore match the real layout id for id.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer

from .errors import UserError
from .tokenizer_training import FIRST_TEXT_ID, N_IMAGE_CODES, chameleon_layout_tokens, fit_chameleon_bpe  # noqa: F401  (re-exported)
from .vocab import load_tokenizer

logger = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"

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


def build_tiny_tokenizer(text_vocab_size: int = 1000) -> Tokenizer:
    """A small byte-level BPE tokenizer with the exact Chameleon special/image id layout, fitted to :data:`_CORPUS`."""
    return fit_chameleon_bpe(_CORPUS * 4, text_vocab_size)


def make_model_dir(folder, model_preset: str = "tiny", vqgan_preset: str = "tiny", seed: int = 0, vqgan=None, **overrides):
    """Write a randomly initialised model folder (tokenizer, model, VQGAN) of named sizes.

    Tests, benchmarks and the quickstart start from this; pass ``vqgan`` to reuse a trained one.
    """
    import torch  # here, not at the top: programs read VQGAN_PRESETS and parse_preset for --help

    from .model import new_model, save_model_dir  # this module imports the model, never the reverse
    from .vqgan import VQGAN

    tokenizer = build_tiny_tokenizer()
    if vqgan is None:
        torch.manual_seed(seed)
        vqgan = VQGAN.from_params(VQGAN_PRESETS[vqgan_preset])
    model = new_model(model_preset, tokenizer, vqgan, seed=seed, **overrides)
    return save_model_dir(folder, model, tokenizer, vqgan)


# What ``preset:NAME`` can name, per kind of setting.
TOKENIZER_PRESETS = {"tiny": build_tiny_tokenizer}


def parse_preset(spec, choices, setting: str) -> str | None:
    """The NAME of a ``preset:NAME`` spec, or None when ``spec`` is not one (a path, or empty).

    Raises ValueError naming ``setting`` when NAME is not among ``choices``.
    """
    if not isinstance(spec, str) or not spec.startswith(PRESET_PREFIX):
        return None
    name = spec[len(PRESET_PREFIX):]
    if name not in choices:
        raise UserError(f"{setting}={spec!r}: unknown preset; choose from {sorted(choices)}")
    return name


def resolve_tokenizer(spec: str, setting: str = "tokenizer") -> Tokenizer:
    """``preset:tiny`` builds the tiny Chameleon-layout tokenizer; anything else is a tokenizer.json (or its folder)."""
    name = parse_preset(spec, TOKENIZER_PRESETS, setting)
    return TOKENIZER_PRESETS[name]() if name else load_tokenizer(spec)
