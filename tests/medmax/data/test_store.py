"""medmax.data.store: a sequence folder served memory-mapped gives exactly what reading it into memory gives."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax.data import store as store_module
from medmax.data.loader import SequenceDataset, check_sequences, load_sequences, split_validation
from medmax.data.shards import DataError
from medmax.data.shards import folder_digest, write_sequences
from medmax.data.store import META, TokenStore, ensure_store, open_sequences, store_digest
from medmax.vocab import IGNORE_INDEX

VOCAB = 1000


def _rows(n=120, seed=0, low=3, high=60):
    rng = np.random.default_rng(seed)
    rows = []
    for length in rng.integers(low, high, n):
        ids = rng.integers(0, VOCAB, length)
        labels = ids.copy()
        labels[: length // 2] = IGNORE_INDEX
        rows.append((ids, labels))
    return rows


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BATCH_ROWS", 16)  # several record batches, rows found across chunks
    return write_sequences(tmp_path / "seq", _rows(), {"bos": 0}, rows_per_shard=50)


def test_the_store_serves_every_sequence_length_and_check_figure_of_the_folder(folder):
    memory, mapped = load_sequences(folder), open_sequences(folder)
    assert len(mapped) == len(memory) == 120
    assert len(mapped.store.dataset.data.table.column("input_ids").chunks) > 3  # read across record batches
    for i in range(len(memory)):
        for a, b in zip(memory.sequence(i), mapped.sequence(i)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(memory.lengths, mapped.lengths)
    for column in ("input_ids", "labels"):
        np.testing.assert_array_equal(memory.row_stats(column), mapped.row_stats(column))
    assert mapped.manifest == memory.manifest


def test_rows_are_views_of_the_map_and_a_pickled_store_carries_only_its_path(folder):
    mapped = open_sequences(folder)
    ids, _ = mapped.sequence(5)
    assert not ids.flags.owndata and not ids.flags.writeable  # a view of the memory-mapped file, not a copy
    blob = pickle.dumps(mapped.store)
    assert len(blob) < 1000
    np.testing.assert_array_equal(pickle.loads(blob).row("labels", 5), mapped.sequence(5)[1])


def test_packed_rows_validation_split_and_weights_equal_the_in_memory_loader(folder, tmp_path):
    other = write_sequences(tmp_path / "other", _rows(40, seed=1), {"bos": 0})
    memory = [load_sequences(folder), load_sequences(other)]
    mapped = [open_sequences(folder), open_sequences(other)]
    (train_m, val_m), (train_s, val_s) = split_validation(memory[0], 0.1, 3), split_validation(mapped[0], 0.1, 3)
    for packing in (True, False):
        a = SequenceDataset([train_m, memory[1]], [1.0, 2.5], 128, packing, seed=7)
        b = SequenceDataset([train_s, mapped[1]], [1.0, 2.5], 128, packing, seed=7)
        assert len(a) == len(b) and a.n_tokens() == b.n_tokens()
        for r in range(len(a)):
            for key, value in a[r].items():
                np.testing.assert_array_equal(value, b[r][key])
    a, b = SequenceDataset([val_m], None, 128), SequenceDataset([val_s], None, 128)
    assert [a[r]["input_ids"].tolist() for r in range(len(a))] == [b[r]["input_ids"].tolist() for r in range(len(b))]


def test_the_plan_is_computed_once_and_mapped_by_later_readers(folder, monkeypatch):
    data = open_sequences(folder)
    first = SequenceDataset([data], None, 128, seed=1)
    assert isinstance(first.plan.order, np.memmap)
    calls = []

    def computed(*args):
        calls.append(args)
        raise RuntimeError("computed")

    monkeypatch.setattr("medmax.data.loader.make_plan", computed)
    again = SequenceDataset([open_sequences(folder)], None, 128, seed=1)
    assert calls == [] and len(again) == len(first)
    np.testing.assert_array_equal(again.plan.bins, first.plan.bins)
    with pytest.raises(RuntimeError, match="computed"):  # another seed is another plan: computed, not taken from the cache
        SequenceDataset([data], None, 128, seed=2)
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["id_outside", "label_outside", "no_loss", "too_long"])
def test_bad_data_is_refused_with_the_in_memory_loaders_message(tmp_path, case):
    rows = _rows(30, low=8)
    ids, labels = rows[7]
    if case == "id_outside":
        ids[3] = VOCAB + 5
    elif case == "label_outside":
        labels[-1] = VOCAB + 9
    elif case == "no_loss":
        rows = [(i, np.full(len(i), IGNORE_INDEX)) for i, _ in rows]
    folder = write_sequences(tmp_path / "bad", rows, {"bos": 0})
    max_length = 40 if case == "too_long" else 100
    messages = []
    for data in (load_sequences(folder), open_sequences(folder)):
        with pytest.raises(DataError) as err:
            check_sequences(data, VOCAB, max_length)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert str(folder) in messages[0]


def test_a_shard_whose_ids_and_labels_disagree_is_refused_naming_the_shard_and_row(tmp_path):
    folder = write_sequences(tmp_path / "seq", _rows(10), {"bos": 0})
    shard = folder / json.loads((folder / "manifest.json").read_text())["files"][0]
    table = pq.read_table(shard)
    labels = table.column("labels").to_pylist()
    labels[4] = labels[4][:-1]
    table = table.set_column(table.schema.get_field_index("labels"), "labels", pa.array(labels, pa.list_(pa.int32())))
    pq.write_table(table, shard)
    messages = []
    for load in (load_sequences, open_sequences):
        with pytest.raises(DataError) as err:
            load(folder)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == f"{shard}: row 4: input_ids, labels and length disagree (1 rows)"


def test_a_changed_folder_gets_a_new_store_and_the_old_one_is_removed(folder):
    first = ensure_store(folder)
    assert ensure_store(folder) == first
    write_sequences(folder, _rows(60, seed=5), {"bos": 0}, rows_per_shard=50)  # new content, new manifest
    second = ensure_store(folder)
    assert second != first and not first.exists() and second.parent == first.parent
    np.testing.assert_array_equal(open_sequences(folder).sequence(3)[0], load_sequences(folder).sequence(3)[0])


def test_a_data_file_rewritten_under_the_same_manifest_is_converted_again(folder):
    before = open_sequences(folder)
    name = before.manifest["files"][0]
    table = pq.read_table(folder / name)
    ids = [[VOCAB - 1] * len(r) for r in table.column("input_ids").to_pylist()]
    pq.write_table(table.set_column(0, "input_ids", pa.array(ids, pa.list_(pa.int32()))), folder / name)
    after = open_sequences(folder)
    assert after.store.path == before.store.path  # same manifest, same place: made again, not reused
    assert after.sequence(0)[0].tolist() == [VOCAB - 1] * len(after.sequence(0)[0])
    assert store_digest(folder) == folder_digest(folder) != before.store.meta["folder_digest"]


def _open_in_child(folder, queue):
    path = ensure_store(folder)
    queue.put(os.stat(path / "tokens.arrow").st_ino)


def test_processes_starting_together_make_one_store_and_share_it(tmp_path):
    folder = write_sequences(tmp_path / "seq", _rows(400), {"bos": 0}, rows_per_shard=100)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(folder, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    inodes = {queue.get(timeout=5) for _ in procs}
    final = os.stat(ensure_store(folder) / "tokens.arrow").st_ino
    assert inodes == {final}  # nobody replaced a store another process had already mapped


def test_a_store_folder_can_be_named_directly_and_a_foreign_one_is_refused(folder, tmp_path):
    path = ensure_store(folder)
    direct = open_sequences(path)
    np.testing.assert_array_equal(direct.sequence(2)[1], load_sequences(folder).sequence(2)[1])
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / META).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "fake" / META)) + ".*medmax-token-store"):
        TokenStore(tmp_path / "fake")


def test_an_unwritable_store_place_names_the_setting(folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match="store_dir"):
        ensure_store(folder, store_root=blocker / "below")


def test_the_store_holds_any_token_list_columns_such_as_preference_pairs(tmp_path):
    """prompt/chosen/rejected columns of another folder format, read through that format's own manifest reader."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "pairs"
    folder.mkdir()
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    data = {c: [rng.integers(0, VOCAB, rng.integers(1, 30)).tolist() for _ in range(25)] for c in columns}
    pq.write_table(pa.table({c: pa.array(v, pa.list_(pa.int32())) for c, v in data.items()}), folder / "part-0.parquet")
    (folder / "manifest.json").write_text(json.dumps({"format": "pairs", "files": ["part-0.parquet"]}))

    def read(path):
        return json.loads((path / "manifest.json").read_text())

    store = store_module.open_store(folder, columns, read=read)
    assert len(store) == 25 and store.columns == columns
    for c in columns:
        assert [store.row(c, i).tolist() for i in range(25)] == data[c]
        np.testing.assert_array_equal(store.lengths(c), [len(x) for x in data[c]])


