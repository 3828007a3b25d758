"""Curate DPO preference rows from a VQA set with a model, the MMedPO way (hallucinated answers, noised lesions).

Usage::

    python -m finetune.make_preferences --model runs/sft_model --input data/eval/eval.jsonl \\
        --image-root data/eval --output runs/prefs/rows.jsonl
    # then: python -m tokenization.build_preferences --input runs/prefs/rows.jsonl --tokenizer runs/sft_model \\
    #           --output runs/prefs/folder
    # training rows (MedMax's "<image>question<reserved08706>answer" + image_path), image continuations mirrored:
    python -m finetune.make_preferences --model runs/sft_model --input data/train.jsonl --image-root data \\
        --output runs/prefs/train_rows.jsonl --image-pairs mirror

Input rows, JSONL or parquet: MedMax's evaluation schema (``prompt``, ``answer``, ``question_type`` closed /
mcq / open, ``image_path``, optional ``options``: ``{"A": text, ...}`` or its JSON string, read as eval reads
them through ``medmax.answers``; an MCQ gold given as option text has its letter), or its training rows
(``text`` = question, end-of-turn, answer; ``image_path``); a training row whose answer is ``<image>`` (an
image-generation row) gives an image-continuation pair. Optional per row: ``lesion_box`` ([x0, y0, x1, y1],
fractions of the image), ``lesion_mask`` (an image path under ``--image-root``; nonzero pixels are the lesion)
and ``weight``. Image paths are read under ``--image-root`` and may not leave it. (A sequence folder holds
token ids only; noising needs pixels, so curate from the rows the folder was built from.)

Kinds of pair (``--kinds``; each row can give one of each, see ``medmax.preference_mining``):

- ``hallucination``: chosen the gold answer, rejected the model's greedy answer when it is wrong, else a
  swapped one of the same type (yes <-> no, another option in the gold's form, another open answer of the type);
- ``noise``: the lesion region (the row's mask or box, else a seeded random box of ``--box-side``) is
  noised in pixels and re-tokenized through the model's VQGAN; the model's greedy answer on the noised
  image, when it differs from the gold one, is rejected against the gold answer on the original image.
  The weight is the row's, else the share of the image's codes the noising changed (MMedPO's MedKLIP
  relevance score has no counterpart for an arbitrary model; this is its stand-in, see the module);
- image continuations: the row's image chosen, the image with its lesion region noised (``noise``) or
  mirrored (``mirror``) rejected, weight as above.

Rows are streamed: ``--batch-size`` rows are read, tokenized, answered, noised and written at a time, so
memory holds one batch of images, whatever the number of rows. Each random choice (a swapped answer, a
random box, the noise) is seeded by ``--seed`` and the row's place in its file, not by the batch.

Writes OUTPUT (preference rows with every image as codes, so ``build_preferences`` needs only the
tokenizer; ``image_path`` and ``kind`` kept) once complete, OUTPUT's ``.errors.jsonl`` (rows left out
and why: a line that is not a JSON object or not UTF-8, a field of the wrong type, a weight training
cannot use, an unreadable image or one that is not a regular file, a question longer than the model's
context, no wrong answer to swap in, the model right on the noised image...) and ``.summary.json``
(counts per kind and reason, the settings). An existing OUTPUT is refused unless ``--overwrite``, and an
OUTPUT (or one of its side files) that is an input is refused always (``medmax.paths.check_apart``, the
rule of every program). Each phase (reading, answering, noising) is logged as it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from medmax.cli import program
from medmax.errors import UserError

logger = logging.getLogger("finetune.make_preferences")

KINDS = ("hallucination", "noise")
IMAGE_PAIRS = ("noise", "mirror", "none")


class ConfigError(UserError):
    """A curation setting that cannot work; the message names the flag."""


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
    batch_size: int = 16  # rows read, answered and written at a time (memory holds one batch of images)
    seed: int = 0
    overwrite: bool = False
    device: str = "cpu"

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        checks = [(bool(bad), f"--kinds {bad[0] if bad else ''}: choose among {KINDS}"),
                  (self.image_pairs not in IMAGE_PAIRS, f"--image-pairs {self.image_pairs}: choose one of {IMAGE_PAIRS}"),
                  (not 0 < self.noise_level <= 1, f"--noise-level {self.noise_level}: must lie in (0, 1]"),
                  (not 0 < self.box_side <= 1, f"--box-side {self.box_side}: must lie in (0, 1]"),
                  (self.batch_size < 1, f"--batch-size {self.batch_size}: must be at least 1"),
                  (self.max_new_tokens < 1, f"--max-new-tokens {self.max_new_tokens}: must be at least 1")]
        for failed, message in checks:
            if failed:
                raise ConfigError(message)
        from medmax.data.inputs import find_inputs
        from medmax.paths import check_apart

        self.inputs = [str(path) for path in find_inputs(self.inputs)]  # files, folders, globs: build_sequences' rules
        check_apart(self.output, side_files(Path(self.output)), self.inputs)
        if Path(self.output).exists() and not self.overwrite:
            raise ConfigError(f"--output {self.output} exists; pass --overwrite to replace it")


def side_files(out: Path) -> list[Path]:
    """Every path a run writes: OUTPUT, its temporary file, its errors and its summary."""
    return [out] + [out.with_name(out.name + suffix) for suffix in (".tmp", ".errors.jsonl", ".summary.json")]


@dataclass
class Item:
    """One input row, read: where it came from, its question or generation prompt, and its image."""

    file: str
    row: int
    prompt: str  # a question holds its image's placeholder (medmax.prompting's layout); a generation prompt none
    answer: str  # "" for an image-generation row
    kind: str  # closed / mcq / open (or another question type) / generation
    image_path: str
    options: dict | None = None  # {letter: text}, as eval reads them
    weight: float | None = None
    seed: tuple = ()  # (--seed, file index, row): every random choice for this row starts here
    region: object = None  # Box, (H, W) mask tensor or None
    pixels: object = None  # (3, R, R) tensor, while its batch is worked on
    codes: object = None  # (n,) numpy

    def rng(self, purpose: int):
        """A numpy generator for one purpose (0 swap, 1 box, 2 noise) of this row, independent of batching."""
        import numpy as np

        return np.random.default_rng([*self.seed, purpose])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medmax-make-preferences", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (finetune.export output: weights, tokenizer.json, vqgan/)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL or parquet files (evaluation schema or MedMax training rows)")
    p.add_argument("--output", required=True, help="preference rows (JSONL) for tokenization.build_preferences")
    p.add_argument("--image-root", default=MineConfig.image_root, help="folder the rows' image paths are relative to")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="question pairs to make")
    p.add_argument("--image-pairs", default=MineConfig.image_pairs, choices=IMAGE_PAIRS,
                   help="image-generation rows: the rejected image is noised in its lesion region, mirrored, or none")
    p.add_argument("--noise-level", type=float, default=MineConfig.noise_level, help="noise share inside the region, (0, 1]")
    p.add_argument("--box-side", type=float, default=MineConfig.box_side, help="random box side without a lesion box / mask")
    p.add_argument("--max-new-tokens", type=int, default=MineConfig.max_new_tokens, help="length of the model's answers")
    p.add_argument("--batch-size", type=int, default=MineConfig.batch_size, help="rows worked on at a time")
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
def _question(row: dict) -> tuple[str, str, str]:
    """(question or generation prompt, answer, kind) of an eval-schema or training row; RowError when unusable."""
    from medmax.data.rows import RowError
    from medmax.preference_mining import question_type
    from medmax.prompting import strip_placeholders
    from medmax.vocab import END_OF_TURN, IMAGE_PLACEHOLDER, split_turn

    if "text" in row and "prompt" not in row:
        if not isinstance(row["text"], str):
            raise RowError("bad_field", f"'text' must be a string, got {type(row['text']).__name__}")
        turn = split_turn(row["text"], END_OF_TURN)
        if turn is None:
            raise RowError("bad_field", f"'text' holds no end-of-turn {END_OF_TURN}")
        question, answer = turn
        if answer.strip() == IMAGE_PLACEHOLDER:
            return strip_placeholders(question), "", "generation"
        return question, answer, question_type(strip_placeholders(question), answer)
    question, answer, kind = row.get("prompt"), row.get("answer"), row.get("question_type")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise RowError("bad_field", "'prompt' and 'answer' must be strings")
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise RowError("bad_field", f"'question_type' must be a string such as closed, mcq or open, got {kind!r:.40}")
    return question, answer, kind or question_type(question, answer)


def _read_item(file: str, number: int, row: dict, seed: tuple) -> Item:
    """The row's fields, checked (its image is loaded by :func:`_load`); RowError names what is wrong."""
    from medmax.answers import resolve_gold
    from medmax.data.preferences import check_weight
    from medmax.data.rows import RowError
    from medmax.preference_mining import mcq_options
    from medmax.prompting import place_images

    image = row.get("image_path")
    if isinstance(image, list):
        image = image[0] if len(image) == 1 else None
    if not isinstance(image, str):
        raise RowError("bad_field", "needs one image_path (a string)")
    question, answer, kind = _question(row)
    if kind != "generation" and not answer.strip():
        raise RowError("bad_field", "'answer' is empty: an empty answer cannot be the preferred one")
    try:
        options = mcq_options(question, row.get("options"))
        if kind == "mcq":
            resolve_gold(answer, options)
        prompt = question if kind == "generation" else place_images(question, 1)
    except ValueError as err:  # malformed options, a gold naming no option, two placeholders for one image
        raise RowError("bad_field", str(err)) from None
    weight = None if row.get("weight") is None else check_weight(row["weight"])
    return Item(file, number, prompt, answer, kind, image, options, weight, seed)


