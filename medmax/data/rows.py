"""Rows of text and images -> the token-id sequences the model trains on.

Three input formats, detected from a row's fields (:func:`detect_format`):

- ``medmax``: ``text`` with ``<image>`` placeholders and the end-of-turn ``<reserved08706>`` between
  prompt and answer, images as ``image_tokens`` (raw codes: one list, or a list per image),
  ``image_path`` (one path or a list), or embedded like the other formats' (``images`` / ``image`` /
  ``modalities``). Ids follow MedMax's published algorithm (``src/tokenization.py``):
  ``[bos] + tokenizer.encode(text).ids + [eos]`` (the whole text encoded at once, post-processor
  included), each placeholder id replaced by ``[boi] + codes mapped through the vocabulary + [eoi]``.
  Labels: -100 up to and including the first end-of-turn, the ids after it.
  Unlike the published script, each placeholder gets its own image, and -- on purpose -- only
  ``<image>`` and ``<reserved08706>`` are structure: any other control string typed in the text
  (``</s>``, ``<s>``, ``<pad>``, ``<racm3:break>``, ``<eoss>``, other reserved tokens) stays text,
  where MedMax's script turns it into the control token. Rows without such strings (and without an
  escape, below) get MedMax's ids exactly.
- ``conversation``: ``conversations`` as ``[{role, content}]`` or ``[{from, value}]`` (LLaVA's
  human / gpt), images as ``modalities`` (``[{"type": "image", "value": path or bytes}]``),
  ``images`` or ``image``, matched in order to the placeholders across all turns. Every turn is its
  content followed by an end-of-turn; system and user turns carry no loss, assistant turns
  (closing end-of-turn included) do, and so does the final ``eos`` when the last turn is the assistant's.
- ``pretraining``: ``text`` (+ optional ``modalities`` / ``images``) without turns; every token after
  ``bos`` carries loss.

An image is a code list, a path (looked up in the image-token folders, or read under an image root),
image bytes, or a Hugging Face ``datasets`` image struct ``{"bytes": ..., "path": ...}`` (bytes first).

A **volume** (a CT / MRI study tokenized by ``image_tokenize --volume-column``) is a path given as a
``modalities`` item ``{"type": "image_3d", "value": path}`` (MultiMeditron's modality type, whose volume
loader reads ``value`` as a path under a base folder: ``src/multimeditron/dataset/loader/volume/volume_loader.py``
and ``model/modalities/volume/volume_config.py`` in EPFLiGHT/MultiMeditron), or in a ``volume`` column (one
path or a list; a row with images too must order them in ``modalities``). It fills one placeholder with
:data:`VOLUME_LAYOUT`: a short text header, then one image block per slice, inferior to superior::

    "CT, 16 axial slices, 5.0 mm apart, inferior to superior:" [boi] codes [eoi] [boi] codes [eoi] ...

Why a text header and not new reserved tokens: a released Chameleon / MedMax checkpoint has no trained
embedding for a token it never saw, while it reads text; the header names what no token could (modality,
slice count, spacing, direction), it tells a volume from several images (images never carry one) and
the order of the slices. Slices without positions (``.npy``) say ``N slices, in order:``; unevenly spaced
ones list their positions. The header takes the loss of the block it introduces.

Control tokens enter only through structure: ``bos``, ``eos``, end-of-turns, image blocks and, in
MedMax rows, the two markers above. Text is encoded with :func:`medmax.vocab.encode_texts`
(special-token parsing off), so typed control strings stay text. The one documented exception is the
image placeholder (``<image>``, plus any ``SequenceConfig.placeholders``) in every format, and the
end-of-turn in MedMax rows: a backslash before one (``\\<image>``) writes it as literal text.
``SequenceConfig.image_loss`` switches the loss on image blocks (``boi``, codes, ``eoi``) inside answers.

``SequenceConfig.image_layout``: ``fixed`` (Chameleon's: ``boi``, the codes, ``eoi``; every image has the same
square grid, and a non-square grid is refused as the row's ``non_square_grid``) or ``shaped``
(:mod:`medmax.image_layout`: the block carries its height, width and an end-of-line after each row, so images
of any grid train together).

A row that cannot be built raises :class:`RowError` with a short ``kind`` (counted per kind) and a
message naming the reason; nothing is silently repaired.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from itertools import chain
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from ..errors import UserError
from ..image_layout import IMAGE_LAYOUTS, ImageLayoutError, ShapedTokens, grid_of
from ..vocab import (
    END_OF_TURN,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ControlTokenInText,
    Vocabulary,
    control_mask,
    encode_texts,
    split_markers,
)

logger = logging.getLogger(__name__)

FORMATS = ("medmax", "conversation", "pretraining")
CONTEXT_ROLES = {"system": "system", "user": "user", "human": "user"}
ANSWER_ROLES = {"assistant": "assistant", "gpt": "assistant"}
IMAGE_COLUMNS = ("modalities", "images", "image")
VOLUME_COLUMN = "volume"
# Every column the builder reads; the others pass through to the shards (medmax.data.passthrough).
CONSUMED_COLUMNS = ("text", "image_path", "image_tokens", "conversations", *IMAGE_COLUMNS, VOLUME_COLUMN)
# How a volume becomes tokens; recorded in every sequence folder's manifest.
VOLUME_LAYOUT = {
    "kind": "text_header",
    "header": "{modality}, {n} axial slices, {step} mm apart, inferior to superior:",
    "header_without_positions": "{n} slices, in order:",
    "header_uneven": "{modality}, {n} axial slices at {positions} mm, inferior to superior:",
    "slice": "[boi] codes [eoi], one per slice, in the header's order",
    "orientation": "LPS: rows anterior to posterior, columns from the patient's right to left",
}
_MODALITY_WORDS = {"CT": "CT", "MR": "MRI", "PT": "PET"}
MEDMAX_MARKERS = (IMAGE_PLACEHOLDER, END_OF_TURN)
# The training length of finetune's configs. MedMax's own training (training/data.py) cuts every row at 2048.
DEFAULT_MAX_LENGTH = 4096


class BuildConfigError(UserError):
    """A build setting that cannot be used (``SequenceConfig``, ``BuildConfig``, the inputs and columns); names the flag."""


class RowError(UserError):
    """A row that cannot become a sequence. ``kind`` is the counted category, the message the detail."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class LengthDrop(RowError):
    """A row dropped by ``max_length`` (counted apart from rejected rows); ``length`` is its token count."""

    def __init__(self, kind: str, reason: str, length: int):
        super().__init__(kind, reason)
        self.length = length


