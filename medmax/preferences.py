"""Preference pairs: rows -> prompt / chosen / rejected token ids, their folder, and DPO batches.

A preference row (JSONL or parquet)::

    {"prompt": "<image>Is there a lesion?", "images": ["images/a.png"],      # paths, bytes or code lists
     "chosen": "yes", "rejected": "no", "weight": 0.8}                       # weight optional (default 1)
    {"prompt": "Generate a scan: ...", "chosen": {"image": "images/a.png"},  # an image continuation
     "rejected": {"image_tokens": [5, 17, ...]}}

A continuation is a string (text), or an object with exactly one of ``text``, ``image`` (a path, bytes or
a Hugging Face image struct) or ``image_tokens`` (raw codes). The prompt's images follow
:mod:`medmax.prompting`'s one layout (before the text unless placed with ``<image>``).

Each side is built as the MedMax row ``prompt <reserved08706> continuation`` by
:class:`medmax.data.rows.SequenceBuilder` (same vocabulary, same image blocks, same bad-input rules),
then cut after the end-of-turn: ``prompt_ids`` = ``[bos] ... <reserved08706>``, ``chosen_ids`` /
``rejected_ids`` = the continuation and ``eos`` (an image continuation is ``[boi] codes [eoi] [eos]``).
Neither text may hold an end-of-turn (the builder places the one that closes the prompt), and a text
continuation may hold no image placeholder. A pair longer than ``max_length`` (prompt plus the longer
side) is dropped, never truncated: a cut continuation is not the answer that was preferred.

The folder is a sequence folder (``medmax.data.shards``: manifest, ``errors.jsonl``, progress, the same
build and resume rules) whose manifest says ``"layout": "preferences"`` and whose shards hold
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (list<int32>), ``weight`` (float64), ``length`` and
``format`` (``text`` or ``image``: the chosen continuation's kind), then the passthrough columns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .data.shards import MANIFEST, ShardLayout
from .image_tokens import list_array
from .prompting import place_images
from .data.rows import LengthDrop, RowError, SequenceBuilder, SequenceConfig
from .data.loader import DataError, read_manifest
from .vocab import END_OF_TURN, IGNORE_INDEX, IMAGE_PLACEHOLDER, split_markers

logger = logging.getLogger(__name__)

LAYOUT = "preferences"
CONSUMED_COLUMNS = ("prompt", "images", "chosen", "rejected", "weight")
CONTINUATION_KEYS = ("text", "image", "image_tokens")


@dataclass
class PreferencePair:
    """One built pair; arrays are int32 token ids."""

    prompt: np.ndarray  # (P,) bos ... end-of-turn
    chosen: np.ndarray  # (C,) continuation + eos
    rejected: np.ndarray  # (R,)
    weight: float = 1.0
    format: str = "text"  # the chosen continuation's kind: text or image
    truncated: bool = False  # never: pairs are dropped, not cut (kept for the build's counters)

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def labels(self) -> np.ndarray:
        """The scored tokens (both continuations), for the build's token counts."""
        return np.concatenate([self.chosen, self.rejected])


def _pair_arrays(chunk: list[PreferencePair]) -> list[pa.Array]:
    return [
        list_array([p.prompt for p in chunk]),
        list_array([p.chosen for p in chunk]),
        list_array([p.rejected for p in chunk]),
        pa.array([p.weight for p in chunk], type=pa.float64()),
        pa.array([len(p) for p in chunk], type=pa.int32()),
        pa.array([p.format for p in chunk], type=pa.string()),
    ]


PREFERENCES = ShardLayout(LAYOUT, (
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("chosen_ids", pa.list_(pa.int32())),
    pa.field("rejected_ids", pa.list_(pa.int32())),
    pa.field("weight", pa.float64()),
    pa.field("length", pa.int32()),
    pa.field("format", pa.string()),
), _pair_arrays)


# ---------------------------------------------------------------------------------------------
# Rows -> pairs


def _continuation(row: dict, side: str) -> tuple[str, object | None]:
    """(text after the end-of-turn, image reference or None) of ``chosen`` / ``rejected``."""
    value = row.get(side)
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict) or len([k for k in CONTINUATION_KEYS if value.get(k) is not None]) != 1:
        raise RowError("bad_field", f"'{side}' must be a string or an object with one of {CONTINUATION_KEYS}, got {value!r:.80}")
    if value.get("text") is not None:
        text = value["text"]
        if not isinstance(text, str):
            raise RowError("untokenizable", f"'{side}' text must be a string, got {type(text).__name__}")
        if any(m == IMAGE_PLACEHOLDER for _, m in split_markers(text, (IMAGE_PLACEHOLDER,))):
            raise RowError("bad_field", f"'{side}' text holds {IMAGE_PLACEHOLDER}; give an image continuation as {{\"image\": ...}}")
        _no_end_of_turn(text, side)
        return text, None
    if value.get("image_tokens") is not None:
        return IMAGE_PLACEHOLDER, np.asarray(value["image_tokens"])
    return IMAGE_PLACEHOLDER, value["image"]