def _load(item: Item, row: dict, root: Path, resolution: int) -> None:
    """The item's pixels and lesion region (box or mask), from under ``root``."""
    import numpy as np
    import torch

    from medmax import images
    from medmax.data.rows import RowError
    from medmax.paths import resolve_inside
    from medmax.preference_mining import Box

    item.pixels = images.preprocess(images.load_image(resolve_inside(root, item.image_path)), resolution)  # (3, R, R)
    if row.get("lesion_mask") is not None and not isinstance(row["lesion_mask"], str):
        raise RowError("bad_field", f"'lesion_mask' must be an image path (a string), got {row['lesion_mask']!r:.40}")
    if row.get("lesion_mask") is not None:
        mask = images.preprocess(images.load_image(resolve_inside(root, row["lesion_mask"])), resolution)  # (3, R, R)
        item.region = torch.as_tensor(np.asarray(mask.mean(0) > -1 + 1e-3))
    elif row.get("lesion_box") is not None:
        item.region = Box.parse(row["lesion_box"], "lesion_box")


def _rows(cfg: MineConfig, errors, seen: Counter) -> Iterator[list[tuple[str, int, tuple, dict]]]:
    """Batches of ``(file, row number, seed, row)``; a line that is no JSON object (or not UTF-8) goes to ``errors``.
    ``seen["rows"]`` counts every row read."""
    from medmax.data.inputs import iter_row_batches
    from medmax.data.rows import RowError

    for index, file in enumerate(cfg.inputs):
        for batch in iter_row_batches(Path(file), cfg.batch_size):
            seen["rows"] += len(batch)
            rows = []
            for number, row in batch:
                if isinstance(row, RowError):
                    errors.add(file, number, row.kind, row.reason)
                else:
                    rows.append((file, number, (cfg.seed, index, number), row))
            yield rows