@dataclass(frozen=True)
class VolumeRef:
    """A volume named in a row (``image_3d`` modality or ``volume`` column), resolved to its tokenized slices."""

    path: str


def volume_header(volume) -> str:
    """The text before a volume's slices (:data:`VOLUME_LAYOUT`); ``volume`` is a :class:`medmax.image_tokens.VolumeCodes`."""
    n, positions = len(volume.slice_indices), volume.positions_mm
    modality = _MODALITY_WORDS.get(volume.geometry.get("modality") or "", "Scan")
    if not positions:
        return VOLUME_LAYOUT["header_without_positions"].format(n=n)
    steps = np.diff(positions)
    if len(steps) and steps.max() - steps.min() > 0.1 * abs(float(np.median(steps))):
        shown = ", ".join(f"{p:.1f}" for p in positions)
        return VOLUME_LAYOUT["header_uneven"].format(modality=modality, n=n, positions=shown)
    step = float(np.median(steps)) if len(steps) else 0.0
    return VOLUME_LAYOUT["header"].format(modality=modality, n=n, step=f"{step:.1f}")


@dataclass
class SequenceConfig:
    """How rows become sequences."""

    # Strings that mark an image in conversation / pretraining text, matched to images in order.
    placeholders: tuple[str, ...] = (IMAGE_PLACEHOLDER,)
    # Loss on image blocks (boi, codes, eoi) inside answers; off for understanding-only training.
    image_loss: bool = True
    # Longest sequence kept; longer ones are truncated at the end of answer text or dropped. None: no limit.
    max_length: int | None = DEFAULT_MAX_LENGTH
    # Codes every image must have (the VQGAN grid); None: the first image seen fixes it.
    codes_per_image: int | None = None
    # VQGAN codebook size when known; codes must also lie below the vocabulary's n_codes.
    codebook_size: int | None = None
    # "fixed" (boi, codes, eoi; one square grid) or "shaped" (size tokens and end-of-lines: any grid; medmax.image_layout)
    image_layout: str = "fixed"

    def __post_init__(self):
        if not self.placeholders or any(not p for p in self.placeholders):
            raise BuildConfigError("placeholders: give at least one non-empty placeholder string")
        if self.max_length is not None and self.max_length < 3:
            raise BuildConfigError(f"--max-length must be at least 3, got {self.max_length}")
        if self.codes_per_image is not None and self.codes_per_image < 1:
            raise BuildConfigError(f"--codes-per-image must be positive, got {self.codes_per_image}")
        if self.image_layout not in IMAGE_LAYOUTS:
            raise BuildConfigError(f"--image-layout {self.image_layout!r}: choose one of {', '.join(IMAGE_LAYOUTS)}")
        if self.image_layout == "shaped" and self.codes_per_image is not None:
            raise BuildConfigError("--codes-per-image fixes one grid; the shaped layout takes every grid (leave it out)")


