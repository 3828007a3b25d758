"""Bring a Chameleon / Anole / MedMax checkpoint, in any released layout, into a model folder.

Usage::

    # the original release (Chameleon 7B / 30B, Anole, MedMax): params.json + consolidated*.pth, tokenizer/
    medmax-convert --input CKPT --output models/anole-7b
    medmax-convert --input CKPT --model-size 30b --output models/chameleon-30b     # 4 model-parallel shards
    # a Hugging Face Chameleon folder (e.g. MedMax's medmax_7b_hf, no VQGAN decoder) + the original tokenizer/
    medmax-convert --input medmax_7b_hf --original CKPT --output models/medmax-7b
    # a folder that already is a model folder: checked, nothing written
    medmax-convert --input models/medmax-7b

The layout is detected: ``params.json`` here or in ``models/<size>/`` is an original release (read by
:mod:`medmax.meta_layout`: model-parallel shards merged, wq/wk rows moved from Meta's paired rotary order
to transformers' half order, per-shard query/key LayerNorms spread over their heads); a ``config.json``
with ``vqgan/`` beside it is a model folder; any other Chameleon ``config.json`` is a Hugging Face folder,
which gets the complete VQGAN (decoder included) and tokenizer of ``--original``, refusing a pair whose
VQGAN encoders differ.

Nothing is unpickled beyond plain tensors: ``consolidated*.pth`` is read with ``weights_only=True``,
memory-mapped, converted one tensor at a time and written to safetensors as it goes, so a 7B conversion
never holds two copies of the model. ``vqgan.ckpt`` files that are PyTorch Lightning pickles with
objects in them need ``--trust-checkpoint``. The output (``config.json``, safetensors, ``tokenizer.json``,
``vqgan/``) is what ``finetune.train model=...``, generation and evaluation load; it appears only when
complete, and an existing non-empty ``--output`` is refused. ``finetune.export --format chameleon``
writes the original layout back.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.cli import program
from medmax.errors import UserError

if TYPE_CHECKING:  # names for annotations only: torch loads when a conversion runs, not for --help
    import torch

logger = logging.getLogger("finetune.convert")

DTYPES = ("float32", "bfloat16", "float16")


def detect_layout(path: Path) -> str:
    """``original`` (params.json here or in models/<size>/), ``model-folder`` or ``hf`` (a Chameleon config.json)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if (path / "params.json").is_file() or any(path.glob("models/*/params.json")):
        return "original"
    if (path / "config.json").is_file():
        return "model-folder" if (path / "vqgan").is_dir() and (path / "tokenizer.json").is_file() else "hf"
    raise FileNotFoundError(f"{path}: neither an original release (params.json, models/<size>/params.json) "
                            "nor a Hugging Face / model folder (config.json)")


def _progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        logger.info("converted %d/%d tensors", done, total)


def convert_original(path: str | Path, output: str | Path, model_size: str | None = None, dtype: str | None = None,
                     tokenizer: str | Path | None = None, trust_checkpoint: bool = False,
                     allow_norm_mismatch: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Original layout -> model folder, one tensor at a time; ``dtype`` None keeps the stored dtypes."""
    import torch  # torch loads here, not for --help

    from transformers import GenerationConfig

    from medmax.checkpoints import DEFAULT_SHARD_BYTES, fresh_output, load_complete_vqgan, write_weights
    from medmax.meta_layout import OriginalCheckpoint
    from medmax.vocab import Vocabulary, load_tokenizer
    from medmax.vqgan import save_vqgan

    ckpt = OriginalCheckpoint.open(path, model_size, allow_norm_mismatch)
    tok = load_tokenizer(tokenizer or ckpt.tokenizer_path)
    vqgan = load_complete_vqgan(ckpt.vqgan_dir, trust_checkpoint)
    _check_vocab(Vocabulary.from_tokenizer(tok).size, ckpt.params.vocab_size, ckpt.model_dir)
    items = ckpt.shards.plan(getattr(torch, dtype) if dtype else None) + _vqmodel_items(vqgan)
    config = _hf_config(ckpt.params, tok, vqgan, items[0].dtype)
    logger.info("converting %s: %d layers, %d shard(s), %s", ckpt.model_dir, ckpt.params.n_layers,
                ckpt.params.model_parallel_size, config.dtype)
    with fresh_output(output) as folder:
        write_weights(folder, items, max_shard_bytes or DEFAULT_SHARD_BYTES, _progress)
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        save_vqgan(vqgan, folder / "vqgan")
    logger.info("wrote model folder %s", output)
    return Path(output)


def _vqmodel_items(vqgan) -> list:
    """transformers' ``model.vqmodel.*``: the VQGAN without its decoder, as stored."""
    from medmax.meta_layout import PlannedTensor

    return [PlannedTensor(f"model.vqmodel.{key}", tuple(value.shape), value.dtype, lambda v=value: v)
            for key, value in vqgan.state_dict().items() if not key.startswith("decoder.")]


def _hf_config(params, tokenizer, vqgan, dtype: torch.dtype):
    """The ChameleonConfig of a release: sizes from params.json, vocabulary and vq_config from its files."""
    from medmax.model import STANDARD_ARCHITECTURE, chameleon_config

    config = chameleon_config("7b", tokenizer, vqgan.params, **params.hf_fields())  # every size field overridden
    config.architectures = [STANDARD_ARCHITECTURE]
    config.dtype = dtype
    return config


def _check_vocab(tokenizer_ids: int, model_ids: int, where: Path) -> None:
    if tokenizer_ids > model_ids:
        raise UserError(f"the tokenizer has {tokenizer_ids} ids, the model in {where} only {model_ids}")


def check_same_encoder(model, vqgan, hf_model: Path, original: Path) -> None:
    """The HF model's vqmodel must be the original VQGAN's encoder half, tensor for tensor."""
    import torch

    ours = model.model.vqmodel.state_dict()
    theirs = {k: v for k, v in vqgan.state_dict().items() if not k.startswith("decoder.")}
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k].float(), theirs[k].float())]
    if differ or ours.keys() != theirs.keys():
        raise UserError(f"{hf_model}: its model.vqmodel differs from the VQGAN in {original}/tokenizer "
                        f"({len(differ)} tensors, e.g. {differ[:3]}); were they converted from the same checkpoint?")


