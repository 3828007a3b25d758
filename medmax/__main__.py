"""The ``medmax`` command: generation from a model folder, and a list of the project's other programs.

Usage::

    medmax generate --model runs/export --prompt "Generate an image of a chest X-ray" --mode image --output out/
    medmax generate --model runs/export --prompt "What organ is shown?" --image scan.png --mode text --output out/
    medmax generate --model runs/export --image scan.png --prompt "Remove the lesion." --mode image --output out/
    medmax generate --model runs/export --image scan.png --prompt "Fill in the body." --mode image --edit-mask 10,60,40,90 --output out/
    python -m medmax generate --model DIR --prompt "..." [--image PATH ...] --mode text|image|interleaved --output DIR
    medmax demo --model runs/quickstart/model [--host 127.0.0.1] [--port 7860]   # the browser demo (pip install -e .[demo])
    medmax programs            # the other programs of the toolkit

The prompt is laid out as training rows and ``eval.run`` lay it out (``medmax.prompting``): the images,
then the text, then the end-of-turn token (``--no-end-of-turn`` leaves it out). Where the text holds
``<image>`` placeholders, the images go there instead, in order. Typed text is encoded with special-token
parsing off (a typed ``<racm3:break>`` stays text). ``--output`` receives ``image_<i>.png`` for every
generated image and ``generation.json`` recording the prompt, the settings and the output segments in
order. ``--top-p 0`` / ``--image-top-p 0`` keep only the most likely token (greedy). A non-empty
``--output`` is refused unless ``--overwrite`` is given, which removes only the files an earlier
``medmax generate`` wrote there (its ``generation.json`` and the images it lists); an ``--output`` that
cannot be written is refused before the model loads, and so is a ``config.json`` whose parameters
need more memory than is available (``--skip-memory-check`` loads it anyway).

Image-conditioned generation (editing, modality translation) is ``--mode image`` with input images: the
guidance streams are the full prompt, the input images alone, and nothing (``--cfg-image`` scales the
images' pull, ``--cfg-text`` the instruction's; ``medmax.generation.image``). ``--edit-mask`` inpaints:
only the region is drawn, every other code is the first input image's. Without an input image, a mask
outside that image, an empty one, or one of neither the image's nor the model's code grid's size is refused
before the model loads.

This is the one module of ``medmax/`` that parses arguments (``medmax.cli`` prints its error line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path

from .cli import run
from .errors import UserError
from .generation.config import DECODINGS, MODES, GenerationConfig

GEN = GenerationConfig  # every generation flag's default is the config field it fills


PROGRAMS = """\
The MedMax toolkit's programs (each has --help):
  medmax generate ...                                  text / image / interleaved generation (this command)
  medmax demo --model DIR                              a browser demo: chat about scans, draw images (make demo)
  python -m tokenization.image_tokenize ...            images -> VQGAN code shards (medmax-image-tokenize; torchrun for GPUs)
  python -m tokenization.build_sequences ...           text + codes -> training sequences (medmax-build-sequences)
  python -m tokenization.build_preferences ...         preference rows -> prompt / chosen / rejected ids (medmax-build-preferences)
  python -m tokenization.train_vqgan ...               VQGAN training / fine-tuning, taming objective (medmax-train-vqgan)
  finetune/launch.sh ... | python -m finetune.train ... fine-tuning: full, LoRA, image-alignment, dpo, grpo (medmax-train)
  python -m finetune.make_preferences ...              MMedPO-style preference rows from a VQA set and a model (medmax-make-preferences)
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
    g.add_argument("--image", action="append", default=[], type=Path,
                   help="an input image (repeatable); a NIfTI file, .npy or DICOM series folder is read as a volume")
    g.add_argument("--volume", action="append", default=[], type=Path,
                   help="an input volume: NIfTI, .npy or a DICOM series folder (repeatable; after the --image ones)")
    g.add_argument("--slices", default="16", help="slices a volume gives, evenly spaced along z, or all (default: %(default)s)")
    g.add_argument("--window", default="percentile", help="a volume's CT window (lung, abdomen, ..., W/L) or percentile")
    g.add_argument("--volume-index", type=int, help="which volume of a 4D file")
    g.add_argument("--mode", required=True, choices=MODES)
    g.add_argument("--output", required=True, type=Path, help="folder for the PNGs and generation.json")
    g.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --output: removes the generation.json and images an earlier run wrote there")
    g.add_argument("--no-end-of-turn", action="store_true", help="do not close the prompt with the end-of-turn token")
    g.add_argument("--max-new-tokens", type=int, default=GEN.max_new_tokens, help="text tokens to generate at most")
    g.add_argument("--max-images", type=int, default=GEN.max_images, help="interleaved: images to draw at most")
    g.add_argument("--greedy", action="store_true", help="greedy text decoding (default: sampling)")
    g.add_argument("--temperature", type=float, default=GEN.temperature, help="text temperature")
    g.add_argument("--top-p", type=float, default=GEN.top_p, help="text top-p, in [0, 1]: 1 keeps every token, 0 only the most likely (greedy)")
    g.add_argument("--repetition-penalty", type=float, default=GEN.repetition_penalty, help="text repetition penalty (1.0 = off)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--image-temperature", type=float, default=GEN.image_temperature)
    g.add_argument("--image-top-p", type=float, default=GEN.image_top_p, help="image top-p, in [0, 1] (0 = greedy codes)")
    g.add_argument("--cfg-text", type=float, default=GEN.guidance_scale_text, help="guidance scale for the text condition")
    g.add_argument("--cfg-image", type=float, default=GEN.guidance_scale_image, help="guidance scale for the image condition")
    g.add_argument("--no-guidance", action="store_true", help="sample images without classifier-free guidance")
    g.add_argument("--edit-mask", metavar="MASK|x0,y0,x1,y1",
                   help="inpainting (--mode image): draw only this region of the first --image (a box in its pixels, "
                        "or a mask image of its size or of the code grid's, non-zero = edit); every code outside is "
                        "copied from that image")
    g.add_argument("--decoding", choices=DECODINGS, default=GEN.decoding,
                   help="image codes: sjd (speculative Jacobi decoding: several codes per forward, drawn from the same "
                        "distribution), plain (one code per forward) or auto (sjd where the batch is small enough to gain)")
    g.add_argument("--sjd-window", type=int, default=GEN.sjd_window, help="sjd: tokens verified per forward")
    g.add_argument("--size", metavar="HxW", help="image size in pixels, e.g. 64x96: the shaped layout (a model trained on "
                   "build_sequences --image-layout shaped); sides must be multiples of the VQGAN's downsampling")
    g.add_argument("--image-layout", choices=("fixed", "shaped"), default=GEN.image_layout,
                   help="shaped without --size: the model picks the size (default: fixed, Chameleon's square)")
    g.add_argument("--seed", type=int, default=0, help="default 0 (GenerationConfig's None would draw a fresh seed)")
    g.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--skip-memory-check", action="store_true",
                   help="load even when config.json's sizes need more memory than is available")
    _add_demo_parser(sub)
    return parser


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="serve a browser demo of a model folder (needs the 'demo' extra: Gradio)")
    d.add_argument("--model", required=True, type=Path, help="model folder (config.json, tokenizer.json, vqgan/)")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    d.add_argument("--max-batch-size", type=int, default=8, help="requests from several tabs run together, at most")
    d.add_argument("--max-upload-mb", type=float, default=32, help="largest file a user may upload")
    d.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available)")
    d.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))