def read_batches(cfg: MineConfig, resolution: int, errors, seen: Counter) -> Iterator[list[Item]]:
    """The usable rows of the inputs, a batch at a time with their pixels; every other row goes to ``errors``."""
    root = Path(cfg.image_root)
    for batch in _rows(cfg, errors, seen):
        items = []
        for file, number, seed, row in batch:
            try:
                item = _read_item(file, number, row, seed)
                _load(item, row, root, resolution)
            except (ValueError, OSError) as err:  # RowError, ImageLoadError, PathEscapeError, a bad box
                errors.add(file, number, getattr(err, "kind", "unreadable_row"), str(err))
                continue
            items.append(item)
        yield items


def answer_pool(cfg: MineConfig) -> dict[str, list[str]]:
    """Every answer per question type (text only, one pass): the open answers a hallucination pair swaps in."""
    pool: dict[str, set[str]] = {}
    for batch in _rows(cfg, ErrorList(None), Counter()):
        for file, number, seed, row in batch:
            try:
                item = _read_item(file, number, row, seed)
            except ValueError:
                continue  # reported when the row is read for its pairs
            pool.setdefault(item.kind, set()).add(item.answer)
    return {kind: sorted(answers) for kind, answers in pool.items()}


class ErrorList:
    """Rows left out: one JSON line each (file, row, kind, reason), counted per kind (``path`` None: only counted)."""

    def __init__(self, path: Path | None):
        self.fh, self.counts = (open(path, "w", encoding="utf-8") if path else None), Counter()

    def add(self, file: str, row: int, kind: str, reason: str) -> None:
        self.counts[kind] += 1
        if self.fh:
            self.fh.write(json.dumps({"file": file, "row": row, "kind": kind, "reason": reason}) + "\n")

    def close(self) -> None:
        if self.fh:
            self.fh.close()


