"""Turn a training checkpoint (full, image-alignment or LoRA) into a complete model folder.

Usage::

    python -m finetune.export --checkpoint runs/tiny_cpu --output runs/tiny_cpu_model
    python -m finetune.export --checkpoint runs/lora_7b/checkpoint-2000 --output models/medmax-lora-merged --dtype bfloat16

LoRA adapters are merged into their base weights; peft reads rank and alpha from the checkpoint's
own ``adapter_config.json``. The output is a model folder (``medmax.model``): ``config.json`` and
safetensors that ``ChameleonForConditionalGeneration.from_pretrained`` loads with no custom code,
``tokenizer.json``, and ``vqgan/`` with the complete VQGAN (encoder and decoder). Where the base
model and the VQGAN are comes from the checkpoint's ``medmax_run.json`` (written by training).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.vocab import load_tokenizer

if TYPE_CHECKING:  # names for annotations only: the programs import them when they run
    import torch

    from medmax.model import MedMaxChameleon

logger = logging.getLogger("finetune.export")

RUN_FILE = "medmax_run.json"
ROW_KEYS = ".trainable_rows"  # image-alignment's extra parameters; their values are already in the weights


def read_run_info(checkpoint: Path) -> dict:
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {checkpoint} a folder written by finetune.train?")
    info = json.loads(path.read_text())
    for key in ("base_model", "vqgan"):
        if info.get(key):
            info[key] = str((checkpoint / info[key]).resolve())
    return info


def load_trained_model(checkpoint: Path, info: dict, dtype: torch.dtype) -> MedMaxChameleon:
    """The checkpoint's weights as a plain model: LoRA merged, image-alignment rows already in place."""
    from medmax.model import MedMaxChameleon  # torch and transformers load here, not for --help

    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        if not info.get("base_model"):
            raise ValueError(f"{checkpoint}/{RUN_FILE}: a LoRA checkpoint without base_model")
        base = MedMaxChameleon.from_pretrained(info["base_model"], dtype=dtype)
        merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
        logger.info("merged LoRA adapters from %s into %s", checkpoint, info["base_model"])
        return merged
    model, loading = MedMaxChameleon.from_pretrained(checkpoint, dtype=dtype, output_loading_info=True)
    unexpected = [k for k in loading["unexpected_keys"] if not k.endswith(ROW_KEYS)]
    if loading["missing_keys"] or unexpected:
        raise ValueError(f"{checkpoint}: missing {loading['missing_keys'][:5]}, unexpected {unexpected[:5]}")
    return model


def export(checkpoint: str | Path, output: str | Path, dtype: str = "float32", trust_checkpoint: bool = False) -> Path:
    """Write the model folder of ``checkpoint`` to ``output``; returns ``output``."""
    import torch

    from medmax.model import save_model_dir
    from medmax.vqgan import load_vqgan

    checkpoint = Path(checkpoint)
    info = read_run_info(checkpoint)
    model = load_trained_model(checkpoint, info, getattr(torch, dtype))
    tokenizer = load_tokenizer(checkpoint / info.get("tokenizer", "tokenizer.json"))
    vqgan = load_vqgan(info["vqgan"], trust_checkpoint=trust_checkpoint)
    if vqgan.decoder is None:
        raise ValueError(f"{info['vqgan']}: the VQGAN has no decoder; the model folder would not draw images")
    folder = save_model_dir(output, model, tokenizer, vqgan)
    logger.info("wrote model folder %s (mode %s)", folder, info.get("mode"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N folder or a finished output_dir")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export(args.checkpoint, args.output, args.dtype, args.trust_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