def _demo(args) -> int:
    import torch

    from .demo_app import serve

    if not (args.model / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json (a model folder from finetune.export)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    serve(args.model, host=args.host, port=args.port, share=args.share, device=device,
          dtype=getattr(torch, args.dtype) if args.dtype else None, max_batch_size=args.max_batch_size,
          max_upload_mb=args.max_upload_mb)
    return 0


def _prompt_segments(text: str, images: list, end_of_turn: bool) -> list:
    """The one prompt layout (``medmax.prompting``): images first, or where ``<image>`` placeholders put them."""
    from .prompting import prompt_segments

    try:
        return prompt_segments(text, images, end_of_turn=end_of_turn)
    except UserError as err:
        raise UserError(f"--prompt / --image: {err}") from None


def _input_images(args) -> list:
    """--image files (volumes among them) then --volume ones; a volume's slices are resized by the prompt encoder."""
    from .images import load_image
    from .prompting import load_volume_input
    from .volumes import is_volume_path

    volumes = [p for p in args.image if is_volume_path(p)] + list(args.volume)
    out = []
    for path in [*args.image, *args.volume]:
        if path in volumes:
            try:
                out.append(load_volume_input(path, None, args.slices, args.window, args.volume_index))
            except ValueError as err:  # a bad --slices / --window, or an unreadable volume
                raise UserError(f"--volume {path}: {err}") from None
        else:
            out.append(load_image(path))
    return out


def _generation_config(args) -> GenerationConfig:
    return GenerationConfig(
        mode=args.mode, max_new_tokens=args.max_new_tokens, max_images=args.max_images, do_sample=not args.greedy,
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop), image_temperature=args.image_temperature, image_top_p=args.image_top_p,
        guidance=not args.no_guidance, guidance_scale_text=args.cfg_text, guidance_scale_image=args.cfg_image,
        decoding=args.decoding, sjd_window=args.sjd_window, seed=args.seed, batch_size=1,  # one prompt
        image_layout=args.image_layout, image_size=_size(args),
    )


