"""A preference folder (:mod:`medmax.data.preferences`) read for training: pairs, checks, order and DPO batches.

The training side of preference folders, as :mod:`medmax.data.loader` is of sequence folders: the folder's
pairs as flat arrays (:func:`load_preferences`), the checks against the model before any step
(:func:`check_preferences`), several folders in one weighted order (:class:`PreferenceDataset`) and a batch
of ``B`` pairs as the ``2B`` rows the DPO loss takes (:class:`PreferenceCollator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..vocab import IGNORE_INDEX
from .loader import folder_position, with_rows
from .plans import weighted_order
from .preferences import LAYOUT, WEIGHT_MAX
from .shards import MANIFEST, DataError, read_manifest

logger = logging.getLogger(__name__)


@dataclass
class PreferenceData:
    """Every pair of one folder as flat arrays; pair i's prompt is ``prompt[offsets['prompt'][i]:...[i + 1]]``."""

    folder: Path
    ids: dict[str, np.ndarray]  # prompt / chosen / rejected -> (N_tokens,) int32
    offsets: dict[str, np.ndarray]  # -> (N + 1,) int64
    weights: np.ndarray  # (N,) float64
    formats: np.ndarray  # (N,) str
    manifest: dict
    index: np.ndarray | None = None  # each pair's position in the folder, for messages (None: all, in order)

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
        index = np.asarray(index, dtype=np.int64)
        return PreferenceData(self.folder, ids, offsets, self.weights[index], self.formats[index], self.manifest,
                              index if self.index is None else self.index[index])


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
    unusable = np.flatnonzero(~((data.weights >= 0) & (data.weights <= WEIGHT_MAX)))  # NaN fails both
    if len(unusable):
        i = unusable[0]
        raise DataError(f"{where}: pair {folder_position(data, i)} has weight {float(data.weights[i])!r}, outside "
                        f"0..{WEIGHT_MAX:.4g} (finite as float32; {len(unusable)} of {len(data)} pairs): training would "
                        "stop at its loss. Rebuild the folder with tokenization.build_preferences, whose rows name their weights")


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs of several folders, in one seeded order; each folder's weight repeats or thins it like SequenceDataset."""

    def __init__(self, datasets: list[PreferenceData], weights: list[float] | None, seed: int):
        self.datasets = datasets
        self.order = weighted_order([len(d) for d in datasets], weights or [1.0] * len(datasets), seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        d, i = self.order[index]
        return {**self.datasets[d].pair(i), "row": index}

    def describe(self, index: int) -> str:
        """Where training pair ``index`` comes from: its folder and position there."""
        d, i = self.order[index]
        return f"{self.datasets[d].folder} pair {folder_position(self.datasets[d], int(i))}"


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
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "weight": weight, "n_real_tokens": mask.sum()}
        return with_rows(batch, pairs)
