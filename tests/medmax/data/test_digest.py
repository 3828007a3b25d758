"""medmax.data.store.dataset_digest: the one content digest a training run records for a data folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medmax.data import loader, shards, store
from medmax.data.shards import DataError
from medmax.data.shards import MANIFEST, folder_digest, write_sequences
from medmax.data.store import dataset_digest


def _folder(path):
    rng = np.random.default_rng(0)
    rows = [(ids, ids.copy()) for ids in (rng.integers(0, 100, n) for n in (5, 9, 7))]
    return write_sequences(path, rows, {"bos": 0}, rows_per_shard=2)


def _count_reads(monkeypatch) -> list:
    """Every call of the manifest reader, under each name the data modules know it by."""
    reads, read = [], shards.read_manifest
    for module in (shards, loader, store):
        monkeypatch.setattr(module, "read_manifest", lambda folder: reads.append(folder) or read(folder))
    return reads


@pytest.mark.parametrize("use_store", [True, False])
def test_a_sequence_folder_digest_reads_its_manifest_once_with_or_without_the_store(tmp_path, monkeypatch, use_store):
    folder = _folder(tmp_path / "seq")
    expected = folder_digest(folder)
    reads = _count_reads(monkeypatch)
    assert dataset_digest(folder, use_store, tmp_path / "stores") == expected
    assert len(reads) == 1


def test_a_preference_folder_is_digested_from_its_files_not_through_the_sequence_store(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "prefs")
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "layout": "preferences"}))
    expected = folder_digest(folder)
    reads = _count_reads(monkeypatch)
    assert dataset_digest(folder, True, tmp_path / "stores") == expected
    assert len(reads) == 1 and not (tmp_path / "stores").exists()


def test_a_broken_folder_is_one_data_error_naming_it(tmp_path):
    folder = _folder(tmp_path / "seq")
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match=r"seq/manifest.json: not valid JSON"):
        dataset_digest(folder, False)
    with pytest.raises(DataError, match=r"nowhere: dataset folder does not exist"):
        dataset_digest(tmp_path / "nowhere", True)
