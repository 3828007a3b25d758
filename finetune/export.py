"""Turn a training checkpoint (full, image-alignment or LoRA) into a model folder, or any model into Meta's layout.

Usage::

    python -m finetune.export --checkpoint runs/tiny_cpu --output runs/tiny_cpu_model
    python -m finetune.export --checkpoint runs/lora_7b/checkpoint-2000 --output models/medmax-lora-merged --dtype bfloat16
    # Meta's original layout, from a training checkpoint (LoRA merged) or a model folder
    python -m finetune.export --checkpoint runs/lora_7b --output release/medmax-7b-ft --format chameleon

LoRA adapters are merged into their base weights; peft reads rank and alpha from the checkpoint's
own ``adapter_config.json``. Where the base model and the VQGAN are comes from the checkpoint's
``medmax_run.json`` (written by training).

``--format model`` (default) writes a model folder (``medmax.model``): ``config.json`` and safetensors
that ``ChameleonForConditionalGeneration.from_pretrained`` loads with no custom code, ``tokenizer.json``,
and ``vqgan/`` with the complete VQGAN (encoder and decoder).

``--format chameleon`` writes the layout of the Chameleon / Anole / MedMax releases (:mod:`medmax.meta_layout`):
``models/<size>/consolidated.pth`` (or ``consolidated.00.pth`` .. with ``--shards N``), ``params.json``
and ``consolidate_params.json``; ``tokenizer/text_tokenizer.json`` and, when the tokenizer has MedMax's
``<image>``, ``text_tokenizer_modified.json``; ``tokenizer/vqgan.yaml`` and ``vqgan.ckpt`` (taming key
names, ``{"state_dict": ...}``, plain tensors that load with ``weights_only=True``). Who reads it:
Meta's ``chameleon`` inference code and viewer (``ChameleonInferenceModel(models/7b, text_tokenizer.json,
vqgan.yaml, vqgan.ckpt)``; its loader needs ``consolidate_params.json`` and expects ``rope.freqs``),
Anole's scripts and MedMax's ``evaluation.eval --ckpt FOLDER`` and demo (which load exactly those four
paths), and transformers' ``convert_chameleon_weights_to_hf.py``. Meta's layout holds one query/key
LayerNorm per model-parallel shard: the heads of each shard must share theirs. ``--shards`` defaults to
the model's ``model_parallel_size`` (1 for 7B); a fine-tuned model whose heads' norms drifted apart is
refused with the shard counts that hold it exactly. Tensors keep their dtype unless ``--dtype`` is given;
``rope.freqs`` is recomputed from ``rope_theta``. An original release converted with ``medmax-convert``
and exported back is identical tensor for tensor.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medmax.cli import program
from medmax.errors import UserError
from medmax.training_run import RUN_FILE, read_run_info
from medmax.vocab import load_tokenizer

if TYPE_CHECKING:  # names for annotations only: the functions import them when they run, not for --help
    import torch

    from medmax.model import MedMaxChameleon

logger = logging.getLogger("finetune.export")

ROW_KEYS = ".trainable_rows"  # image-alignment's extra parameters; their values are already in the weights


def load_trained_model(checkpoint: Path, info: dict, dtype: torch.dtype) -> MedMaxChameleon:
    """The checkpoint's weights as a plain model: LoRA merged, image-alignment rows already in place."""
    from medmax.model import MedMaxChameleon  # torch and transformers load here, not for --help

    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        if not info.get("base_model"):
            raise UserError(f"{checkpoint}/{RUN_FILE}: a LoRA checkpoint without base_model")
        base = MedMaxChameleon.from_pretrained(info["base_model"], dtype=dtype)
        merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
        logger.info("merged LoRA adapters from %s into %s", checkpoint, info["base_model"])
        return merged
    model, loading = MedMaxChameleon.from_pretrained(checkpoint, dtype=dtype, output_loading_info=True)
    unexpected = [k for k in loading["unexpected_keys"] if not k.endswith(ROW_KEYS)]
    if loading["missing_keys"] or unexpected:
        raise UserError(f"{checkpoint}: missing {loading['missing_keys'][:5]}, unexpected {unexpected[:5]}")
    return model


