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
:class:`medmax.data.rows.SequenceBuilder` (same vocabulary, same image blocks, same bad-input rules), then cut
after the end-of-turn: ``prompt_ids`` = ``[bos] ... <reserved08706>``, ``chosen_ids`` / ``rejected_ids`` = the
continuation and ``eos`` (an image continuation is ``[boi] codes [eoi] [eos]``). Neither text may hold an
end-of-turn (the builder places the one that closes the prompt), and a text continuation may hold no image
placeholder. A pair that teaches nothing is the row's error, counted by kind: an empty ``chosen`` text
(``empty_chosen``), or two continuations of the same tokens (``same_continuations``: no gradient, and a lower
reward accuracy). ``weight`` is a number from 0 to float32's largest (training computes in float32, where
``1e39`` is infinite). A pair longer than ``max_length`` (prompt plus the longer side) is dropped, never
truncated: a cut continuation is not the answer that was preferred.

The folder is a sequence folder (``medmax.data.shards``: manifest, ``errors.jsonl``, progress, the same
build and resume rules) whose manifest says ``"layout": "preferences"`` and whose shards hold
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (list<int32>), ``weight`` (float64), ``length`` and
``format`` (``text`` or ``image``: the chosen continuation's kind), then the passthrough columns. It is
read for training by :mod:`medmax.data.preference_loader`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from ..image_tokens import list_array
from ..prompting import place_images
from ..vocab import END_OF_TURN, IMAGE_PLACEHOLDER, split_markers
from .rows import LengthDrop, RowError, SequenceBuilder, SequenceConfig
from .shards import ShardLayout

logger = logging.getLogger(__name__)

LAYOUT = "preferences"
CONSUMED_COLUMNS = ("prompt", "images", "chosen", "rejected", "weight")
CONTINUATION_KEYS = ("text", "image", "image_tokens")
WEIGHT_MAX = float(np.finfo(np.float32).max)  # training multiplies the loss by the weight in float32


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


def check_weight(weight) -> float:
    """A pair's weight as training uses it: a number >= 0 that stays finite as float32 (DPO's dtype), else RowError."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= WEIGHT_MAX:
        raise RowError("bad_field", f"'weight' must be a number from 0 to {WEIGHT_MAX:.4g} (finite as float32), got {weight!r}")
    return float(weight)


def _weight(row: dict) -> float:
    weight = row.get("weight")
    return 1.0 if weight is None else check_weight(weight)


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
        if item[1][1] is None and not item[1][0].strip():
            return RowError("empty_chosen", "'chosen' is empty: an empty answer cannot be the preferred one")
        cut_c, cut_r = chosen.answer_mask().argmax(), rejected.answer_mask().argmax()
        prompt = chosen.input_ids[:cut_c]
        if cut_c != cut_r or not np.array_equal(prompt, rejected.input_ids[:cut_r]):
            return RowError("prompt_mismatch", "the prompt tokenizes differently before the two continuations")
        if np.array_equal(chosen.input_ids[cut_c:], rejected.input_ids[cut_r:]):
            return RowError("same_continuations", "'chosen' and 'rejected' are the same tokens: the pair gives no gradient")
        pair = PreferencePair(prompt, chosen.input_ids[cut_c:], rejected.input_ids[cut_r:], item[0],
                              "text" if item[1][1] is None else "image")
        limit = self.config.max_length
        if limit is not None and len(pair) > limit:
            return LengthDrop("too_long", f"{len(pair)} tokens (prompt and the longer continuation) > max_length {limit}: "
                                          "pairs are dropped, never cut", len(pair))
        return pair