def _no_end_of_turn(text: str, field: str) -> None:
    if any(m == END_OF_TURN for _, m in split_markers(text, (END_OF_TURN,))):
        raise RowError("bad_field", f"'{field}' holds the end-of-turn {END_OF_TURN}; the builder places it after the prompt")


def _prompt(row: dict) -> tuple[str, list]:
    text = row.get("prompt")
    if not isinstance(text, str):
        raise RowError("untokenizable" if text is not None else "bad_field",
                       f"'prompt' must be a string, got {type(text).__name__}")
    _no_end_of_turn(text, "prompt")
    images = row.get("images")
    images = [] if images is None else (list(images) if isinstance(images, (list, tuple, np.ndarray)) else [images])
    images = [np.asarray(i) if isinstance(i, (list, tuple)) else i for i in images]
    try:
        return place_images(text, len(images)), images
    except ValueError as err:
        raise RowError("placeholder_mismatch", str(err)) from None


def _weight(row: dict) -> float:
    weight = row.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RowError("bad_field", f"'weight' must be a finite number >= 0, got {weight!r}")
    return float(weight)


class PreferenceBuilder:
    """Rows -> :class:`PreferencePair` or the row's :class:`RowError` (module docstring), in batches."""

    def __init__(self, tokenizer, config: SequenceConfig | None = None, resolve_image=None, vocab=None):
        self.config = config or SequenceConfig()
        inner = replace(self.config, max_length=None)  # pairs are dropped whole, below
        self.sequences = SequenceBuilder(tokenizer, inner, resolve_image, vocab)
        self.vocab = self.sequences.vocab

    @property
    def codes_per_image(self) -> int | None:
        return self.sequences.codes_per_image

    def build_batch(self, rows: list[dict]) -> list[PreferencePair | RowError]:
        sides, parsed = [], []
        for row in rows:
            try:
                prompt, images = _prompt(row)
                item = (_weight(row), _continuation(row, "chosen"), _continuation(row, "rejected"))
            except RowError as err:
                parsed.append(err)
                continue
            parsed.append(item)
            for text, ref in item[1:]:
                sides.append({"text": prompt + END_OF_TURN + text, "images": images + ([ref] if ref is not None else [])})
        built = iter(self.sequences.build_batch(sides))
        return [item if isinstance(item, RowError) else self._pair(item, next(built), next(built)) for item in parsed]

    def _pair(self, item, chosen, rejected) -> PreferencePair | RowError:
        for side in (chosen, rejected):
            if isinstance(side, RowError):
                return side
        cut_c, cut_r = chosen.answer_mask().argmax(), rejected.answer_mask().argmax()
        prompt = chosen.input_ids[:cut_c]
        if cut_c != cut_r or not np.array_equal(prompt, rejected.input_ids[:cut_r]):
            return RowError("prompt_mismatch", "the prompt tokenizes differently before the two continuations")
        pair = PreferencePair(prompt, chosen.input_ids[cut_c:], rejected.input_ids[cut_r:], item[0],
                              "text" if item[1][1] is None else "image")
        limit = self.config.max_length
        if limit is not None and len(pair) > limit:
            return LengthDrop("too_long", f"{len(pair)} tokens (prompt and the longer continuation) > max_length {limit}: "
                                          "pairs are dropped, never cut", len(pair))
        return pair


# ---------------------------------------------------------------------------------------------
# The folder -> training


@dataclass
class PreferenceData:
    """Every pair of one folder as flat arrays; pair i's prompt is ``prompt[offsets['prompt'][i]:...[i + 1]]``."""

    folder: Path
    ids: dict[str, np.ndarray]  # prompt / chosen / rejected -> (N_tokens,) int32
    offsets: dict[str, np.ndarray]  # -> (N + 1,) int64
    weights: np.ndarray  # (N,) float64
    formats: np.ndarray  # (N,) str
    manifest: dict

    def __len__(self) -> int:
        return len(self.weights)

    def part(self, name: str, i: int) -> np.ndarray:
        off = self.offsets[name]
        return self.ids[name][off[i] : off[i + 1]]

    def pair(self, i: int) -> dict:
        return {"prompt_ids": self.part("prompt", i), "chosen_ids": self.part("chosen", i),
                "rejected_ids": self.part("rejected", i), "weight": float(self.weights[i])}

    def lengths(self) -> np.ndarray:  # (N,) prompt + longer continuation
        p, c, r = (np.diff(self.offsets[k]) for k in ("prompt", "chosen", "rejected"))
        return p + np.maximum(c, r)

    def subset(self, index: np.ndarray) -> "PreferenceData":
        parts = {k: [self.part(k, int(i)) for i in index] for k in self.ids}
        ids = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in parts.items()}
        offsets = {k: np.concatenate([[0], np.cumsum([len(a) for a in v])]).astype(np.int64) for k, v in parts.items()}
        return PreferenceData(self.folder, ids, offsets, self.weights[index], self.formats[index], self.manifest)