def convert_hf(hf_model: str | Path, original: str | Path, output: str | Path, tokenizer: str | Path | None = None,
               dtype: str | None = "bfloat16", trust_checkpoint: bool = False) -> Path:
    """A Hugging Face Chameleon folder + the original ``tokenizer/`` -> model folder (adds the VQGAN decoder)."""
    import torch

    from medmax.checkpoints import check_weights, fresh_output, load_complete_vqgan
    from medmax.meta_layout import original_tokenizer
    from medmax.model import MedMaxChameleon, save_model_dir
    from medmax.vocab import Vocabulary, load_tokenizer

    hf_model, original = Path(hf_model), Path(original)
    check_weights(hf_model)  # before transformers builds a model of the config's size
    vqgan = load_complete_vqgan(original / "tokenizer", trust_checkpoint)
    model = MedMaxChameleon.from_pretrained(hf_model, dtype=getattr(torch, dtype) if dtype else "auto")
    check_same_encoder(model, vqgan, hf_model, original)
    tok = load_tokenizer(tokenizer or original_tokenizer(original))
    _check_vocab(Vocabulary.from_tokenizer(tok).size, model.config.vocab_size, hf_model)
    with fresh_output(output) as folder:
        save_model_dir(folder, model, tok, vqgan)
    logger.info("wrote %s: model from %s, tokenizer and complete VQGAN from %s", output, hf_model, original)
    return Path(output)


def check_folder(path: Path, output: str | None, trust_checkpoint: bool) -> Path:
    """A model folder needs no conversion: validate it and write nothing."""
    from medmax.checkpoints import check_model_folder

    if output and Path(output).resolve() != path.resolve():
        raise UserError(f"{path} is already a model folder; use it directly (nothing to write to {output})")
    summary = check_model_folder(path, trust_checkpoint=trust_checkpoint)
    logger.info("%s is a valid model folder, nothing to convert: %s", path, summary)
    return path


def convert(args: argparse.Namespace) -> Path:
    path = Path(args.input or args.hf_model or args.original)
    layout = detect_layout(path)
    if layout == "model-folder":
        return check_folder(path, args.output, args.trust_checkpoint)
    if not args.output:
        raise UserError(f"{path} is a{'n original' if layout == 'original' else ' Hugging Face'} checkpoint: "
                        "--output is required")
    if layout == "original":
        return convert_original(path, args.output, args.model_size, args.dtype, args.tokenizer,
                                args.trust_checkpoint, args.allow_norm_mismatch)
    if not args.original or Path(args.original).resolve() == path.resolve():
        raise UserError(f"{path} is a Hugging Face Chameleon folder without the VQGAN decoder; "
                        "name the original release (its tokenizer/ folder) with --original")
    return convert_hf(path, args.original, args.output, args.tokenizer, args.dtype or "bfloat16", args.trust_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmax-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--input", help="an original release, a Hugging Face Chameleon folder or a model folder")
    parser.add_argument("--output", help="model folder to write (must not exist, or be empty)")
    parser.add_argument("--original", help="the original release whose tokenizer/ completes a Hugging Face folder")
    parser.add_argument("--hf-model", help=argparse.SUPPRESS)  # earlier name of --input for a Hugging Face folder
    parser.add_argument("--model-size", help="which models/<size>/ of a release holding several (e.g. 7b, 30b)")
    parser.add_argument("--tokenizer", help="tokenizer JSON to use instead of the release's")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored; Hugging Face input: bfloat16)")
    parser.add_argument("--allow-norm-mismatch", action="store_true",
                        help="average replicated norms that differ between model-parallel shards instead of refusing")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow a vqgan.ckpt that needs full unpickling")
    return parser


@program("medmax-convert")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.input or args.hf_model or args.original):
        parser.error("--input is required")
    convert(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
