"""The shared text + image vocabulary, derived from a tokenizer's own vocabulary.

Chameleon-family tokenizers name each VQGAN code with an ``IMGIMG`` token whose letters
spell the code (A..J for digits 0..9, one trailing letter ignored): ``IMGIMGBCDZ`` is code 123.
Every id the rest of the project uses comes from here, never from a hard-coded table.

User text is encoded with :func:`encode_text`: every string a user can type (``</s>``, ``<racm3:break>``,
``<reserved08706>``, ...) is read as text, never as a control token. Control tokens enter a sequence only
through its structure (segments, roles, images), which the caller adds as ids. Where a format marks
structure inside text (the ``<image>`` placeholder), :func:`split_markers` finds the markers, and a
backslash before a marker (``\\<image>``) writes the marker's text literally.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import UserError

logger = logging.getLogger(__name__)

IMAGE_TOKEN_PREFIX = "IMGIMG"
BOS, PAD, EOS = "<s>", "<pad>", "</s>"
BOI, EOI = "<racm3:break>", "<eoss>"
END_OF_TURN = "<reserved08706>"
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch cross-entropy's default)

# Names a tokenizer file may have inside a checkpoint folder, most specific first.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "text_tokenizer_modified.json",
    "text_tokenizer.json",
    "tokenizer/text_tokenizer_modified.json",
    "tokenizer/text_tokenizer.json",
)


def _is_tensor(x) -> bool:
    """A torch tensor? Answered without importing torch (no tensor exists before torch is imported),
    so that programs can import this module for --help without paying for torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def image_token_code(name: str) -> int | None:
    """The VQGAN code an ``IMGIMG`` token name spells, or None for any other token."""
    if not name.startswith(IMAGE_TOKEN_PREFIX) or len(name) < len(IMAGE_TOKEN_PREFIX) + 2:
        return None
    letters = name[len(IMAGE_TOKEN_PREFIX) : -1]
    if not all("A" <= c <= "J" for c in letters):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in letters))


def image_token_name(code: int) -> str:
    """The ``IMGIMG`` token name of a VQGAN code (inverse of :func:`image_token_code`)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer JSON file that ``path`` names: the file itself, or the one a checkpoint folder holds."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in _TOKENIZER_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no tokenizer file found (looked for {', '.join(_TOKENIZER_FILES)})")
    raise FileNotFoundError(f"{path}: tokenizer file or folder does not exist")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizers`` tokenizer from a JSON file or a checkpoint folder that holds one.

    A file that is not a tokenizer (invalid UTF-8 or JSON, another schema) raises :class:`TokenizerFileError`
    naming it.
    """
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for every reason
        raise TokenizerFileError(f"{file}: not a readable tokenizer JSON file ({exc})") from None


class TokenizerFileError(UserError):
    """A tokenizer file that ``tokenizers`` cannot read (its message names the file and the reason)."""


# ---------------------------------------------------------------------------------------------
# User text: never a control token


class ControlTokenInText(UserError):
    """The tokenizer turned typed text into a control token even with special-token parsing off."""


_SPECIALS_AS_TEXT = threading.Lock()
_CONTROL: dict[int, tuple[Tokenizer, np.ndarray]] = {}  # id(tokenizer) -> (tokenizer, bool mask over ids)


