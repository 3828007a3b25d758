"""Curate DPO preference rows from a VQA set with a model, the MMedPO way (hallucinated answers, noised lesions).

Usage::

    python -m finetune.make_preferences --model runs/sft_model --input data/eval/eval.jsonl \\
        --image-root data/eval --output runs/prefs/rows.jsonl
    # then: python -m tokenization.build_preferences --input runs/prefs/rows.jsonl --tokenizer runs/sft_model \\
    #           --output runs/prefs/folder
    # training rows (MedMax's "<image>question<reserved08706>answer" + image_path), image continuations mirrored:
    python -m finetune.make_preferences --model runs/sft_model --input data/train.jsonl --image-root data \\
        --output runs/prefs/train_rows.jsonl --image-pairs mirror

Input rows, JSONL: MedMax's evaluation schema (``prompt``, ``answer``, ``question_type`` closed / mcq /
open, ``image_path``, optional ``options``), or its training rows (``text`` = question, end-of-turn,
answer; ``image_path``); a training row whose answer is ``<image>`` (an image-generation row) gives an
image-continuation pair. Optional per row: ``lesion_box`` ([x0, y0, x1, y1], fractions of the image),
``lesion_mask`` (an image path under ``--image-root``; nonzero pixels are the lesion) and ``weight``.
Image paths are read under ``--image-root`` and may not leave it. (A sequence folder holds token ids
only; noising needs pixels, so curate from the rows the folder was built from.)

Kinds of pair (``--kinds``; each row can give one of each, see ``medmax.preference_mining``):

- ``hallucination``: chosen the gold answer, rejected the model's greedy answer when it is wrong, else a
  swapped one of the same type (yes <-> no, another option letter, another open answer of the type);
- ``noise``: the lesion region (the row's mask or box, else a seeded random box of ``--box-side``) is
  noised in pixels and re-tokenized through the model's VQGAN; the model's greedy answer on the noised
  image, when it differs from the gold one, is rejected against the gold answer on the original image.
  The weight is the row's, else the share of the image's codes the noising changed (MMedPO's MedKLIP
  relevance score has no counterpart for an arbitrary model; this is its stand-in, see the module);
- image continuations: the row's image chosen, the image with its lesion region noised (``noise``) or
  mirrored (``mirror``) rejected, weight as above.

Writes OUTPUT (preference rows with every image as codes, so ``build_preferences`` needs only the
tokenizer; ``image_path`` and ``kind`` kept) once complete, OUTPUT's ``.errors.jsonl`` (rows left out
and why: unreadable image, no wrong answer to swap in, model right on the noised image...) and
``.summary.json`` (counts per kind and reason, the settings). An existing OUTPUT is refused unless
``--overwrite``. Each phase (reading, answering, noising) is logged as it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from medmax.cli import program
from medmax.errors import UserError

logger = logging.getLogger("finetune.make_preferences")

KINDS = ("hallucination", "noise")
IMAGE_PAIRS = ("noise", "mirror", "none")


@dataclass
class MineConfig:
    """One curation run (filled from the flags)."""

    model: str
    inputs: list[str]
    output: str
    image_root: str = "."
    kinds: tuple[str, ...] = KINDS
    image_pairs: str = "noise"
    noise_level: float = 0.9  # share of noise variance inside the region (1: pure noise)
    box_side: float = 0.4  # side of the random box, as a share of the image's
    max_new_tokens: int = 8
    batch_size: int = 16
    seed: int = 0
    overwrite: bool = False
    device: str = "cpu"

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise UserError(f"--kinds {bad[0]}: choose among {KINDS}")
        if self.image_pairs not in IMAGE_PAIRS:
            raise UserError(f"--image-pairs {self.image_pairs}: choose one of {IMAGE_PAIRS}")
        if not 0 < self.noise_level <= 1:
            raise UserError(f"--noise-level {self.noise_level}: must lie in (0, 1]")
        if not 0 < self.box_side <= 1:
            raise UserError(f"--box-side {self.box_side}: must lie in (0, 1]")
        if Path(self.output).exists() and not self.overwrite:
            raise UserError(f"--output {self.output} exists; pass --overwrite to replace it")


@dataclass
class Item:
    """One input row, read: where it came from, its question or generation prompt, and its image."""

    file: str
    row: int
    prompt: str
    answer: str  # "" for an image-generation row
    kind: str  # closed / mcq / open / generation
    image_path: str
    options: list | None = None
    weight: float | None = None
    region: object = None  # Box, (H, W) mask tensor or None
    pixels: object = None  # (3, R, R) tensor
    codes: object = None  # (n,) numpy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medmax-make-preferences", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (finetune.export output: weights, tokenizer.json, vqgan/)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (evaluation schema or MedMax training rows)")
    p.add_argument("--output", required=True, help="preference rows (JSONL) for tokenization.build_preferences")
    p.add_argument("--image-root", default=MineConfig.image_root, help="folder the rows' image paths are relative to")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="question pairs to make")
    p.add_argument("--image-pairs", default=MineConfig.image_pairs, choices=IMAGE_PAIRS,
                   help="image-generation rows: the rejected image is noised in its lesion region, mirrored, or none")
    p.add_argument("--noise-level", type=float, default=MineConfig.noise_level, help="noise share inside the region, (0, 1]")
    p.add_argument("--box-side", type=float, default=MineConfig.box_side, help="random box side without a lesion box / mask")
    p.add_argument("--max-new-tokens", type=int, default=MineConfig.max_new_tokens, help="length of the model's answers")
    p.add_argument("--batch-size", type=int, default=MineConfig.batch_size)
    p.add_argument("--seed", type=int, default=MineConfig.seed)
    p.add_argument("--device", default=MineConfig.device)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> MineConfig:
    return MineConfig(model=args.model, inputs=args.input, output=args.output, image_root=args.image_root,
                      kinds=tuple(args.kinds), image_pairs=args.image_pairs, noise_level=args.noise_level,
                      box_side=args.box_side, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      seed=args.seed, overwrite=args.overwrite, device=args.device)


# ------------------------------------------------------------------------------ reading rows
def _read_item(file: str, number: int, row: dict) -> Item:
    from medmax.preference_mining import question_type
    from medmax.vocab import END_OF_TURN, IMAGE_PLACEHOLDER

    image = row.get("image_path")
    if isinstance(image, list):
        image = image[0] if len(image) == 1 else None
    if not isinstance(image, str):
        raise ValueError("needs one image_path (a string)")
    if "text" in row and "prompt" not in row:
        question, sep, answer = str(row["text"]).partition(END_OF_TURN)
        if not sep:
            raise ValueError(f"'text' holds no end-of-turn {END_OF_TURN}")
        question = question.replace(IMAGE_PLACEHOLDER, "")
        kind = "generation" if answer.strip() == IMAGE_PLACEHOLDER else question_type(question, answer)
    else:
        question, answer = row.get("prompt"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError("'prompt' and 'answer' must be strings")
        kind = row.get("question_type") or question_type(question, answer)
    return Item(file, number, question, answer if kind != "generation" else "", kind, image,
                row.get("options"), row.get("weight"))


def _load(item: Item, row: dict, root: Path, resolution: int) -> None:
    """The item's pixels and lesion region (box or mask), from under ``root``."""
    import numpy as np
    import torch

    from medmax.images import load_image, preprocess
    from medmax.paths import resolve_inside
    from medmax.preference_mining import Box

    item.pixels = preprocess(load_image(resolve_inside(root, item.image_path)), resolution)  # (3, R, R)
    if row.get("lesion_mask") is not None:
        mask = preprocess(load_image(resolve_inside(root, row["lesion_mask"])), resolution)  # (3, R, R)
        item.region = torch.as_tensor(np.asarray(mask.mean(0) > -1 + 1e-3))
    elif row.get("lesion_box") is not None:
        item.region = Box.parse(row["lesion_box"], "lesion_box")


