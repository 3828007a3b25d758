"""Fit a byte-level BPE tokenizer to a text corpus while keeping Chameleon's id layout.

Ids 0..8711 are Chameleon's, whatever the corpus (README, "Vocabulary"; :func:`chameleon_layout_tokens`):
``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 8192 ``IMGIMG`` image codes at 4..8195, ``<eoss>``
8196, ``<racm3:break>`` 8197, ``<reserved00000..00511>`` 8198..8709, ``<reserved08706>`` 8710 and
``<image>`` 8711. The BPE learned from the corpus (Hugging Face ``tokenizers``' ``BpeTrainer``, byte-level,
so any text encodes) follows from 8712 on. A learned token that spells a layout name (the corpus typed
``</s>`` or ``IMGIMGBZ``) is dropped with its merge, so typed text can never become a control token.

The tiny tokenizer of the tests and the quickstart (:func:`medmax.presets.build_tiny_tokenizer`) is this
function fitted to a few synthetic captions. Fitting is deterministic: the same texts and settings give
the same tokenizer JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import UserError
from .vocab import BOI, BOS, END_OF_TURN, EOI, EOS, IMAGE_PLACEHOLDER, PAD, image_token_name

if TYPE_CHECKING:
    from .data.corpus import CorpusCounts

logger = logging.getLogger(__name__)

N_IMAGE_CODES = 8192
FIRST_TEXT_ID = 8712  # after <image> at 8711
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte: the smallest text vocabulary
SPECIAL_TOKENS = (BOS, PAD, EOS, EOI, BOI, END_OF_TURN, IMAGE_PLACEHOLDER)


class TokenizerFitError(UserError):
    """A setting or corpus a tokenizer cannot be fitted with; the message names which."""


def chameleon_layout_tokens() -> list[str]:
    """Token strings for ids 0..8711, in the Chameleon / MedMax order."""
    tokens = [BOS, PAD, EOS, "<unk>"]
    tokens += [image_token_name(c) for c in range(N_IMAGE_CODES)]  # ids 4..8195
    tokens += [EOI, BOI]  # 8196, 8197
    tokens += [f"<reserved{i - 4:05d}>" for i in range(8198, 8710)]
    tokens += [END_OF_TURN, IMAGE_PLACEHOLDER]  # 8710, 8711
    assert len(tokens) == FIRST_TEXT_ID
    return tokens


def fit_chameleon_bpe(texts: Iterable[str], text_vocab_size: int, min_frequency: int = 0, progress: bool = False) -> Tokenizer:
    """A byte-level BPE of at most ``text_vocab_size`` text tokens (the 256 bytes included) fitted to ``texts``,
    placed after Chameleon's 8712 layout ids; ``min_frequency``: a pair seen fewer times is never merged."""
    if text_vocab_size < BYTE_ALPHABET:
        raise TokenizerFitError(f"text_vocab_size must be at least {BYTE_ALPHABET} (the byte alphabet), got {text_vocab_size}")
    if min_frequency < 0:
        raise TokenizerFitError(f"min_frequency must be >= 0, got {min_frequency}")
    text = Tokenizer(models.BPE())
    text.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=text_vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(text.to_str())["model"]
    return _with_layout(trained["vocab"], trained["merges"])


def _with_layout(learned: dict[str, int], learned_merges: list) -> Tokenizer:
    """The layout ids, then the learned tokens in their order; merges that would spell a layout name are dropped."""
    layout = chameleon_layout_tokens()
    vocab = {tok: i for i, tok in enumerate(layout)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned_merges]
    kept = [m for m in merges if "".join(m) not in vocab]
    if len(kept) < len(merges):
        logger.info("dropped %d learned tokens that spell a layout token (%s): typed text stays text",
                    len(merges) - len(kept), ", ".join(sorted("".join(m) for m in merges if "".join(m) in vocab)[:5]))
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def fit_corpus(paths: list, columns: tuple[str, ...], text_vocab_size: int, min_frequency: int = 2,
               strict: bool = False, progress: bool = False) -> tuple[Tokenizer, CorpusCounts]:
    """:func:`fit_chameleon_bpe` on the texts of corpus files (:mod:`medmax.data.corpus`); -> (tokenizer, what was read).

    A row without text is counted in ``counts.errors``; with ``strict`` the first one stops the fit, named.
    A corpus without a single text is refused.
    """
    from .data.corpus import CorpusCounts, iter_corpus

    counts = CorpusCounts()
    texts = iter_corpus(paths, columns, counts)
    tokenizer = fit_chameleon_bpe(_stop_at_error(texts, counts) if strict else texts, text_vocab_size, min_frequency, progress)
    if strict and counts.errors:
        raise TokenizerFitError(_row_error(counts.errors[0]) + " (--strict)")
    if counts.texts == 0:
        first = f"; the first row: {_row_error(counts.errors[0])}" if counts.errors else ""
        raise TokenizerFitError(f"no text in the columns {list(columns)} of {len(paths)} input file(s), {counts.rows} rows{first}")
    return tokenizer, counts


def _stop_at_error(texts: Iterable[str], counts: CorpusCounts) -> Iterable[str]:
    for text in texts:
        if counts.errors:
            return
        yield text


def _row_error(error: dict) -> str:
    return f"{error['file']} row {error['row']}: {error['reason']}"