def control_mask(tokenizer: Tokenizer) -> np.ndarray:
    """(vocab,) bool: ids that must never come from typed text (special added tokens and image codes)."""
    cached = _CONTROL.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    mask = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=bool)
    for idx, token in tokenizer.get_added_tokens_decoder().items():
        mask[idx] |= token.special
    for name, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        if name in (BOS, PAD, EOS, BOI, EOI, END_OF_TURN, IMAGE_PLACEHOLDER):
            mask[idx] = True
        elif name.startswith(IMAGE_TOKEN_PREFIX):
            mask[idx] |= image_token_code(name) is not None
    _CONTROL[id(tokenizer)] = (tokenizer, mask)  # holding the tokenizer keeps its id from being reused
    return mask


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of user texts with special-token parsing off (``encode_special_tokens``), no bos / eos added.

    Raises :class:`ControlTokenInText` if a control id still comes out (a tokenizer whose control
    token is a non-special added token, or whose merges spell an image code): never silently kept.
    """
    with _SPECIALS_AS_TEXT:  # the switch lives on the tokenizer object: set it for this call only
        before = tokenizer.encode_special_tokens
        tokenizer.encode_special_tokens = True
        try:
            encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        finally:
            tokenizer.encode_special_tokens = before
    out = [e.ids for e in encodings]
    mask = control_mask(tokenizer)
    for text, ids in zip(texts, out):
        if ids and mask[ids].any():
            bad = [tokenizer.id_to_token(i) for i in ids if mask[i]]
            raise ControlTokenInText(f"text {text[:60]!r} still encodes to control tokens {bad[:3]} with special-token parsing off")
    return out


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of one user text, typed control strings read as text (see :func:`encode_texts`)."""
    return encode_texts(tokenizer, [text])[0]


def split_markers(text: str, markers: tuple[str, ...]) -> list[tuple[str | None, str | None]]:
    """Split text at structure markers: ``(text, None)`` pieces and ``(None, marker)`` pieces, in order.

    Backslashes right before a marker escape it: an odd run writes the marker as literal text, and each
    pair is one literal backslash (``\\<image>`` is the text ``<image>``; ``\\\\<image>`` is a backslash,
    then the marker). Backslashes anywhere else are text.
    """
    out: list[tuple[str | None, str | None]] = []
    pending, at = "", 0
    for match in _marker_pattern(markers).finditer(text):
        run, marker = match.group(1), match.group(2)
        pending += text[at : match.start()] + "\\" * (len(run) // 2)
        at = match.end()
        if len(run) % 2:
            pending += marker
            continue
        if pending:
            out.append((pending, None))
        out.append((None, marker))
        pending = ""
    pending += text[at:]
    if pending:
        out.append((pending, None))
    return out


def split_turn(text: str, marker: str) -> tuple[str, str] | None:
    """``text`` cut at its first unescaped ``marker`` (the end-of-turn of a MedMax row, as :func:`split_markers`
    reads it): (before, after), each as written (escapes kept); None when there is none."""
    for match in _marker_pattern((marker,)).finditer(text):
        if len(match.group(1)) % 2 == 0:
            return text[: match.start(2)], text[match.end(2) :]
    return None


def escape_markers(text: str, markers: tuple[str, ...]) -> str:
    """Literal ``text`` written so that :func:`split_markers` reads it back as one text piece (markers escaped)."""
    return _marker_pattern(markers).sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + m.group(2), text)


_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    """``(backslashes)(marker)``, longest marker first."""
    if markers not in _PATTERNS:
        _PATTERNS[markers] = re.compile(r"(\\*)(" + "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)) + ")")
    return _PATTERNS[markers]