def read_items(cfg: MineConfig, resolution: int, errors) -> list[Item]:
    """Every usable row of the inputs; a row that is not is written to ``errors`` with its reason."""
    items, root = [], Path(cfg.image_root)
    for file in cfg.inputs:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    item = _read_item(file, number, row)
                    _load(item, row, root, resolution)
                except (ValueError, OSError) as err:  # ImageLoadError, PathEscapeError, JSON errors are ValueErrors
                    errors.add(file, number, "unreadable_row", str(err))
                    continue
                items.append(item)
    logger.info("%d rows read from %d file(s)", len(items), len(cfg.inputs))
    return items


class ErrorList:
    """Rows left out: one JSON line each (file, row, kind, reason), counted per kind."""

    def __init__(self, path: Path):
        self.fh, self.counts = open(path, "w", encoding="utf-8"), Counter()

    def add(self, file: str, row: int, kind: str, reason: str) -> None:
        self.counts[kind] += 1
        self.fh.write(json.dumps({"file": file, "row": row, "kind": kind, "reason": reason}) + "\n")

    def close(self) -> None:
        self.fh.close()


# ------------------------------------------------------------------------------ the model's side
class Miner:
    """The model folder's generator and VQGAN, and what curation asks of them."""

    def __init__(self, cfg: MineConfig):
        import torch

        from medmax.generation import Generator

        self.cfg = cfg
        self.gen = Generator.from_dir(cfg.model, device=cfg.device)
        self.vqgan = self.gen.vqgan
        self.torch_rng = torch.Generator().manual_seed(cfg.seed)

    def encode(self, pixels: list) -> list:
        """VQGAN codes of (3, R, R) images, in batches."""
        import torch

        out = []
        param = next(self.vqgan.parameters())
        with torch.no_grad():
            for start in range(0, len(pixels), self.cfg.batch_size):
                batch = torch.stack(pixels[start : start + self.cfg.batch_size]).to(param.device, param.dtype)
                out += list(self.vqgan.encode_codes(batch).cpu().numpy())  # (B, n)
        return out

    def answers(self, items: list[Item], codes: list) -> list[str]:
        """The model's greedy answers to each item's question about the image given by ``codes``."""
        from medmax.generation import GenerationConfig
        from medmax.generation.prompts import ImageCodes
        from medmax.prompting import prompt_segments

        prompts = [prompt_segments(it.prompt, [ImageCodes(c)], end_of_turn=True) for it, c in zip(items, codes)]
        config = GenerationConfig(mode="text", do_sample=False, max_new_tokens=self.cfg.max_new_tokens,
                                  repetition_penalty=1.0, batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        return [o.text.strip() for o in self.gen.generate(prompts, config)]

    def perturbed(self, item: Item, how: str, rng):
        """``item``'s pixels with its lesion region (or a seeded random box) noised, or mirrored."""
        from medmax.preference_mining import Box, mirror, noise_region, random_box

        if how == "mirror":
            return mirror(item.pixels)
        region = item.region if item.region is not None else random_box(rng, self.cfg.box_side)
        mask = region.mask(*item.pixels.shape[1:]) if isinstance(region, Box) else region
        return noise_region(item.pixels, mask, self.cfg.noise_level, self.torch_rng)


# ------------------------------------------------------------------------------ pairs
def _row(item: Item, chosen, rejected, kind: str, weight: float | None, codes) -> dict:
    from medmax.vocab import IMAGE_PLACEHOLDER

    images = [] if item.kind == "generation" else [[int(c) for c in codes]]
    prompt = item.prompt if item.kind == "generation" else IMAGE_PLACEHOLDER + item.prompt
    row = {"prompt": prompt, "images": images, "chosen": chosen, "rejected": rejected, "kind": kind,
           "question_type": item.kind, "image_path": item.image_path, "source": f"{item.file}:{item.row}"}
    if weight is not None:
        row["weight"] = round(float(weight), 6)
    return row


def hallucination_pairs(items: list[Item], model_answers: list[str], rng, errors) -> list[dict]:
    from medmax.preference_mining import normalise, swap_answer

    pool: dict[str, list[str]] = {}
    for it in items:
        pool.setdefault(it.kind, []).append(it.answer)
    rows = []
    for it, said in zip(items, model_answers):
        wrong = said if said and normalise(said) != normalise(it.answer) else None
        source = "model" if wrong else "swap"
        wrong = wrong or swap_answer(it.kind, it.prompt, it.answer, rng, it.options, pool.get(it.kind, []))
        if wrong is None:
            errors.add(it.file, it.row, "no_wrong_answer", f"no wrong {it.kind} answer to swap in for {it.answer!r}")
            continue
        rows.append(_row(it, it.answer, wrong, f"hallucination_{source}", it.weight, it.codes))
    return rows


def noise_pairs(items: list[Item], noised_codes: list, noised_answers: list[str], errors) -> list[dict]:
    from medmax.preference_mining import changed_share, normalise

    rows = []
    for it, codes, said in zip(items, noised_codes, noised_answers):
        if not said or normalise(said) == normalise(it.answer):
            errors.add(it.file, it.row, "noise_same_answer", f"the model still answers {said!r} on the noised image")
            continue
        weight = it.weight if it.weight is not None else changed_share(it.codes, codes)
        rows.append(_row(it, it.answer, said, "noise", weight, it.codes))
    return rows


def image_pairs(items: list[Item], perturbed_codes: list, how: str) -> list[dict]:
    from medmax.preference_mining import changed_share

    rows = []
    for it, codes in zip(items, perturbed_codes):
        weight = it.weight if it.weight is not None else changed_share(it.codes, codes)
        rows.append(_row(it, {"image_tokens": [int(c) for c in it.codes]}, {"image_tokens": [int(c) for c in codes]},
                         f"image_{how}", weight, it.codes))
    return rows


def mine(cfg: MineConfig) -> dict:
    """Write the preference rows; returns the summary."""
    import numpy as np

    miner = Miner(cfg)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = ErrorList(out.with_name(out.name + ".errors.jsonl"))
    try:
        items = read_items(cfg, miner.vqgan.resolution, errors)
        for it, codes in zip(items, miner.encode([it.pixels for it in items])):
            it.codes = codes
        rows = _all_pairs(cfg, miner, items, rng, errors)
    finally:
        errors.close()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    summary = {"rows_read": len(items) + errors.counts["unreadable_row"], "pairs": len(rows),
               "by_kind": dict(Counter(r["kind"] for r in rows)), "left_out": dict(errors.counts),
               "settings": {k: v for k, v in asdict(cfg).items() if k != "overwrite"}}
    out.with_name(out.name + ".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _all_pairs(cfg: MineConfig, miner: Miner, items: list[Item], rng, errors) -> list[dict]:
    questions = [it for it in items if it.kind != "generation"]
    drawings = [it for it in items if it.kind == "generation"]
    rows = []
    if questions and "hallucination" in cfg.kinds:
        logger.info("hallucination pairs: the model answers %d questions", len(questions))
        rows += hallucination_pairs(questions, miner.answers(questions, [it.codes for it in questions]), rng, errors)
    if questions and "noise" in cfg.kinds:
        logger.info("noise pairs: %d questions on locally noised images", len(questions))
        noised = miner.encode([miner.perturbed(it, "noise", rng) for it in questions])
        rows += noise_pairs(questions, noised, miner.answers(questions, noised), errors)
    if drawings and cfg.image_pairs != "none":
        logger.info("image pairs: %d generation rows (%s)", len(drawings), cfg.image_pairs)
        perturbed = miner.encode([miner.perturbed(it, cfg.image_pairs, rng) for it in drawings])
        rows += image_pairs(drawings, perturbed, cfg.image_pairs)
    return rows


@program("medmax-make-preferences")
def main(argv=None) -> int:
    args = parse_args(argv)
    summary = mine(config_from_args(args))
    print(json.dumps({k: summary[k] for k in ("pairs", "by_kind", "left_out")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
