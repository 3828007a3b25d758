"""Training data: sequence folders, multi-dataset sampling, packing and the two batch collators.

A sequence folder (what ``tokenization.build_sequences`` writes) holds ``part-*.parquet`` shards with
``input_ids`` (list<int32>), ``labels`` (list<int32>, -100 = no loss) and ``length`` (int32), and a
``manifest.json`` with ``"format": "medmax-sequences"``, ``"version": 1`` and the ``special_ids`` of
the tokenizer that built it.

Packing puts several sequences in one row. Each sequence's ``position_ids`` restart at 0 and the
collator returns no ``attention_mask``: transformers then finds the sequence boundaries from the
positions (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask,
so packed sequences never attend to each other. That detection is skipped when a KV cache is passed,
and Chameleon creates one whenever ``use_cache`` is on (its default, in training mode too): the model
must run with ``use_cache=False`` (``finetune.train`` sets ``config.use_cache = False``). The first label of every sequence is set to -100:
in a row of its own no token predicts it, and in a packed row the previous sequence's last token
must not either. The loss of a packed batch is therefore the token-weighted loss of its sequences
run one by one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..vocab import IGNORE_INDEX
from .plans import cached_plan, make_plan, plan_key
from .shards import MANIFEST as MANIFEST_NAME
from .shards import DataError, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class SequenceData:
    """All sequences of one folder as flat arrays: sequence i is ``ids[offsets[i]:offsets[i + 1]]``."""

    folder: Path
    ids: np.ndarray  # (N_tokens,) int32: 8 bytes a token with the labels, held in memory by every process
    labels: np.ndarray  # (N_tokens,) int32
    offsets: np.ndarray  # (N + 1,) int64
    manifest: dict
    index: np.ndarray | None = None  # each sequence's position in the folder, for messages (None: all, in order)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def lengths(self) -> np.ndarray:  # (N,)
        return np.diff(self.offsets)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.labels[lo:hi]

    def subset(self, index: np.ndarray) -> "SequenceData":
        """A copy holding only the sequences at ``index`` (in that order)."""
        parts = [self.sequence(int(i)) for i in index]
        lengths = np.array([len(p[0]) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
        index = np.asarray(index, dtype=np.int64)
        return SequenceData(self.folder, ids, labels, offsets, self.manifest,
                            index if self.index is None else self.index[index])

    identity = None  # in memory: no plan is cached for it (medmax.data.store's sequences have one)
    plan_cache = None

    def row_stats(self, column: str) -> np.ndarray:
        """(N, 5) per-sequence figures of ``input_ids`` or ``labels`` for the checks (:func:`row_stats`)."""
        if column not in self._stats:
            self._stats[column] = row_stats(self.ids if column == "input_ids" else self.labels, self.offsets)
        return self._stats[column]

    @cached_property
    def _stats(self) -> dict:
        return {}


STAT_COLUMNS = ("min", "max", "min_valid", "max_valid", "n_valid")  # valid: not IGNORE_INDEX


def row_stats(values: np.ndarray, offsets: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """(N, 5) int64 per row of a flat list column: min, max, and min, max and count of the values that are not
    IGNORE_INDEX (min_valid/max_valid are 0 where there are none; every figure is 0 for an empty row).

    Rows are taken ``chunk`` values at a time, so the temporaries stay small whatever the column's size.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    out = np.zeros((len(offsets) - 1, len(STAT_COLUMNS)), dtype=np.int64)
    lo = 0
    while lo < len(out):
        hi = min(len(out), max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + chunk, side="right")) - 1))
        out[lo:hi] = _chunk_stats(values, offsets[lo : hi + 1])
        lo = hi
    return out