# ------------------------------------------------------------------------------ the model's side
class Miner:
    """The model folder's generator and VQGAN, and what curation asks of them."""

    def __init__(self, cfg: MineConfig):
        from medmax.generation import Generator

        self.cfg = cfg
        self.gen = Generator.from_dir(cfg.model, device=cfg.device)
        self.vqgan = self.gen.vqgan

    def encode(self, pixels: list) -> list:
        """VQGAN codes of (3, R, R) images (one batch of rows)."""
        import torch

        if not pixels:
            return []
        param = next(self.vqgan.parameters())
        with torch.no_grad():
            return list(self.vqgan.encode_codes(torch.stack(pixels).to(param.device, param.dtype)).cpu().numpy())  # (B, n)

    def fitting(self, items: list[Item], errors) -> list[Item]:
        """The items whose question and image fit the model's context; the others go to ``errors`` by row."""
        from medmax.generation.prompts import ImageCodes
        from medmax.prompting import prompt_segments

        kept = []
        for it in items:
            try:
                self.gen.prompts.check([prompt_segments(it.prompt, [ImageCodes(it.codes)], end_of_turn=True)], "text")
            except UserError as err:  # "prompt 0: N tokens, ... context of C": the row is named in errors instead
                errors.add(it.file, it.row, "too_long", f"the question with its image: {str(err).split(': ', 1)[-1]}")
                continue
            kept.append(it)
        return kept

    def answers(self, items: list[Item], codes: list) -> list[str]:
        """The model's greedy answers to each item's question about the image given by ``codes``."""
        from medmax.generation import GenerationConfig
        from medmax.generation.prompts import ImageCodes
        from medmax.prompting import prompt_segments

        prompts = [prompt_segments(it.prompt, [ImageCodes(c)], end_of_turn=True) for it, c in zip(items, codes)]
        config = GenerationConfig(mode="text", do_sample=False, max_new_tokens=self.cfg.max_new_tokens,
                                  repetition_penalty=1.0, batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        return [o.text.strip() for o in self.gen.generate(prompts, config)] if prompts else []

    def perturbed(self, item: Item, how: str):
        """``item``'s pixels with its lesion region (or a seeded random box) noised, or mirrored."""
        import torch

        from medmax.preference_mining import Box, mirror, noise_region, random_box

        if how == "mirror":
            return mirror(item.pixels)
        region = item.region if item.region is not None else random_box(item.rng(1), self.cfg.box_side)
        mask = region.mask(*item.pixels.shape[1:]) if isinstance(region, Box) else region
        noise = torch.Generator().manual_seed(int(item.rng(2).integers(2**62)))
        return noise_region(item.pixels, mask, self.cfg.noise_level, noise)


# ------------------------------------------------------------------------------ pairs
def _row(item: Item, chosen, rejected, kind: str, weight: float | None, codes) -> dict:
    images = [] if item.kind == "generation" else [[int(c) for c in codes]]
    row = {"prompt": item.prompt, "images": images, "chosen": chosen, "rejected": rejected, "kind": kind,
           "question_type": item.kind, "image_path": item.image_path, "source": f"{item.file}:{item.row}"}
    if weight is not None:
        row["weight"] = round(float(weight), 6)
    return row


def hallucination_pairs(items: list[Item], model_answers: list[str], pool: dict, errors) -> list[dict]:
    from medmax.preference_mining import same_answer, swap_answer

    rows = []
    for it, said in zip(items, model_answers):
        wrong = said if said and not same_answer(it.kind, said, it.answer, it.options) else None
        source = "model" if wrong else "swap"
        wrong = wrong or swap_answer(it.kind, it.prompt, it.answer, it.rng(0), it.options, pool.get(it.kind, []))
        if wrong is None:
            errors.add(it.file, it.row, "no_wrong_answer", f"no wrong {it.kind} answer to swap in for {it.answer!r}")
            continue
        rows.append(_row(it, it.answer, wrong, f"hallucination_{source}", it.weight, it.codes))
    return rows


def noise_pairs(items: list[Item], noised_codes: list, noised_answers: list[str], errors) -> list[dict]:
    from medmax.preference_mining import changed_share, same_answer

    rows = []
    for it, codes, said in zip(items, noised_codes, noised_answers):
        if not said or same_answer(it.kind, said, it.answer, it.options):
            errors.add(it.file, it.row, "noise_same_answer", f"the model still answers {said!r} on the noised image")
            continue
        weight = it.weight if it.weight is not None else changed_share(it.codes, codes)
        rows.append(_row(it, it.answer, said, "noise", weight, it.codes))
    return rows


def image_pairs(items: list[Item], perturbed_codes: list, how: str, errors) -> list[dict]:
    from medmax.preference_mining import changed_share

    rows = []
    for it, codes in zip(items, perturbed_codes):
        if changed_share(it.codes, codes) == 0:
            errors.add(it.file, it.row, "image_unchanged", f"the {how} image has the same codes: the pair would teach nothing")
            continue
        weight = it.weight if it.weight is not None else changed_share(it.codes, codes)
        rows.append(_row(it, {"image_tokens": [int(c) for c in it.codes]}, {"image_tokens": [int(c) for c in codes]},
                         f"image_{how}", weight, it.codes))
    return rows


def mine(cfg: MineConfig) -> dict:
    """Write the preference rows, one batch of input rows at a time; returns the summary."""
    miner = Miner(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    pool = answer_pool(cfg) if "hallucination" in cfg.kinds else {}
    tmp, errors_path, summary_path = side_files(out)[1:]
    errors, made, seen = ErrorList(errors_path), Counter(), Counter()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            # map: a batch's items (and their pixels) are released before the next batch is read
            for rows in map(lambda items: _batch_pairs(cfg, miner, items, pool, errors),
                            read_batches(cfg, miner.vqgan.resolution, errors, seen)):
                f.write("".join(json.dumps(row) + "\n" for row in rows))
                made.update(row["kind"] for row in rows)
    finally:
        errors.close()
    tmp.replace(out)
    summary = {"rows_read": seen["rows"], "pairs": sum(made.values()), "by_kind": dict(made), "left_out": dict(errors.counts),
               "settings": {k: v for k, v in asdict(cfg).items() if k != "overwrite"}}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _batch_pairs(cfg: MineConfig, miner: Miner, items: list[Item], pool: dict, errors) -> list[dict]:
    """Every pair of one batch of items (their pixels loaded); the items are not kept."""
    for it, codes in zip(items, miner.encode([it.pixels for it in items])):
        it.codes = codes
    questions = miner.fitting([it for it in items if it.kind != "generation"], errors)
    drawings = [it for it in items if it.kind == "generation"]
    rows = []
    if questions and "hallucination" in cfg.kinds:
        logger.info("hallucination pairs: the model answers %d questions", len(questions))
        rows += hallucination_pairs(questions, miner.answers(questions, [it.codes for it in questions]), pool, errors)
    if questions and "noise" in cfg.kinds:
        logger.info("noise pairs: %d questions on locally noised images", len(questions))
        noised = miner.encode([miner.perturbed(it, "noise") for it in questions])
        rows += noise_pairs(questions, noised, miner.answers(questions, noised), errors)
    if drawings and cfg.image_pairs != "none":
        logger.info("image pairs: %d generation rows (%s)", len(drawings), cfg.image_pairs)
        perturbed = miner.encode([miner.perturbed(it, cfg.image_pairs) for it in drawings])
        rows += image_pairs(drawings, perturbed, cfg.image_pairs, errors)
    return rows


@program("medmax-make-preferences")
def main(argv=None) -> int:
    args = parse_args(argv)
    summary = mine(config_from_args(args))
    print(json.dumps({k: summary[k] for k in ("pairs", "by_kind", "left_out")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