@dataclass(frozen=True)
class Vocabulary:
    """Special ids and the image-code <-> token-id mapping of one tokenizer."""

    bos_id: int
    pad_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    eot_id: int
    image_placeholder_id: int | None
    size: int
    code_to_id: np.ndarray = field(repr=False)  # (n_codes,) int64, token id of each VQGAN code

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "Vocabulary":
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in (BOS, PAD, EOS, BOI, EOI, END_OF_TURN) if t not in vocab]
        if missing:
            raise UserError(f"tokenizer lacks the Chameleon special tokens {missing}")
        codes = {}
        for name, idx in vocab.items():
            code = image_token_code(name)
            if code is not None:
                codes[code] = idx
        if not codes:
            raise UserError(f"tokenizer has no {IMAGE_TOKEN_PREFIX}* image-code tokens")
        n_codes = max(codes) + 1
        if len(codes) != n_codes:
            raise UserError(f"tokenizer image codes are not contiguous: {len(codes)} names for codes 0..{n_codes - 1}")
        code_to_id = np.array([codes[c] for c in range(n_codes)], dtype=np.int64)
        return cls(
            bos_id=vocab[BOS],
            pad_id=vocab[PAD],
            eos_id=vocab[EOS],
            boi_id=vocab[BOI],
            eoi_id=vocab[EOI],
            eot_id=vocab[END_OF_TURN],
            image_placeholder_id=vocab.get(IMAGE_PLACEHOLDER),
            size=tokenizer.get_vocab_size(with_added_tokens=True),
            code_to_id=code_to_id,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "Vocabulary":
        return cls.from_tokenizer(load_tokenizer(path))

    @property
    def n_codes(self) -> int:
        return len(self.code_to_id)

    @property
    def offset(self) -> int | None:
        """The constant code -> id offset (4 for Chameleon), or None when the mapping is not one."""
        first = int(self.code_to_id[0])
        if np.array_equal(self.code_to_id, np.arange(first, first + self.n_codes)):
            return first
        return None

    def _id_to_code_table(self) -> np.ndarray:
        table = np.full(self.size, -1, dtype=np.int64)
        table[self.code_to_id] = np.arange(self.n_codes)
        return table

    def codes_to_ids(self, codes):
        """Map raw VQGAN codes (list, numpy or torch) to token ids; raises on codes out of range."""
        is_torch = _is_tensor(codes)
        arr = codes.cpu().numpy() if is_torch else np.asarray(codes, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_codes):
            raise ValueError(f"image codes must lie in 0..{self.n_codes - 1}, got {arr.min()}..{arr.max()}")
        ids = arr + self.offset if self.offset is not None else self.code_to_id[arr]
        if not is_torch:
            return ids
        import torch  # already loaded: the input is a tensor

        return torch.from_numpy(ids).to(codes.device)

    def ids_to_codes(self, ids):
        """Map image-code token ids back to raw codes; raises on any id that is not an image code."""
        is_torch = _is_tensor(ids)
        arr = ids.cpu().numpy() if is_torch else np.asarray(ids, dtype=np.int64)
        if self.offset is not None:
            codes = arr - self.offset
            bad = (codes < 0) | (codes >= self.n_codes)
        else:
            inside = (arr >= 0) & (arr < self.size)
            codes = np.where(inside, self._id_to_code_table()[np.clip(arr, 0, self.size - 1)], -1)
            bad = codes < 0
        if bad.any():
            raise ValueError(f"ids {np.unique(arr[bad])[:8].tolist()} are not image-code tokens")
        if not is_torch:
            return codes
        import torch  # already loaded: the input is a tensor

        return torch.from_numpy(codes).to(ids.device)

    def is_image_code(self, ids):
        """Boolean mask of which ids are image-code tokens (numpy or torch, like the input)."""
        if _is_tensor(ids):
            import torch

            if self.offset is not None:
                return (ids >= self.offset) & (ids < self.offset + self.n_codes)
            table = torch.zeros(self.size, dtype=torch.bool, device=ids.device)
            table[torch.from_numpy(self.code_to_id).to(ids.device)] = True
            return table[ids.clamp(0, self.size - 1)] & (ids >= 0) & (ids < self.size)
        arr = np.asarray(ids)
        mask = np.zeros(self.size, dtype=bool)
        mask[self.code_to_id] = True
        return mask[np.clip(arr, 0, self.size - 1)] & (arr >= 0) & (arr < self.size)

    def image_id_tensor(self, device=None) -> torch.Tensor:
        """All image-code token ids, as a long tensor (for masking logits)."""
        import torch

        return torch.from_numpy(self.code_to_id).to(device)

    def special_ids(self) -> dict:
        """The ids a dataset manifest records, so a later step can check it uses the same vocabulary."""
        return {
            "bos": self.bos_id,
            "pad": self.pad_id,
            "eos": self.eos_id,
            "boi": self.boi_id,
            "eoi": self.eoi_id,
            "eot": self.eot_id,
            "image_placeholder": self.image_placeholder_id,
            "image_code_offset": self.offset,
            "n_image_codes": self.n_codes,
            "vocab_size": self.size,
        }

    def to_json(self) -> str:
        return json.dumps(self.special_ids(), sort_keys=True)