def test_a_folder_listing_no_shards_is_refused_as_the_in_memory_loader_refuses_it(tmp_path):
    folder = write_sequences(tmp_path / "empty", [], {"bos": 0})
    messages = []
    for load in (load_sequences, open_sequences):
        with pytest.raises(DataError) as err:
            load(folder)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == f"{folder}/manifest.json: lists no shard files"


def test_a_broken_shard_is_named_and_leaves_no_half_made_store(folder):
    shard = folder / json.loads((folder / "manifest.json").read_text())["files"][1]
    shard.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{shard}: not a readable parquet file")):
        open_sequences(folder)
    assert [p.name for p in store_module.store_group(folder, None).iterdir()] == [".lock"]


@pytest.mark.parametrize("fault", ["full disk", "read-only file system", "short write"])
def test_a_full_disk_or_read_only_store_place_is_one_line_naming_it(folder, monkeypatch, fault):
    import errno

    group = store_module.store_group(folder, None)
    if fault == "full disk":
        def convert(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(store_module, "_convert", convert)
    elif fault == "short write":  # numpy on a full disk: no errno, no file
        def save(path, *args, **kwargs):
            raise OSError("100000 requested and 2032 written")
        monkeypatch.setattr(store_module.np, "save", save)
    else:
        def save(path, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        monkeypatch.setattr(store_module.np, "save", save)
    with pytest.raises(DataError) as err:
        open_sequences(folder)
    message = str(err.value)
    assert str(group) in message and "store_dir" in message and "\n" not in message
    words = {"full disk": "No space left on device", "read-only file system": "Read-only file system"}
    assert words.get(fault, "2032 written") in message
    assert [p.name for p in group.iterdir()] == [".lock"]  # no half-made store left


def test_a_plan_that_cannot_be_cached_is_used_from_memory_with_a_warning(folder, monkeypatch, caplog):
    """A store on a read-only or full disk still trains: the plan cache is only a saving."""
    import errno

    from medmax.data import plans

    data = open_sequences(folder)
    expected = SequenceDataset([load_sequences(folder)], None, 128, seed=3).plan

    def save(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(plans.np, "save", save)
    got = SequenceDataset([data], None, 128, seed=3).plan
    np.testing.assert_array_equal(got.bins, expected.bins)
    assert "Read-only file system" in caplog.text and "not cached" in caplog.text
    assert not [p for p in data.plan_cache.iterdir() if p.is_dir()]


# ------------------------------------------------------------------------------------------ integrity (issue 23)
def _flip_byte_keeping_size_and_mtime(path, at=None):
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2 if at is None else at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def _assert_served_like_the_folder(folder):
    memory, mapped = load_sequences(folder), open_sequences(folder)
    for i in range(len(memory)):
        for a, b in zip(memory.sequence(i), mapped.sequence(i)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(memory.lengths, mapped.lengths)


@pytest.mark.parametrize("file", ["tokens.arrow", "lengths.input_ids.npy", "stats.labels.npy"])
def test_a_store_file_changed_in_place_is_made_again_with_a_warning(folder, caplog, file):
    """Same size, same mtime, other token values: a store is never trained on unless its checksums hold."""
    path = ensure_store(folder)
    # a byte of the last row's values (before the stream's 8-byte end marker): a readable store with other values
    _flip_byte_keeping_size_and_mtime(path / file, at=path.joinpath(file).stat().st_size - 9)
    caplog.clear()
    _assert_served_like_the_folder(folder)
    assert f"{path}" in caplog.text and "fails its integrity check" in caplog.text and file in caplog.text


def test_a_truncated_store_file_is_made_again_not_a_traceback(folder, caplog):
    path = ensure_store(folder)
    tokens = path / "tokens.arrow"
    os.truncate(tokens, tokens.stat().st_size // 2)
    _assert_served_like_the_folder(folder)
    assert "fails its integrity check" in caplog.text and "tokens.arrow" in caplog.text


def test_a_store_folder_named_directly_that_fails_its_check_is_refused(folder):
    path = ensure_store(folder)
    _flip_byte_keeping_size_and_mtime(path / "tokens.arrow")
    with pytest.raises(DataError, match=re.escape(str(path / "tokens.arrow")) + ".*checksum"):
        open_sequences(path)


def test_a_rewritten_cached_plan_is_computed_again_with_a_warning(folder, caplog):
    data = open_sequences(folder)
    first = SequenceDataset([data], None, 128, seed=1).plan
    bins = np.array(first.bins)
    (cached,) = [p for p in data.plan_cache.iterdir() if p.is_dir()]
    stat = (cached / "bins.npy").stat()
    np.save(cached / "bins.npy", bins[::-1].copy())  # another valid plan of the same size
    os.utime(cached / "bins.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caplog.clear()
    again = SequenceDataset([open_sequences(folder)], None, 128, seed=1).plan
    np.testing.assert_array_equal(again.bins, bins)
    assert "fails its integrity check" in caplog.text and "bins.npy" in caplog.text
