"""Bring an original Chameleon / Anole / MedMax checkpoint into a complete model folder.

Usage::

    # 1. the transformer: transformers' own converter (in a transformers source checkout, not in the wheel)
    python src/transformers/models/chameleon/convert_chameleon_weights_to_hf.py \\
        --input_dir CKPT --model_size 7B --output_dir CKPT-hf
    # 2. add what that converter drops (the VQGAN decoder) and the original tokenizer, checking they belong together
    python -m finetune.convert --original CKPT --hf-model CKPT-hf --output models/anole-7b --trust-checkpoint

``CKPT`` is the original layout: ``tokenizer/vqgan.yaml`` + ``tokenizer/vqgan.ckpt`` (taming
VQModel), ``tokenizer/text_tokenizer.json`` (MedMax: ``text_tokenizer_modified.json``, with
``<image>``) and ``models/7b/consolidated.pth``. transformers' converter keeps only the VQGAN
encoder (``model.vqmodel.*``); this step writes ``vqgan/`` with encoder and decoder beside it and
refuses a pair whose encoders differ (a model converted from another checkpoint). The output is the
model folder every later step loads (``finetune.train model=...``, generation, evaluation).
``vqgan.ckpt`` files are PyTorch Lightning pickles: reading them needs ``--trust-checkpoint``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.vocab import Vocabulary, load_tokenizer

if TYPE_CHECKING:  # names for annotations only: the programs import them when they run
    from medmax.model import MedMaxChameleon

logger = logging.getLogger("finetune.convert")

_ORIGINAL_TOKENIZERS = ("tokenizer/text_tokenizer_modified.json", "tokenizer/text_tokenizer.json")


def original_tokenizer(original: Path) -> Path:
    for name in _ORIGINAL_TOKENIZERS:
        if (original / name).is_file():
            return original / name
    raise FileNotFoundError(f"{original}: no {' or '.join(_ORIGINAL_TOKENIZERS)}")


def check_same_encoder(model: MedMaxChameleon, vqgan, hf_model: Path, original: Path) -> None:
    """The HF model's vqmodel must be the original VQGAN's encoder half, tensor for tensor."""
    import torch

    ours = model.model.vqmodel.state_dict()
    theirs = {k: v for k, v in vqgan.state_dict().items() if not k.startswith("decoder.")}
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k].float(), theirs[k].float())]
    if differ or ours.keys() != theirs.keys():
        raise ValueError(f"{hf_model}: its model.vqmodel differs from the VQGAN in {original}/tokenizer "
                         f"({len(differ)} tensors, e.g. {differ[:3]}); were they converted from the same checkpoint?")


def convert(original: str | Path, hf_model: str | Path, output: str | Path, tokenizer: str | Path | None = None,
            dtype: str = "bfloat16", trust_checkpoint: bool = False) -> Path:
    import torch  # torch and transformers load here, not for --help

    from medmax.model import MedMaxChameleon, save_model_dir
    from medmax.vqgan import load_vqgan

    original, hf_model = Path(original), Path(hf_model)
    vqgan = load_vqgan(original / "tokenizer", trust_checkpoint=trust_checkpoint)
    model = MedMaxChameleon.from_pretrained(hf_model, dtype=getattr(torch, dtype))
    check_same_encoder(model, vqgan, hf_model, original)
    tok = load_tokenizer(tokenizer or original_tokenizer(original))
    vocab = Vocabulary.from_tokenizer(tok)
    if vocab.size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {vocab.size} ids, the model in {hf_model} only {model.config.vocab_size}")
    folder = save_model_dir(output, model, tok, vqgan)
    logger.info("wrote %s: model from %s, tokenizer and complete VQGAN from %s", folder, hf_model, original)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="original checkpoint folder (holds tokenizer/)")
    parser.add_argument("--hf-model", required=True, help="output of transformers' convert_chameleon_weights_to_hf")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--tokenizer", help="tokenizer JSON to use instead of the original's")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow the pickled vqgan.ckpt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert(args.original, args.hf_model, args.output, args.tokenizer, args.dtype, args.trust_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
