"""Packing: packed rows give exactly the loss of their sequences run one by one; sampling and bins."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from medmax.data.loader import (
    IGNORE_INDEX,
    PackedCollator,
    PaddingCollator,
    SequenceDataset,
    _example,
    load_sequences,
)
from medmax.data.plans import pack_greedy, weighted_order
from medmax.data.shards import write_sequences
from medmax.model import new_model


def _sequences(vocab, lengths, seed=0):
    """Random sequences mixing text ids and image codes; labels on the second half (image codes included)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(vocab.image_id_tensor()[0].item(), vocab.size, size=n)
        ids[0] = vocab.bos_id
        labels = ids.copy()
        labels[: n // 2] = IGNORE_INDEX
        rows.append((ids.astype(np.int64), labels.astype(np.int64)))
    return rows


def _one_by_one(model, rows):
    """Token-weighted mean of per-sequence losses, each sequence alone in its own batch."""
    total, count = 0.0, 0
    for ids, labels in rows:
        out = model(input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(labels)[None])
        n = int((labels[1:] != IGNORE_INDEX).sum())
        total, count = total + out.loss.double() * n, count + n
    return total / count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_of_single_sequences(tiny_tokenizer, tiny_vqgan, tiny_vocab, attn):
    model = new_model("tiny", tiny_tokenizer, tiny_vqgan, seed=3, attn_implementation=attn).eval()
    rows = _sequences(tiny_vocab, [5, 17, 9, 30, 2, 12, 7])
    # two packed rows of different fill; the collator pads the shorter one
    batch = PackedCollator(tiny_vocab.pad_id)([_example(rows[:4]), _example(rows[4:])])
    assert "attention_mask" not in batch and batch["n_real_tokens"].item() == sum(len(r[0]) for r in rows)
    n_real = batch.pop("n_real_tokens")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss.double()  # a cache disables packed masks
        reference = _one_by_one(model, rows)
    assert n_real > 0
    assert abs(packed.item() - reference.item()) < 1e-5


def test_packed_logits_match_single_sequence_logits(tiny_tokenizer, tiny_vqgan, tiny_vocab):
    """No attention crosses a sequence boundary: each packed sequence's logits equal its own."""
    model = new_model("tiny", tiny_tokenizer, tiny_vqgan, seed=4).eval()
    rows = _sequences(tiny_vocab, [11, 6, 20], seed=1)
    batch = PackedCollator(tiny_vocab.pad_id, pad_to=48)([_example(rows)])
    batch.pop("n_real_tokens")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ids, _ in rows:
            alone = model(input_ids=torch.from_numpy(ids)[None]).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, atol=1e-5, rtol=1e-5)
            start += len(ids)


def test_padding_batches_give_the_same_loss(tiny_tokenizer, tiny_vqgan, tiny_vocab):
    model = new_model("tiny", tiny_tokenizer, tiny_vqgan, seed=5).eval()
    rows = _sequences(tiny_vocab, [4, 19, 8], seed=2)
    batch = PaddingCollator(tiny_vocab.pad_id)([_example([r]) for r in rows])
    assert batch.pop("n_real_tokens").item() == 31
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - _one_by_one(model, rows).item()) < 1e-5


def test_example_restarts_positions_and_masks_each_first_label(tiny_vocab):
    rows = _sequences(tiny_vocab, [3, 4])
    for ids, labels in rows:
        labels[:] = ids  # every label set: the first of each sequence must become -100
    ex = _example(rows)
    assert ex["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert ex["labels"][[0, 3]].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert (ex["labels"][[1, 2, 4, 5, 6]] == ex["input_ids"][[1, 2, 4, 5, 6]]).all()


def test_pack_greedy_respects_max_length_and_keeps_every_sequence():
    lengths = np.random.default_rng(0).integers(1, 100, size=200).tolist()
    bins = pack_greedy(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.15 * sum(lengths) / 128 + 1  # rows are well filled


def test_weighted_order_follows_weights_and_oversamples():
    order = weighted_order([100, 10], [1.0, 1.0], seed=0)
    counts = Counter(d for d, _ in order)
    assert counts == {0: 55, 1: 55}
    small = [i for d, i in order if d == 1]
    assert sorted(Counter(small).values()) == [5] * 5 + [6] * 5  # 5 whole passes, then half of a 6th
    assert len(set(small)) == 10  # every sequence of the small set is used


def test_dataset_reads_folder_and_packs(tmp_path, tiny_vocab):
    rows = _sequences(tiny_vocab, [10, 20, 30, 40, 50])
    folder = write_sequences(tmp_path / "d", rows, tiny_vocab.special_ids(), rows_per_shard=2)
    data = load_sequences(folder)
    assert len(data) == 5 and data.lengths.tolist() == [10, 20, 30, 40, 50]
    packed = SequenceDataset([data], None, max_length=64, packing=True, seed=0)
    padded = SequenceDataset([data], None, max_length=64, packing=False, seed=0)
    assert len(padded) == 5 and len(packed) < 5
    assert sum(len(packed[i]["input_ids"]) for i in range(len(packed))) == 150


def _weighted_order_before_plans(sizes, weights, seed):
    """The list-of-pairs weighted_order that training_data.py held before medmax.data.plans (for equality)."""
    rng = np.random.default_rng(seed)
    total, weight_sum = sum(sizes), float(sum(weights))
    pairs = []
    for d, (size, weight) in enumerate(zip(sizes, weights)):
        n = int(round(total * weight / weight_sum))
        reps = -(-n // size)
        index = np.concatenate([rng.permutation(size) for _ in range(max(reps, 1))])[:n]
        pairs += [(d, int(i)) for i in index]
    return [pairs[i] for i in rng.permutation(len(pairs))]


@pytest.mark.parametrize("sizes,weights,seed", [([50], [1.0], 0), ([30, 7, 100], [1.0, 3.0, 0.5], 4), ([5, 5], [1, 9], 2)])
def test_the_vectorised_epoch_order_is_the_one_training_used_before(sizes, weights, seed):
    assert weighted_order(sizes, weights, seed) == _weighted_order_before_plans(sizes, weights, seed)


def test_row_figures_are_the_same_whatever_the_chunk_they_are_computed_in():
    from medmax.data.loader import row_stats

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, 200)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(-120, 50, offsets[-1]).astype(np.int32)
    values[rng.random(len(values)) < 0.3] = IGNORE_INDEX
    whole = row_stats(values, offsets, chunk=1 << 30)
    for i in (0, 57, 199):
        row = values[offsets[i] : offsets[i + 1]]
        valid = row[row != IGNORE_INDEX]
        expect = [row.min(), row.max(), valid.min(), valid.max(), len(valid)] if len(valid) else (
            [row.min(), row.max(), 0, 0, 0] if len(row) else [0] * 5)
        assert whole[i].tolist() == [int(x) for x in expect]
    for chunk in (1, 5, 64):
        np.testing.assert_array_equal(row_stats(values, offsets, chunk=chunk), whole)