@dataclass
class Built:
    """One sequence. All arrays are (T,)."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss
    answer: np.ndarray | int = field(repr=False)  # bool mask of the answer region (images included), or its start
    format: str = "medmax"
    n_images: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def answer_mask(self) -> np.ndarray:
        if isinstance(self.answer, np.ndarray):
            return self.answer
        return np.arange(len(self.input_ids)) >= self.answer


# ---------------------------------------------------------------------------------------------
# Format detection and field parsing


def detect_format(row: dict) -> str:
    """``medmax``, ``conversation`` or ``pretraining`` from the fields a row has; RowError otherwise."""
    has = {k for k, v in row.items() if v is not None}
    if "conversations" in has:
        return "conversation"
    if "text" in has:
        if has & {"image_path", "image_tokens"} or _has_turn_marker(row["text"]):
            return "medmax"
        return "pretraining"
    raise RowError(
        "unknown_format",
        f"row fits no input format (columns {sorted(has)}): expected 'conversations', "
        "'text' + 'image_path'/'image_tokens' (MedMax), or 'text' [+ 'modalities'] (pretraining)",
    )


def _has_turn_marker(text) -> bool:
    """Whether text holds an end-of-turn that is not escaped (which makes a ``text`` row a MedMax row)."""
    if not isinstance(text, str) or END_OF_TURN not in text:
        return False
    return any(marker for _, marker in split_markers(text, (END_OF_TURN,)))


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):
        return list(value)
    return [value]


def _text_field(row: dict, name: str) -> str:
    text = row.get(name)
    if not isinstance(text, str):
        raise RowError("untokenizable", f"'{name}' must be a string, got {type(text).__name__}")
    return text


def _medmax_images(row: dict) -> list:
    """Image references of a MedMax row: code lists when ``image_tokens`` is there, else paths, else embedded."""
    tokens = row.get("image_tokens")
    if tokens is not None:
        tokens = _as_list(tokens)
        if tokens and isinstance(tokens[0], (list, tuple, np.ndarray)):
            return [np.asarray(t) for t in tokens]  # one list per image
        return [np.asarray(tokens)] if tokens else []
    if row.get("image_path") is not None:
        return _as_list(row["image_path"])
    return _row_images(row)  # embedded images, modalities (image_3d too) or a volume column


def _image_source(ref, index: int):
    """A Hugging Face image struct ``{"bytes", "path"}`` -> its bytes, else its path; anything else as it is."""
    if not isinstance(ref, dict) or not {"bytes", "path"} & ref.keys():
        return ref
    if ref.get("bytes") is not None:
        return ref["bytes"]
    if ref.get("path") is not None:
        return ref["path"]
    raise RowError("missing_image", f"image {index} is an image struct with neither bytes nor a path")


def _row_images(row: dict) -> list:
    """Image references of a conversation / pretraining row (paths, bytes, code lists or VolumeRef)."""
    volumes = [VolumeRef(_volume_path(v, VOLUME_COLUMN)) for v in _as_list(row.get(VOLUME_COLUMN))]
    if volumes and any(row.get(c) is not None for c in IMAGE_COLUMNS):
        raise RowError("bad_field", "the row has a 'volume' column and images: give both in order in 'modalities' "
                                    "(type image / image_3d)")
    if volumes:
        return volumes
    if row.get("modalities") is not None:
        return [_modality(i, item) for i, item in enumerate(_as_list(row["modalities"]))]
    images = row.get("images")
    return _as_list(images if images is not None else row.get("image"))


def _modality(i: int, item) -> object:
    """One ``modalities`` item: an image's value, or a VolumeRef for MultiMeditron's ``image_3d``."""
    if isinstance(item, dict) and item.get("type") == "image_3d":
        return VolumeRef(_volume_path(item.get("value"), f"modalities[{i}]"))
    if not isinstance(item, dict) or item.get("type") != "image" or item.get("value") is None:
        raise RowError("bad_field", f"modalities[{i}] must be {{'type': 'image' or 'image_3d', 'value': ...}}, got {item!r:.80}")
    return item["value"]


def _volume_path(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RowError("bad_field", f"{where}: a volume is given by its path (as tokenized by image_tokenize --volume-column), "
                                    f"got {type(value).__name__}")
    return value


def _turns(row: dict) -> list[tuple[str, str]]:
    """``(role, content)`` of each turn, roles normalised to system / user / assistant."""
    conversations = row["conversations"]
    if isinstance(conversations, str):
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError as err:
            raise RowError("bad_field", f"'conversations' is a string but not JSON: {err}") from None
    turns = []
    for i, turn in enumerate(_as_list(conversations)):
        if not isinstance(turn, dict):
            raise RowError("bad_field", f"conversations[{i}] must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role_key = str(role).lower()
        if role_key not in CONTEXT_ROLES and role_key not in ANSWER_ROLES:
            raise RowError("unknown_role", f"conversations[{i}] has unknown role {role!r} (expected system, user/human, assistant/gpt)")
        if not isinstance(content, str):
            raise RowError("untokenizable", f"conversations[{i}] content must be a string, got {type(content).__name__}")
        turns.append((CONTEXT_ROLES.get(role_key) or ANSWER_ROLES[role_key], content))
    if not turns:
        raise RowError("bad_field", "'conversations' is empty")
    if not any(role == "assistant" for role, _ in turns):
        raise RowError("bad_field", "conversation has no assistant turn: nothing to train on")
    return turns


# ---------------------------------------------------------------------------------------------
# Plans: what a row needs encoded, so that a batch of rows is encoded in one tokenizer call


@dataclass
class _Piece:
    """A run of tokens in a plan: text to encode, fixed ids, or image number ``image``."""

    trained: bool
    text: str | None = None
    ids: tuple[int, ...] = ()
    image: int | None = None


@dataclass
class RowPlan:
    """What one row becomes, before any text is encoded (texts of a batch are encoded together)."""

    format: str
    images: list  # image references (codes, paths or bytes), one per placeholder, in order
    whole_text: str | None = None  # medmax: encoded at once, as MedMax does (see _encode_medmax)
    pieces: list[_Piece] = field(default_factory=list)  # conversation / pretraining


class SequenceBuilder:
    """Builds sequences for one tokenizer and configuration; see the module docstring for the rules.

    ``resolve_image(ref) -> codes`` turns a path or bytes into raw codes (raising RowError when it
    cannot); code lists given in the row are used as they are.
    """

    def __init__(self, tokenizer: Tokenizer, config: SequenceConfig | None = None, resolve_image: Callable | None = None,
                 vocab: Vocabulary | None = None):
        self.tokenizer = tokenizer
        self.vocab = vocab or Vocabulary.from_tokenizer(tokenizer)
        self._code_ids = self.vocab.code_to_id.astype(np.int32)  # (n_codes,) token id of each code
        self._is_code = np.zeros(self.vocab.size, dtype=bool)  # (vocab,) which ids are image codes
        self._is_code[self._code_ids] = True
        self.config = config or SequenceConfig()
        self.shaped = ShapedTokens.from_tokenizer(tokenizer) if self.config.image_layout == "shaped" else None
        self._in_image = self._is_code.copy()  # (vocab,) ids inside an image block, boi excepted (codes; shaped: sizes, end-of-line)
        if self.shaped is not None:
            self._in_image[self.shaped.ids] = True
        self.resolve_image = resolve_image
        self.codes_per_image = self.config.codes_per_image
        limit = self.vocab.n_codes if self.config.codebook_size is None else min(self.vocab.n_codes, self.config.codebook_size)
        self.code_limit = limit
        self._typed = control_mask(tokenizer).copy()  # (vocab,) control ids that typed text must not give
        self._typed[[i for i in (self.vocab.image_placeholder_id, self.vocab.eot_id) if i is not None]] = False
        self._wrap = _post_processor_ids(tokenizer)  # what tokenizer.encode(text) adds around the text

    # -- public API ---------------------------------------------------------------------------

    def build(self, row: dict) -> Built:
        """One row -> one sequence (raises RowError / LengthDrop when it cannot be built)."""
        built = self.build_batch([row])[0]
        if isinstance(built, RowError):
            raise built
        return built

    def build_batch(self, rows: Sequence[dict]) -> list[Built | RowError]:
        """Rows -> sequences or the RowError of each row, encoding all texts in two tokenizer calls."""
        plans: list[RowPlan | RowError] = []
        for row in rows:
            try:
                plans.append(self.plan(row))
            except RowError as err:
                plans.append(err)
        whole, pieces = self._encode_all(plans)
        out: list[Built | RowError] = []
        for plan in plans:
            if isinstance(plan, RowError):
                out.append(plan)
                continue
            try:
                built = self._assemble(plan, whole, pieces)
                out.append(self.fit_length(built))
            except RowError as err:
                out.append(err)
        return out

    def plan(self, row: dict) -> RowPlan:
        """What a row needs: its format, image references and the texts to encode."""
        fmt = detect_format(row)
        if fmt == "medmax":
            return RowPlan("medmax", _medmax_images(row), whole_text=_text_field(row, "text"))
        if fmt == "conversation":
            return self._plan_conversation(row)
        return self._plan_pretraining(row)

    # -- planning -----------------------------------------------------------------------------

    def _text_pieces(self, text: str, trained: bool, first_image: int, markers: tuple[str, ...] = ()) -> list[_Piece]:
        """Split text on placeholders: text pieces and image pieces numbered from ``first_image``.

        ``markers`` are extra strings whose escapes are honoured (they cannot occur unescaped here).
        """
        pieces, n = [], first_image
        for part, marker in split_markers(text, (*self.config.placeholders, *markers)):
            if marker is not None:
                pieces.append(_Piece(trained, image=n))
                n += 1
            else:
                pieces.append(_Piece(trained, text=part))
        return pieces

    def _count_images(self, pieces: list[_Piece]) -> int:
        return sum(p.image is not None for p in pieces)

    def _plan_conversation(self, row: dict) -> RowPlan:
        v = self.vocab
        pieces = [_Piece(False, ids=(v.bos_id,))]
        turns = _turns(row)
        for role, content in turns:
            trained = role == "assistant"
            pieces += self._text_pieces(content, trained, self._count_images(pieces))
            pieces.append(_Piece(trained, ids=(v.eot_id,)))
        pieces.append(_Piece(turns[-1][0] == "assistant", ids=(v.eos_id,)))
        return RowPlan("conversation", _row_images(row), pieces=pieces)

    def _plan_pretraining(self, row: dict) -> RowPlan:
        v = self.vocab
        pieces = [_Piece(False, ids=(v.bos_id,))]
        # An unescaped end-of-turn would have made this a MedMax row; \<reserved08706> is its literal text.
        pieces += self._text_pieces(_text_field(row, "text"), True, 0, (END_OF_TURN,))
        pieces.append(_Piece(True, ids=(v.eos_id,)))
        return RowPlan("pretraining", _row_images(row), pieces=pieces)

    # -- encoding -----------------------------------------------------------------------------

    def _encode_all(self, plans) -> tuple[dict, dict]:
        """Encode every text of a batch: {id(plan): ids} for MedMax texts, {id(piece): ids} for pieces."""
        whole = [p for p in plans if isinstance(p, RowPlan) and p.whole_text is not None]
        parts = [x for p in plans if isinstance(p, RowPlan) for x in p.pieces if x.text is not None]
        whole_ids = self._encode_medmax([p.whole_text for p in whole])
        part_ids = self._encode_safe([x.text for x in parts])
        return {id(p): e for p, e in zip(whole, whole_ids)}, {id(x): e for x, e in zip(parts, part_ids)}

    def _encode_safe(self, texts: list[str]) -> list:
        """Typed text -> ids (control strings stay text); a text that fails is its row's RowError."""
        if not texts:
            return []
        try:
            return encode_texts(self.tokenizer, texts)
        except Exception:  # one bad text fails the whole batch call: find it one text at a time
            return [self._encode_one(t) for t in texts]

    def _encode_one(self, text: str, safe: bool = True):
        try:
            return encode_texts(self.tokenizer, [text])[0] if safe else self.tokenizer.encode(text).ids
        except ControlTokenInText as err:
            return RowError("control_token_in_text", str(err))
        except Exception as err:  # noqa: BLE001 - reported per row by _assemble
            return RowError("untokenizable", f"the tokenizer cannot encode the text: {err}")

    def _encode_medmax(self, texts: list[str]) -> list:
        """MedMax texts -> ids as MedMax's script makes them, unless typed control strings or escapes need the safe path."""
        if not texts:
            return []
        try:
            encoded = [e.ids for e in self.tokenizer.encode_batch(texts)]
        except Exception:  # noqa: BLE001 - one bad text: one at a time
            encoded = [self._encode_one(t, safe=False) for t in texts]
        typed = self._typed_rows(encoded)
        escaped = ["\\" in t and any("\\" + m in t for m in MEDMAX_MARKERS) for t in texts]
        return [self._medmax_safe(t) if typed_row or escape else ids for t, ids, typed_row, escape in zip(texts, encoded, typed, escaped)]

    def _typed_rows(self, encoded: list) -> np.ndarray:
        """(rows,) bool: which encodings hold a control id that came from typed text (one vectorised pass)."""
        before, after = self._wrap
        inner = [ids[len(before) : len(ids) - len(after)] if not isinstance(ids, RowError) else [] for ids in encoded]
        lengths = np.fromiter(map(len, inner), dtype=np.int64, count=len(inner))
        flat = np.fromiter(chain.from_iterable(inner), dtype=np.int64, count=int(lengths.sum()))
        hits = np.concatenate([[0], np.cumsum(self._typed[flat])])
        ends = np.cumsum(lengths)
        return hits[ends] - hits[ends - lengths] > 0

    def _medmax_safe(self, text: str):
        """The ids MedMax's encoding would give if only ``<image>`` / end-of-turn were control strings."""
        v = self.vocab
        pieces = split_markers(text, MEDMAX_MARKERS)
        if v.image_placeholder_id is None and any(m == IMAGE_PLACEHOLDER for _, m in pieces):
            return RowError("untokenizable", "the tokenizer has no <image> token: MedMax rows need MedMax's modified tokenizer")
        encoded = self._encode_safe([t for t, _ in pieces if t is not None])
        bad = next((e for e in encoded if isinstance(e, RowError)), None)
        if bad is not None:
            return bad
        texts, marker_ids = iter(encoded), {IMAGE_PLACEHOLDER: v.image_placeholder_id, END_OF_TURN: v.eot_id}
        ids = list(self._wrap[0])
        for part, marker in pieces:
            ids += next(texts) if part is not None else [marker_ids[marker]]
        return ids + list(self._wrap[1])

    # -- assembly -----------------------------------------------------------------------------

    def _image_block(self, ref, index: int) -> np.ndarray:
        """``[boi] + code ids + [eoi]`` of one image reference (codes checked for count and range); the shaped
        layout's block (:class:`medmax.image_layout.ShapedTokens`) when the build uses it; a volume's header and
        slice blocks (:data:`VOLUME_LAYOUT`)."""
        if isinstance(ref, VolumeRef):
            return self._volume_block(ref, index)
        codes, grid = self._codes(ref, index)
        if self.shaped is not None:
            try:
                return self.shaped.block(self.vocab, self._code_ids[codes].reshape(grid))
            except ImageLayoutError as exc:
                raise RowError("bad_codes", f"image {index}: {exc}") from None
        if grid[0] != grid[1]:
            raise RowError("non_square_grid", f"image {index} is a {grid[0]}x{grid[1]} grid of codes; the fixed layout holds "
                                              "square grids only (build with --image-layout shaped)")
        block = np.empty(len(codes) + 2, dtype=np.int32)
        block[0], block[-1] = self.vocab.boi_id, self.vocab.eoi_id
        block[1:-1] = self._code_ids[codes]
        return block

    def _volume_block(self, ref: VolumeRef, index: int) -> np.ndarray:
        if self.resolve_image is None:
            raise RowError("missing_image", f"image {index} is a volume and no image codes source was given (--image-tokens)")
        volume = self.resolve_image(ref)
        header = self._encode_safe([volume_header(volume)])[0]
        if isinstance(header, RowError):
            raise header
        codes = np.asarray(volume.codes)  # (K, h*w)
        if codes.size and (codes.min() < 0 or codes.max() >= self.code_limit):
            raise RowError("bad_codes", f"volume {ref.path!r}: codes must lie in 0..{self.code_limit - 1}")
        header = np.asarray(header, dtype=np.int32)
        if self.shaped is not None:  # a shaped build: every slice a shaped block, as every image is
            return np.concatenate([header, *(self.shaped.block(self.vocab, self._code_ids[c].reshape(volume.grid)) for c in codes)])
        blocks = np.empty((len(codes), codes.shape[1] + 2), dtype=np.int32)  # (K, 1 + h*w + 1)
        blocks[:, 0], blocks[:, -1] = self.vocab.boi_id, self.vocab.eoi_id
        blocks[:, 1:-1] = self._code_ids[codes]
        return np.concatenate([header, blocks.reshape(-1)])

    def _codes(self, ref, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """-> (flat codes, their (h, w) grid: recorded; for a flat list, a square of its count in the shaped layout,
        and (1, 1) in the fixed one, whose count check stands for the grid)."""
        ref = _image_source(ref, index)
        if isinstance(ref, (str, bytes, bytearray)):
            if self.resolve_image is None:
                what = "a path" if isinstance(ref, str) else "image bytes"
                raise RowError("missing_image", f"image {index} is {what} and no image codes source was given (--image-tokens / --ckpt)")
            ref = self.resolve_image(ref)
        codes = np.asarray(ref)
        if codes.ndim not in (1, 2) or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
            raise RowError("bad_codes", f"image {index}: codes must be a list (or grid) of integers, got dtype {codes.dtype} shape {codes.shape}")
        if self.shaped is None:
            self._check_count(codes.size, index)
        if codes.size and (codes.min() < 0 or codes.max() >= self.code_limit):
            raise RowError("bad_codes", f"image {index}: codes must lie in 0..{self.code_limit - 1}, got {codes.min()}..{codes.max()}")
        if codes.ndim == 2 or self.shaped is None:  # a flat list in the fixed layout is one grid of its count
            return codes.reshape(-1), codes.shape if codes.ndim == 2 else (1, 1)
        try:
            return codes, grid_of(codes)
        except ImageLayoutError as exc:
            raise RowError("bad_codes", f"image {index}: {exc}") from None

    def _check_count(self, n: int, index: int) -> None:
        if self.codes_per_image is None:
            if n == 0:
                raise RowError("wrong_code_count", f"image {index} has no codes")
            self.codes_per_image = n
            logger.info("codes per image fixed at %d by the first image seen", n)
        elif n != self.codes_per_image:
            raise RowError("wrong_code_count", f"image {index} has {n} codes, expected {self.codes_per_image} (the VQGAN grid)")

    def _check_images(self, n_placeholders: int, images: list) -> None:
        if n_placeholders != len(images):
            raise RowError("placeholder_mismatch", f"{n_placeholders} image placeholders but {len(images)} images")

    def _assemble(self, plan: RowPlan, whole: dict, pieces: dict) -> Built:
        if plan.format == "medmax":
            return self._assemble_medmax(plan, whole[id(plan)])
        return self._assemble_pieces(plan, pieces)

    def _assemble_medmax(self, plan: RowPlan, text_ids) -> Built:
        v = self.vocab
        if isinstance(text_ids, RowError):
            raise text_ids
        if v.image_placeholder_id is None:
            raise RowError("untokenizable", "the tokenizer has no <image> token: MedMax rows need MedMax's modified tokenizer")
        text = np.asarray(text_ids, dtype=np.int32)
        slots = np.flatnonzero(text == v.image_placeholder_id)
        self._check_images(len(slots), plan.images)
        parts, start = [np.array([v.bos_id], dtype=np.int32)], 0
        for n, slot in enumerate(slots):
            parts += [text[start:slot], self._image_block(plan.images[n], n)]
            start = slot + 1
        parts += [text[start:], np.array([v.eos_id], dtype=np.int32)]
        ids = np.concatenate(parts)  # (T,)
        eot = np.flatnonzero(ids == v.eot_id)
        if not len(eot):
            raise RowError("no_end_of_turn", "MedMax row has no end-of-turn <reserved08706> between prompt and answer")
        labels = ids.copy()
        labels[: eot[0] + 1] = IGNORE_INDEX
        if not self.config.image_loss and len(slots):
            labels[self._image_positions(ids)] = IGNORE_INDEX
        return Built(ids, labels, int(eot[0]) + 1, format="medmax", n_images=len(plan.images))

    def _image_positions(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask of image blocks: boi, codes and eoi."""
        v = self.vocab
        return (ids == v.boi_id) | (ids == v.eoi_id) | self._in_image[ids]

    def _assemble_pieces(self, plan: RowPlan, encoded: dict) -> Built:
        self._check_images(self._count_images(plan.pieces), plan.images)
        parts = []
        for piece in plan.pieces:
            if piece.image is not None:
                parts.append(self._image_part(plan.images[piece.image], piece.image, piece.trained))
                continue
            ids = encoded[id(piece)] if piece.text is not None else piece.ids
            if isinstance(ids, RowError):
                raise ids
            ids = np.asarray(ids, dtype=np.int32)
            parts.append(self._text_part(ids, piece.trained))
        return self._join(parts, plan)

    def _text_part(self, ids: np.ndarray, trained: bool):
        labels = ids if trained else np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        return ids, labels, np.full(len(ids), trained)

    def _image_part(self, ref, index: int, trained: bool):
        block = self._image_block(ref, index)
        with_loss = trained and self.config.image_loss
        labels = block if with_loss else np.full(len(block), IGNORE_INDEX, dtype=np.int32)
        return block, labels, np.full(len(block), trained)

    def _join(self, parts, plan: RowPlan) -> Built:
        ids, labels, answer = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return Built(ids, labels, answer, format=plan.format, n_images=len(plan.images))

    # -- length -------------------------------------------------------------------------------

    def fit_length(self, built: Built) -> Built:
        """Truncate to ``max_length`` at the end of answer text, or raise LengthDrop."""
        n = self.config.max_length
        if n is None or len(built) <= n:
            return built
        last = n - 1  # the last token kept
        ids = built.input_ids
        if ids[last] == self.vocab.boi_id or self._in_image[ids[last]]:
            raise LengthDrop("too_long", f"{len(built)} tokens > max_length {n}: the cut would go through an image", len(built))
        answer = built.answer_mask()
        if not answer[last]:
            raise LengthDrop("too_long", f"{len(built)} tokens > max_length {n}: the cut would fall before the answer", len(built))
        n_images = int((ids[:n] == self.vocab.boi_id).sum())
        return Built(ids[:n], built.labels[:n], answer[:n], format=built.format, n_images=n_images, truncated=True)


def _post_processor_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer.encode(text)`` puts before and after the text's own (none without a post-processor)."""
    if tokenizer.post_processor is None:
        return [], []
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("cannot tell which ids the tokenizer's post-processor adds around a text")