def load_preferences(folder: str | Path) -> PreferenceData:
    """Read a preference folder (``tokenization.build_preferences``); a sequence folder is refused by name."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("layout") != LAYOUT:
        raise DataError(f"{folder}/{MANIFEST}: a sequence folder, not a preference folder (layout "
                        f"{manifest.get('layout', 'sequences')!r}); build one with tokenization.build_preferences")
    names = ("prompt", "chosen", "rejected")
    ids, offsets, weights, formats = {k: [] for k in names}, {k: [] for k in names}, [], []
    for shard in (folder / f for f in manifest["files"]):
        table = pq.read_table(shard, columns=[f"{k}_ids" for k in names] + ["weight", "format"])
        for k in names:
            column = table.column(f"{k}_ids").combine_chunks()
            off = column.offsets.to_numpy().astype(np.int64)
            ids[k].append(column.values.to_numpy().astype(np.int32, copy=False)[off[0] : off[-1]])
            offsets[k].append(np.diff(off))
        weights.append(table.column("weight").to_numpy())
        formats.append(np.asarray(table.column("format").to_pylist(), dtype=object))
    if not weights:
        raise DataError(f"{folder}/{MANIFEST}: lists no shard files")
    flat = {k: np.concatenate(v) for k, v in ids.items()}
    offs = {k: np.concatenate([[0], np.cumsum(np.concatenate(v))]).astype(np.int64) for k, v in offsets.items()}
    data = PreferenceData(folder, flat, offs, np.concatenate(weights), np.concatenate(formats), manifest)
    logger.info("%s: %d preference pairs", folder, len(data))
    return data


def check_preferences(data: PreferenceData, vocab_size: int, max_length: int, special_ids: dict | None = None) -> None:
    """Stop before training on pairs the model cannot use; messages name the folder and the reason."""
    where = data.folder
    theirs = data.manifest.get("special_ids") or {}
    differ = sorted(k for k, v in (special_ids or {}).items() if theirs.get(k) != v)
    if differ:
        raise DataError(f"{where}/{MANIFEST}: special ids {differ} differ from the model's tokenizer")
    if len(data) == 0:
        raise DataError(f"{where}: holds no preference pairs")
    long = np.flatnonzero(data.lengths() > max_length)
    if len(long):
        raise DataError(f"{where}: {len(long)} pairs are longer than max_length={max_length} (pair {long[0]}); "
                        "raise max_length or rebuild with a shorter limit")
    for k, ids in data.ids.items():
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(f"{where}: {k} ids outside the model's vocabulary 0..{vocab_size - 1}")
    empty = np.flatnonzero((np.diff(data.offsets["chosen"]) == 0) | (np.diff(data.offsets["rejected"]) == 0))
    if len(empty):
        raise DataError(f"{where}: pair {empty[0]} has an empty continuation")


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs of several folders, in one seeded order; each folder's weight repeats or thins it like SequenceDataset."""

    def __init__(self, datasets: list[PreferenceData], weights: list[float] | None, seed: int):
        from .data.plans import weighted_order

        self.datasets = datasets
        self.order = weighted_order([len(d) for d in datasets], weights or [1.0] * len(datasets), seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        d, i = self.order[index]
        return self.datasets[d].pair(i)


@dataclass
class PreferenceCollator:
    """A batch of B pairs -> 2B rows (chosen ones first), right-padded: TRL's DataCollatorForPreference layout.

    ``labels`` are the continuation ids and -100 on prompt and padding; ``weight`` (B,) the pairs' weights.
    """

    pad_id: int

    def __call__(self, pairs: list[dict]) -> dict:
        rows = [(p["prompt_ids"], p[f"{side}_ids"]) for side in ("chosen", "rejected") for p in pairs]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, (prompt, cont) in enumerate(rows):
            seq = torch.from_numpy(np.concatenate([prompt, cont]).astype(np.int64))
            ids[n, : len(seq)], mask[n, : len(seq)] = seq, 1
            labels[n, len(prompt) : len(seq)] = seq[len(prompt) :]
        weight = torch.tensor([float(p.get("weight", 1.0)) for p in pairs], dtype=torch.float32)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weight": weight, "n_real_tokens": mask.sum()}