def _chunk_stats(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    values = np.asarray(values[offsets[0] : offsets[-1]])
    starts = offsets[:-1] - offsets[0]
    full = np.flatnonzero(np.diff(offsets) > 0)
    out = np.zeros((len(starts), len(STAT_COLUMNS)), dtype=np.int64)
    if not len(full):
        return out
    at, valid = starts[full], values != IGNORE_INDEX
    out[full, 0] = np.minimum.reduceat(values, at)
    out[full, 1] = np.maximum.reduceat(values, at)
    out[full, 4] = np.add.reduceat(valid, at, dtype=np.int64)
    some = out[full, 4] > 0
    info = np.iinfo(values.dtype)  # sentinels of the values' own type (a wider one would wrap)
    out[full[some], 2] = np.minimum.reduceat(np.where(valid, values, values.dtype.type(info.max)), at)[some]
    out[full[some], 3] = np.maximum.reduceat(np.where(valid, values, values.dtype.type(info.min)), at)[some]
    return out


def _flat_list_column(table, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int> column of one shard."""
    if name not in table.column_names:
        raise DataError(f"{path}: no column {name!r}")
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy().astype(np.int32, copy=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def holds_sequences(manifest: dict) -> bool:
    """Whether a folder's manifest is a sequence folder's (one written before preference folders names no layout)."""
    return manifest.get("layout", "sequences") == "sequences"


def require_sequences(folder: str | Path) -> dict:
    """The manifest of a folder that must hold sequences; a preference folder is refused by name."""
    manifest = read_manifest(folder)
    if not holds_sequences(manifest):
        raise DataError(f"{folder}/{MANIFEST_NAME}: holds {manifest['layout']}, not sequences (a preference folder "
                        "trains with mode: dpo)")
    return manifest


def load_sequences(folder: str | Path) -> SequenceData:
    """Read every shard of a sequence folder, checking that ids, labels and lengths agree row by row."""
    folder = Path(folder)
    manifest = require_sequences(folder)
    shards = [folder / name for name in manifest["files"]]
    if not shards:
        raise DataError(f"{folder}/{MANIFEST_NAME}: lists no shard files")
    ids, labels, lengths = [], [], []
    for shard in shards:
        table = pq.read_table(shard, columns=["input_ids", "labels", "length"])
        shard_ids, id_offsets = _flat_list_column(table, "input_ids", shard)
        shard_labels, label_offsets = _flat_list_column(table, "labels", shard)
        shard_lengths = np.diff(id_offsets)
        bad = np.flatnonzero((np.diff(label_offsets) != shard_lengths) | (table.column("length").to_numpy() != shard_lengths))
        if len(bad):
            raise DataError(f"{shard}: row {bad[0]}: input_ids, labels and length disagree ({len(bad)} rows)")
        ids.append(shard_ids), labels.append(shard_labels), lengths.append(shard_lengths)
    lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = SequenceData(folder, np.concatenate(ids), np.concatenate(labels), offsets, manifest)
    logger.info("%s: %d sequences, %d tokens", folder, len(data), len(data.ids))
    return data


def check_sequences(data: SequenceData, vocab_size: int, max_length: int, special_ids: dict | None = None) -> None:
    """Stop before training on data the model cannot use; every message names the folder and the reason."""
    where = data.folder
    if special_ids is not None:
        theirs = data.manifest["special_ids"]
        differ = {k: (theirs.get(k), v) for k, v in special_ids.items() if theirs.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: manifest {a} vs tokenizer {b}" for k, (a, b) in sorted(differ.items()))
            raise DataError(f"{where}/{MANIFEST_NAME}: special ids differ from the model's tokenizer ({detail})")
    if len(data) == 0:
        raise DataError(f"{where}: holds no sequences")
    lengths = data.lengths
    too_long = np.flatnonzero(lengths > max_length)
    if len(too_long):
        raise DataError(
            f"{where}: {len(too_long)} sequences are longer than max_length={max_length} (row {too_long[0]} has "
            f"{lengths[too_long[0]]} tokens); raise max_length or rebuild the data with a shorter limit"
        )
    _check_ids(data, vocab_size)
    labels = data.row_stats("labels")
    bad = np.flatnonzero((labels[:, 4] > 0) & ((labels[:, 2] < 0) | (labels[:, 3] >= vocab_size)))
    if len(bad):
        count = sum(int(_outside(data.sequence(int(r))[1], vocab_size, IGNORE_INDEX).sum()) for r in bad)
        raise DataError(f"{where}: {count} labels outside 0..{vocab_size - 1} and not {IGNORE_INDEX}")
    if not labels[:, 4].any():
        raise DataError(f"{where}: every label is {IGNORE_INDEX}; nothing to learn")


def image_layout(manifest: dict) -> str:
    """A sequence folder's image layout (``fixed`` / ``shaped``; folders built before layouts are ``fixed``)."""
    return manifest.get("image_layout") or manifest.get("settings", {}).get("image_layout") or "fixed"


def check_one_image_layout(datas: list[SequenceData]) -> str | None:
    """The one image layout of the folders a run trains on; mixing fixed and shaped blocks is refused (the model
    would learn two ways to end an image). -> the layout, None without folders."""
    layouts = {str(d.folder): image_layout(d.manifest) for d in datas}
    if len(set(layouts.values())) > 1:
        detail = ", ".join(f"{folder}: {layout}" for folder, layout in sorted(layouts.items()))
        raise DataError(f"the datasets mix image layouts ({detail}); build them all with the same --image-layout")
    return next(iter(layouts.values()), None)


def _outside(values: np.ndarray, vocab_size: int, allowed: int | None = None) -> np.ndarray:
    bad = (values < 0) | (values >= vocab_size)
    return bad & (values != allowed) if allowed is not None else bad


def _check_ids(data, vocab_size: int) -> None:
    """Token ids outside the vocabulary, found from the per-row figures; only the rows they flag are read."""
    ids = data.row_stats("input_ids")
    rows = np.flatnonzero((ids[:, 0] < 0) | (ids[:, 1] >= vocab_size))
    if not len(rows):
        return
    count = sum(int(_outside(data.sequence(int(r))[0], vocab_size).sum()) for r in rows)
    first = data.sequence(int(rows[0]))[0]
    raise DataError(
        f"{data.folder}: {count} token ids outside the model's vocabulary 0..{vocab_size - 1} "
        f"(row {rows[0]} holds {first[_outside(first, vocab_size)][0]})"
    )


def split_validation(data: SequenceData, fraction: float, seed: int) -> tuple[SequenceData, SequenceData]:
    """Hold out a seeded ``fraction`` of the sequences (at least one) for validation."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    if n_val >= len(data):
        raise DataError(f"{data.folder}: validation={fraction} leaves no training sequences out of {len(data)}")
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def folder_position(data, i: int) -> int:
    """Where sequence (or pair) ``i`` of ``data``, perhaps a subset, sits in its folder."""
    index = getattr(data, "index", None)
    return i if index is None else int(index[i])


def _example(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """One training row from one or more sequences: positions restart and first labels are masked."""
    ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    positions = np.concatenate([np.arange(len(p[0])) for p in parts])
    labels[positions == 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class SequenceDataset(torch.utils.data.Dataset):
    """Training rows over one or more sequence folders, packed (default) or one sequence per row.

    The row list is fixed at construction from ``seed`` (sampling by weight, then packing: a
    :class:`medmax.data.plans.EpochPlan`), so every process and every resumed run sees the same rows; the
    Trainer's sampler shuffles them. When every dataset has an ``identity`` (sequences served from a
    ``medmax.data.store``), the plan is computed once and cached in the first one's ``plan_cache`` folder.
    """

    def __init__(self, datasets: list[SequenceData], weights: list[float] | None, max_length: int,
                 packing: bool = True, seed: int = 0):
        self.datasets = datasets
        weights = weights or [1.0] * len(datasets)
        lengths = [d.lengths for d in datasets]
        compute = lambda: make_plan(lengths, weights, max_length, packing, seed)  # noqa: E731
        identities = [d.identity for d in datasets]
        cache = datasets[0].plan_cache if datasets else None
        if cache is not None and all(identities):
            self.plan = cached_plan(cache, plan_key(identities, weights, max_length, packing, seed), compute)
        else:
            self.plan = compute()
        self.packing = packing

    @property
    def order(self) -> np.ndarray:
        """(M, 2) (dataset, sequence) pairs of the epoch, in sampled order."""
        return self.plan.order

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        return {**_example([self.datasets[d].sequence(int(i)) for d, i in self.plan.row(index)]), "row": index}

    def describe(self, index: int) -> str:
        """Where training row ``index`` comes from: each of its sequences' folder and position there."""
        return ", ".join(f"{self.datasets[d].folder} sequence {folder_position(self.datasets[d], int(i))}"
                         for d, i in self.plan.row(index))

    def n_tokens(self) -> int:
        order = self.plan.order
        return int(sum(np.asarray(d.lengths)[order[order[:, 0] == k, 1]].sum() for k, d in enumerate(self.datasets)))


@dataclass
class PackedCollator:
    """Batches packed rows: padded to the longest row (or ``pad_to``) as a fresh sequence of pad ids.

    Returns input_ids, labels and position_ids (B, T) and no attention_mask, plus the number of real
    tokens (``n_real_tokens``) that the trainer pops for its tokens/s figure.
    """

    pad_id: int
    pad_to: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        width = self.pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)  # padding: a sequence of its own
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.from_numpy(row["input_ids"])
            labels[b, :n] = torch.from_numpy(row["labels"])
            positions[b, :n] = torch.from_numpy(row["position_ids"])
            positions[b, n:] = torch.arange(width - n)
        n_real = sum(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "n_real_tokens": torch.tensor(n_real)}
        return with_rows(batch, rows)


@dataclass
class PaddingCollator:
    """MedMax-style batches: one sequence per row, right-padded to the longest, with an attention mask."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.from_numpy(row["input_ids"])
            labels[b, :n] = torch.from_numpy(row["labels"])
            mask[b, :n] = 1
        return with_rows({"input_ids": ids, "labels": labels, "attention_mask": mask, "n_real_tokens": mask.sum()}, rows)


def with_rows(batch: dict, items: list[dict]) -> dict:
    """``batch`` plus ``rows`` (B,), the dataset indices of its items when they carry one (``row``), so that a
    failing step can name its rows (``dataset.describe``); the trainer pops it before the forward."""
    if items and all("row" in item for item in items):
        batch["rows"] = torch.tensor([int(item["row"]) for item in items], dtype=torch.long)
    return batch