def _size(args) -> tuple[int, int] | None:
    """--size HxW, checked against the model folder's VQGAN config (not its weights): before the model loads."""
    if args.size is None:
        return None
    from .image_layout import parse_size

    size = parse_size(args.size)
    yaml_path = Path(args.model) / "vqgan" / "vqgan.yaml"
    if yaml_path.is_file():
        from .image_layout import check_size
        from .vqgan import read_vqgan_yaml

        check_size(size, 2 ** (len(read_vqgan_yaml(yaml_path)["ddconfig"]["ch_mult"]) - 1))
    return size


RECORD = "generation.json"
_OWN_IMAGE = re.compile(r"image_\d+\.png")


def _written_before(folder: Path) -> list[str]:
    """Files an earlier ``medmax generate`` wrote in ``folder``: its record and the images the record lists."""
    try:
        record = json.loads((folder / RECORD).read_text())
        listed = [seg.get("path") for seg in record.get("segments", []) if isinstance(seg, dict)]
    except (OSError, ValueError, AttributeError):
        return []
    return [RECORD] + [p for p in listed if isinstance(p, str) and _OWN_IMAGE.fullmatch(p)]


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medmax-write-check-"):
            pass
    except OSError as err:
        raise UserError(f"--output {folder}: cannot write there ({err.strerror or err})") from None


def _prepare_output(folder: Path, overwrite: bool, n_images: int) -> None:
    """Before the model loads: a writable folder that is empty, or (--overwrite) cleared of an earlier run's files."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder}: exists and is not a folder")
    _check_writable(folder)
    existing = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".medmax-write-check-"))
    if existing and not overwrite:
        raise UserError(f"--output {folder}: not empty ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                        "pass --overwrite to replace what an earlier medmax generate wrote there, or choose another folder")
    earlier = _written_before(folder)
    foreign = sorted(({RECORD, *(f"image_{i}.png" for i in range(n_images))} & set(existing)) - set(earlier))
    if foreign:
        raise UserError(f"--output {folder}: {', '.join(foreign)} was not written by medmax generate (no {RECORD} "
                        "lists it); move it away or choose another folder")
    for name in earlier:
        (folder / name).unlink(missing_ok=True)


def _write_record(out, args, config, output_dir: Path) -> Path:
    from .generation import ImageOutput

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
        "volumes": [str(p) for p in args.volume], "volume_slices": {"slices": args.slices, "window": args.window},
        "edit_mask": args.edit_mask,
        "config": dataclasses.asdict(config), "finish_reason": out.finish_reason,
        "segments": segments, "token_ids": out.token_ids,
    }
    path = output_dir / RECORD
    partial = output_dir / f".{RECORD}.partial"
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)  # the record appears whole, after the images it lists
    return path


def _edit_region(args, images: list):
    """``--edit-mask`` as an EditRegion on the first --image, checked against the model's code grid; None without it."""
    if args.edit_mask is None:
        return None
    from .generation.editing import EditMaskError, EditRegion, model_grid, region_from_spec

    if args.mode != "image":
        raise EditMaskError(f"--edit-mask needs --mode image, not {args.mode}")
    if args.size is not None or args.image_layout != "fixed":
        raise EditMaskError("--edit-mask works in the fixed image layout only, not with --image-layout shaped or --size")
    if not images:
        raise EditMaskError("--edit-mask: no --image to edit; inpainting copies the codes outside the mask from the first --image")
    resolution, grid = model_grid(args.model)
    return EditRegion(region_from_spec(args.edit_mask, images[0], resolution, grid))


def _generate(args) -> int:
    import torch

    from .generation import Generator

    config = _generation_config(args)  # bad settings fail here, before anything is loaded
    images = _input_images(args)  # an unreadable image or volume fails before the model loads
    segments = _prompt_segments(args.prompt, images, not args.no_end_of_turn)
    edit = _edit_region(args, images)  # a mask that cannot apply fails before the model loads
    n_images = {"text": 0, "image": 1, "interleaved": args.max_images}[args.mode]
    _prepare_output(args.output, args.overwrite, n_images)  # a full or read-only folder fails before any work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    generator = Generator.from_dir(args.model, device=device, dtype=dtype, skip_memory_check=args.skip_memory_check)
    (out,) = generator.generate([segments], config, edits=[edit])
    path = _write_record(out, args, config, args.output)
    print(f"{out.finish_reason}: {len(out.images)} image(s), {len(out.text)} characters of text -> {path}")
    if out.text:
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("generate", "demo"):
        print(PROGRAMS, end="")
        return 0
    return run(f"medmax {args.command}", _demo if args.command == "demo" else _generate, args)


if __name__ == "__main__":
    sys.exit(main())
