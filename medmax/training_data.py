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

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

logger = logging.getLogger(__name__)

from .dataset_io import FORMAT_NAME as MANIFEST_FORMAT
from .dataset_io import FORMAT_VERSION as MANIFEST_VERSION
from .dataset_io import MANIFEST as MANIFEST_NAME
from .vocab import IGNORE_INDEX


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or setting."""


def read_manifest(folder: str | Path) -> dict:
    """The checked manifest of a sequence folder (``medmax.dataset_io.read_manifest``), errors as DataError."""
    from .dataset_io import read_manifest as _read

    if not Path(folder).is_dir():
        raise DataError(f"{folder}: dataset folder does not exist")
    try:
        manifest = _read(folder)
    except (OSError, ValueError) as err:
        raise DataError(str(err)) from None
    if not isinstance(manifest.get("special_ids"), dict):
        raise DataError(f"{Path(folder) / MANIFEST_NAME}: special_ids is not a mapping")
    return manifest


@dataclass
class SequenceData:
    """All sequences of one folder as flat arrays: sequence i is ``ids[offsets[i]:offsets[i + 1]]``."""

    folder: Path
    ids: np.ndarray  # (N_tokens,) int32: 8 bytes a token with the labels, held in memory by every process
    labels: np.ndarray  # (N_tokens,) int32
    offsets: np.ndarray  # (N + 1,) int64
    manifest: dict

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
        return SequenceData(self.folder, ids, labels, offsets, self.manifest)


def _flat_list_column(table, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int> column of one shard."""
    if name not in table.column_names:
        raise DataError(f"{path}: no column {name!r}")
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy().astype(np.int32, copy=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def load_sequences(folder: str | Path) -> SequenceData:
    """Read every shard of a sequence folder, checking that ids, labels and lengths agree row by row."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("layout", "sequences") != "sequences":
        raise DataError(f"{folder}/{MANIFEST_NAME}: holds {manifest['layout']}, not sequences (a preference folder "
                        "trains with mode: dpo)")
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
    outside = np.flatnonzero((data.ids < 0) | (data.ids >= vocab_size))
    if len(outside):
        row = int(np.searchsorted(data.offsets, outside[0], side="right") - 1)
        raise DataError(
            f"{where}: {len(outside)} token ids outside the model's vocabulary 0..{vocab_size - 1} "
            f"(row {row} holds {data.ids[outside[0]]})"
        )
    bad_labels = np.flatnonzero((data.labels != IGNORE_INDEX) & ((data.labels < 0) | (data.labels >= vocab_size)))
    if len(bad_labels):
        raise DataError(f"{where}: {len(bad_labels)} labels outside 0..{vocab_size - 1} and not {IGNORE_INDEX}")
    if not (data.labels != IGNORE_INDEX).any():
        raise DataError(f"{where}: every label is {IGNORE_INDEX}; nothing to learn")


def split_validation(data: SequenceData, fraction: float, seed: int) -> tuple[SequenceData, SequenceData]:
    """Hold out a seeded ``fraction`` of the sequences (at least one) for validation."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    if n_val >= len(data):
        raise DataError(f"{data.folder}: validation={fraction} leaves no training sequences out of {len(data)}")
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def weighted_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, sequence) pairs for one epoch of multi-dataset training.

    An epoch has as many sequences as all datasets together; dataset d contributes
    ``round(total * w_d / sum(w))`` of them: a random permutation of its own when that is not more
    than it holds, otherwise whole permutations repeated (oversampling). The result is shuffled.
    """
    rng = np.random.default_rng(seed)
    total, weight_sum = sum(sizes), float(sum(weights))
    pairs = []
    for d, (size, weight) in enumerate(zip(sizes, weights)):
        n = int(round(total * weight / weight_sum))
        reps = -(-n // size)
        index = np.concatenate([rng.permutation(size) for _ in range(max(reps, 1))])[:n]
        pairs += [(d, int(i)) for i in index]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def pack_greedy(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of positions into ``lengths``, in order, each bin's total at most ``max_length``.

    Best fit: each sequence goes to the open bin with the least room that still holds it (a bisect
    over the open bins sorted by room, so a million sequences pack in seconds), keeping the order of
    the already shuffled stream nearly intact while filling rows well. Bins with less room than the
    shortest sequence are closed. Every length must be at most ``max_length``.
    """
    import bisect

    shortest = min(lengths, default=1)
    bins: list[list[int]] = []
    open_keys: list[tuple[int, int]] = []  # (room, bin), sorted
    for i, n in enumerate(lengths):
        k = bisect.bisect_left(open_keys, (n, -1))
        if k < len(open_keys):
            room, b = open_keys.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n >= shortest:
            bisect.insort(open_keys, (room - n, b))
    return bins


def _example(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """One training row from one or more sequences: positions restart and first labels are masked."""
    ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    positions = np.concatenate([np.arange(len(p[0])) for p in parts])
    labels[positions == 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class SequenceDataset(torch.utils.data.Dataset):
    """Training rows over one or more sequence folders, packed (default) or one sequence per row.

    The row list is fixed at construction from ``seed`` (sampling by weight, then packing), so
    every process and every resumed run sees the same rows; the Trainer's sampler shuffles them.
    """

    def __init__(self, datasets: list[SequenceData], weights: list[float] | None, max_length: int,
                 packing: bool = True, seed: int = 0):
        self.datasets = datasets
        weights = weights or [1.0] * len(datasets)
        self.order = weighted_order([len(d) for d in datasets], weights, seed)
        self._lengths = [d.lengths for d in datasets]
        if packing:
            lengths = [int(self._lengths[d][i]) for d, i in self.order]
            self.rows = pack_greedy(lengths, max_length)
        else:
            self.rows = [[k] for k in range(len(self.order))]
        self.packing = packing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        parts = [self.datasets[d].sequence(i) for d, i in (self.order[k] for k in self.rows[index])]
        return _example(parts)

    def n_tokens(self) -> int:
        return int(sum(self._lengths[d][i] for d, i in self.order))


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
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "n_real_tokens": torch.tensor(n_real)}


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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_real_tokens": mask.sum()}


def write_sequences(folder: str | Path, rows: list[tuple[list[int], list[int]]], special_ids: dict,
                    rows_per_shard: int = 1000) -> Path:
    """Write a sequence folder from (input_ids, labels) pairs: for tests, benchmarks and synthetic data.

    ``tokenization.build_sequences`` is the real producer; this writes the same contract.
    """
    import pyarrow as pa

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start : start + rows_per_shard]
        table = pa.table({
            "input_ids": pa.array([list(map(int, r[0])) for r in chunk], type=pa.list_(pa.int32())),
            "labels": pa.array([list(map(int, r[1])) for r in chunk], type=pa.list_(pa.int32())),
            "length": pa.array([len(r[0]) for r in chunk], type=pa.int32()),
        })
        name = f"part-{s:05d}.parquet"
        pq.write_table(table, folder / name)
        files.append(name)
    n_tokens = sum(len(r[0]) for r in rows)
    n_loss = sum(sum(1 for x in r[1] if x != IGNORE_INDEX) for r in rows)
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "special_ids": special_ids, "tokenizer": None,
        "counts": {"sequences": len(rows)}, "token_stats": {"tokens": n_tokens, "loss_tokens": n_loss},
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return folder
