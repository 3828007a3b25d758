"""The ``medmax`` command: generation from a model folder, and a list of the project's other programs.

Usage::

    medmax generate --model runs/export --prompt "Generate an image of a chest X-ray" --mode image --output out/
    medmax generate --model runs/export --prompt "What organ is shown?" --image scan.png --mode text --output out/
    python -m medmax generate --model DIR --prompt "..." [--image PATH ...] --mode text|image|interleaved --output DIR
    medmax programs            # the other programs of the toolkit

The prompt is encoded as training rows are: the text, then the images, then the end-of-turn token
(``--no-end-of-turn`` leaves it out). Where the text holds ``<image>`` placeholders, the images go
there instead, in order. ``--output`` receives ``image_<i>.png`` for every generated image and
``generation.json`` recording the prompt, the settings and the output segments in order.

This is the one module of ``medmax/`` that parses arguments and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .vocab import IMAGE_PLACEHOLDER

PROGRAMS = """\
The MedMax toolkit's programs (each has --help):
  medmax generate ...                                  text / image / interleaved generation (this command)
  python -m tokenization.image_tokenize ...            images -> VQGAN code shards (medmax-image-tokenize; torchrun for GPUs)
  python -m tokenization.build_sequences ...           text + codes -> training sequences (medmax-build-sequences)
  python -m tokenization.train_vqgan ...               reconstruction training of a VQGAN (medmax-train-vqgan)
  finetune/launch.sh ... | python -m finetune.train ... fine-tuning, full or LoRA (medmax-train)
  python -m finetune.export ...                        merge and export a model folder (medmax-export)
  python -m finetune.convert ...                       original Chameleon / MedMax layout -> model folder (medmax-convert)
  python -m eval.run ...                               biomedical VQA / captioning / image-generation evaluation (medmax-eval)
  python -m quickstart ...                             the whole pipeline on tiny models and synthetic data (make quickstart)
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmax", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PROGRAMS)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("programs", help="list the toolkit's programs")
    g = sub.add_parser("generate", help="generate text, an image, or both from a model folder")
    g.add_argument("--model", required=True, type=Path, help="model folder (config.json, tokenizer.json, vqgan/)")
    g.add_argument("--prompt", required=True, help="prompt text; <image> marks where each --image goes")
    g.add_argument("--image", action="append", default=[], type=Path, help="an input image (repeatable)")
    g.add_argument("--mode", required=True, choices=("text", "image", "interleaved"))
    g.add_argument("--output", required=True, type=Path, help="folder for the PNGs and generation.json")
    g.add_argument("--no-end-of-turn", action="store_true", help="do not close the prompt with the end-of-turn token")
    g.add_argument("--max-new-tokens", type=int, default=256, help="text tokens to generate at most")
    g.add_argument("--max-images", type=int, default=1, help="interleaved: images to draw at most")
    g.add_argument("--greedy", action="store_true", help="greedy text decoding (default: sampling)")
    g.add_argument("--temperature", type=float, default=1.0, help="text temperature")
    g.add_argument("--top-p", type=float, default=0.9, help="text top-p")
    g.add_argument("--repetition-penalty", type=float, default=1.2, help="text repetition penalty (1.0 = off)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--image-temperature", type=float, default=0.7)
    g.add_argument("--image-top-p", type=float, default=0.9)
    g.add_argument("--cfg-text", type=float, default=3.0, help="guidance scale for the text condition")
    g.add_argument("--cfg-image", type=float, default=1.2, help="guidance scale for the image condition")
    g.add_argument("--no-guidance", action="store_true", help="sample images without classifier-free guidance")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    return parser


def _prompt_segments(text: str, images: list, end_of_turn: bool) -> list:
    """Text and images in training order; images replace <image> placeholders when the text has them."""
    from .generation import END_OF_TURN

    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        segments = [text, *images]
    elif len(pieces) - 1 != len(images):
        raise ValueError(f"--prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} --image given")
    else:
        segments = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            segments += [image, piece]
        segments = [s for s in segments if not (isinstance(s, str) and s == "")]
    return segments + ([END_OF_TURN] if end_of_turn else [])


def _generation_config(args):
    from .generation import GenerationConfig

    return GenerationConfig(
        mode=args.mode, max_new_tokens=args.max_new_tokens, max_images=args.max_images, do_sample=not args.greedy,
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop), image_temperature=args.image_temperature, image_top_p=args.image_top_p,
        guidance=not args.no_guidance, guidance_scale_text=args.cfg_text, guidance_scale_image=args.cfg_image,
        seed=args.seed,
    )


def _write_record(out, args, config, output_dir: Path) -> Path:
    from .generation import ImageOutput

    output_dir.mkdir(parents=True, exist_ok=True)
    segments, n_images = [], 0
    for seg in out.segments:
        if isinstance(seg, ImageOutput):
            name = f"image_{n_images}.png"
            seg.image.save(output_dir / name)
            segments.append({"type": "image", "path": name, "codes": seg.codes})
            n_images += 1
        else:
            segments.append({"type": "text", "text": seg.text})
    record = {
        "model": str(args.model), "prompt": args.prompt, "images": [str(p) for p in args.image],
        "config": dataclasses.asdict(config), "finish_reason": out.finish_reason,
        "segments": segments, "token_ids": out.token_ids,
    }
    path = output_dir / "generation.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def _generate(args) -> int:
    import torch

    from .generation import Generator
    from .images import load_image

    config = _generation_config(args)  # bad settings fail here, before anything is loaded
    images = [load_image(p) for p in args.image]  # an unreadable image fails before the model loads
    segments = _prompt_segments(args.prompt, images, not args.no_end_of_turn)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    generator = Generator.from_dir(args.model, device=device, dtype=dtype)
    (out,) = generator.generate([segments], config)
    path = _write_record(out, args, config, args.output)
    print(f"{out.finish_reason}: {len(out.images)} image(s), {len(out.text)} characters of text -> {path}")
    if out.text:
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "generate":
        print(PROGRAMS, end="")
        return 0
    from .images import ImageLoadError  # after parsing: --help and `programs` never load torch

    try:
        return _generate(args)
    except (ValueError, TypeError, ImageLoadError, FileNotFoundError) as err:
        print(f"medmax generate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