def export(checkpoint: str | Path, output: str | Path, dtype: str = "float32", trust_checkpoint: bool = False) -> Path:
    """Write the model folder of ``checkpoint`` to ``output``; returns ``output``."""
    import torch

    from medmax.checkpoints import load_complete_vqgan
    from medmax.model import save_model_dir

    checkpoint = Path(checkpoint)
    info = read_run_info(checkpoint)
    model = load_trained_model(checkpoint, info, getattr(torch, dtype))
    tokenizer = load_tokenizer(checkpoint / info.get("tokenizer", "tokenizer.json"))
    vqgan = load_complete_vqgan(info["vqgan"], trust_checkpoint)
    folder = save_model_dir(output, model, tokenizer, vqgan)
    logger.info("wrote model folder %s (mode %s)", folder, info.get("mode"))
    return folder


@dataclass
class ExportSource:
    """A model to export: its config, a reader of one tensor by name, its tokenizer and complete VQGAN."""

    config: object
    get: Callable[[str], torch.Tensor]
    tokenizer: object
    vqgan: object


def open_source(source: Path, dtype: str | None, trust_checkpoint: bool) -> ExportSource:
    """A training checkpoint (LoRA merged in memory) or a model folder (tensors read one at a time)."""
    import torch

    from medmax.checkpoints import FolderTensors, check_model_folder, load_complete_vqgan

    if (source / RUN_FILE).is_file():
        info = read_run_info(source)
        model = load_trained_model(source, info, getattr(torch, dtype) if dtype else "auto")
        state = model.state_dict()
        return ExportSource(model.config, state.__getitem__,
                            load_tokenizer(source / info.get("tokenizer", "tokenizer.json")),
                            load_complete_vqgan(info["vqgan"], trust_checkpoint))
    from transformers import ChameleonConfig

    check_model_folder(source, trust_checkpoint=trust_checkpoint)
    return ExportSource(ChameleonConfig.from_pretrained(source), FolderTensors.open(source).get,
                        load_tokenizer(source / "tokenizer.json"), load_complete_vqgan(source / "vqgan", trust_checkpoint))


def export_chameleon(source: str | Path, output: str | Path, shards: int | None = None, model_size: str = "7b",
                     dtype: str | None = None, trust_checkpoint: bool = False) -> Path:
    """Write Meta's original layout (module docstring) of a training checkpoint or model folder."""
    import torch

    from medmax.checkpoints import fresh_output
    from medmax.meta_layout import MetaParams, check_size_name, exact_shard_counts, hf_to_meta, write_original

    check_size_name(model_size)  # before anything is read
    src = open_source(Path(source), dtype, trust_checkpoint)
    shards = shards or getattr(src.config, "model_parallel_size", 1) or 1
    exact = exact_shard_counts(src.get, src.config)
    if shards not in exact:
        raise UserError(f"{source}: cannot be written as {shards} model-parallel shard(s) exactly: every size must "
                        "divide by the shard count, and Meta's layout holds one query/key LayerNorm per shard, so the "
                        "heads of a shard must share theirs (fine-tuning can move each head's apart); "
                        f"--shards {' or '.join(map(str, exact)) or '(none fits)'} would hold it exactly")
    params = MetaParams.from_hf_config(src.config, shards)
    meta = hf_to_meta(src.get, params, getattr(torch, dtype) if dtype else None)
    with fresh_output(output) as folder:
        write_original(folder, meta, params, src.tokenizer, src.vqgan, model_size)
    logger.info("wrote Meta's layout to %s (%d shard(s))", output, shards)
    return Path(output)


@program("medmax-export")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medmax-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-N folder or a finished output_dir (--format chameleon: also a model folder)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--format", default="model", choices=["model", "chameleon"],
                        help="model: a model folder; chameleon: Meta's original layout (models/<size>/, tokenizer/)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: model float32; chameleon as stored)")
    parser.add_argument("--shards", type=int, help="chameleon: model-parallel shards (default: the model's)")
    parser.add_argument("--model-size", default="7b", help="chameleon: the models/<size>/ folder name")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow a legacy pickled VQGAN checkpoint")
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.format == "model":
        export(args.checkpoint, args.output, args.dtype or "float32", args.trust_checkpoint)
        return 0
    export_chameleon(args.checkpoint, args.output, args.shards, args.model_size, args.dtype, args.trust_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
