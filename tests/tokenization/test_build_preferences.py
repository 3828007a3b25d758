"""tokenization.build_preferences: pairs in the vocabulary and layout of sequence folders, build_sequences' rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medmax.data.preference_loader import load_preferences
from medmax.data.build import RowRejected
from medmax.data.rows import SequenceBuilder
from tokenization.build_preferences import main

CODES = [3, 1, 4, 1, 5, 9, 2, 6]


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _build(tmp_path, tokenizer_path, rows, *flags, body=False):
    src = _write(tmp_path / "rows.jsonl", rows)
    (main.__wrapped__ if body else main)(["--input", str(src), "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "out"), "--no-progress",
          *flags])
    return tmp_path / "out"


def test_ids_are_what_build_sequences_gives_the_same_rows(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    rows = [{"id": "q1", "prompt": "Is there a lesion?", "images": [CODES], "chosen": "yes", "rejected": "no",
             "weight": 0.25, "site": "A"},
            {"id": "g1", "prompt": "Generate a scan: a lesion", "chosen": {"image_tokens": CODES},
             "rejected": {"text": "no"}}]
    out = _build(tmp_path, tiny_tokenizer_path, rows)
    data = load_preferences(out)
    builder = SequenceBuilder(tiny_tokenizer)
    same = [builder.build({"text": "<image>Is there a lesion?<reserved08706>yes", "image_tokens": [CODES]}),
            builder.build({"text": "<image>Is there a lesion?<reserved08706>no", "image_tokens": [CODES]}),
            builder.build({"text": "Generate a scan: a lesion<reserved08706><image>", "image_tokens": [CODES]})]
    first = data.pair(0)
    assert np.array_equal(np.concatenate([first["prompt_ids"], first["chosen_ids"]]), same[0].input_ids)
    assert np.array_equal(np.concatenate([first["prompt_ids"], first["rejected_ids"]]), same[1].input_ids)
    # the continuation is exactly what build_sequences trains on: its labels after the prompt
    assert np.array_equal(first["chosen_ids"], same[0].labels[len(first["prompt_ids"]):])
    second = data.pair(1)
    assert np.array_equal(np.concatenate([second["prompt_ids"], second["chosen_ids"]]), same[2].input_ids)
    assert first["weight"] == 0.25 and second["weight"] == 1.0
    assert list(data.formats) == ["text", "image"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "preferences" and manifest["columns"] == {"id": "string", "site": "string"}


@pytest.mark.parametrize("row, kind, reason", [
    ({"prompt": "q", "chosen": "a"}, "bad_field", "'rejected' must be"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": "high"}, "bad_field", "'weight'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": float("nan")}, "bad_field", "'weight'"),
    ({"prompt": "q<reserved08706>", "chosen": "a", "rejected": "b"}, "bad_field", "end-of-turn"),
    ({"prompt": "q", "chosen": "a <image>", "rejected": "b"}, "bad_field", "<image>"),
    ({"prompt": "<image><image>q", "images": [CODES], "chosen": "a", "rejected": "b"}, "placeholder_mismatch", "2"),
    ({"prompt": "q", "images": [[1, 2, 3]], "chosen": "a", "rejected": "b"}, "wrong_code_count", "3 codes"),
    ({"prompt": "q", "chosen": {"image": "scan.png"}, "rejected": "b"}, "missing_image", "no image codes for path"),
    ({"prompt": "q", "chosen": {"text": "a", "image_tokens": CODES}, "rejected": "b"}, "bad_field", "one of"),
])
def test_bad_rows_are_listed_with_kind_and_reason_and_the_rest_is_built(tmp_path, tiny_tokenizer_path, row, kind, reason):
    good = {"id": "ok", "prompt": "q", "images": [CODES], "chosen": "a", "rejected": "b"}
    out = _build(tmp_path, tiny_tokenizer_path, [good, {"id": "bad", **row}])
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["id"] == "bad" and errors[0]["row"] == 2 and errors[0]["kind"] == kind
    assert reason in errors[0]["reason"]
    assert len(load_preferences(out)) == 1


def test_strict_stops_and_long_pairs_are_dropped_not_cut(tmp_path, tiny_tokenizer_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "yes " * 40, "rejected": "b"}]
    out = _build(tmp_path, tiny_tokenizer_path, rows, "--max-length", "20")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["dropped_for_length"] == 1 and manifest["counts"]["truncated"] == 0
    assert len(load_preferences(out)) == 1
    (tmp_path / "strict").mkdir()
    with pytest.raises(RowRejected, match="row 2"):  # the program's body; its runner prints this as one line
        _build(tmp_path / "strict", tiny_tokenizer_path, [rows[0], {"prompt": 3, "chosen": "a", "rejected": "b"}],
               "--strict", body=True)


def test_the_build_refuses_an_output_holding_foreign_files(tmp_path, tiny_tokenizer_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        _build(tmp_path, tiny_tokenizer_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}], body=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("row, kind, reason", [
    # finite as float64, infinite as the float32 training reads it in: DPO's loss would be NaN
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1e39}, "bad_field", "'weight'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": -1e39}, "bad_field", "'weight'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": float("inf")}, "bad_field", "'weight'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": -0.5}, "bad_field", "'weight'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": True}, "bad_field", "'weight'"),
])
def test_a_weight_training_cannot_use_is_the_rows_error(tmp_path, tiny_tokenizer_path, row, kind, reason):
    test_bad_rows_are_listed_with_kind_and_reason_and_the_rest_is_built(tmp_path, tiny_tokenizer_path, row, kind, reason)


@pytest.mark.parametrize("row, kind, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "same_continuations", "no gradient"),
    ({"prompt": "q", "chosen": {"text": "same"}, "rejected": "same"}, "same_continuations", "no gradient"),
    ({"prompt": "q", "chosen": {"image_tokens": CODES}, "rejected": {"image_tokens": CODES}}, "same_continuations", "no gradient"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_chosen", "'chosen'"),
    ({"prompt": "q", "chosen": "  \n", "rejected": "b"}, "empty_chosen", "'chosen'"),
])
def test_a_pair_that_teaches_nothing_is_a_counted_row_error(tmp_path, tiny_tokenizer_path, row, kind, reason):
    test_bad_rows_are_listed_with_kind_and_reason_and_the_rest_is_built(tmp_path, tiny_tokenizer_path, row, kind, reason)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert kind in json.dumps(manifest["counts"])


@pytest.mark.parametrize("weight", [1e39, float("nan"), -1.0])
def test_training_refuses_a_folder_whose_weights_it_cannot_use(tmp_path, tiny_tokenizer_path, tiny_tokenizer, weight):
    """A folder written before build_preferences refused such weights (or edited since) stops before training."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medmax.data.loader import DataError
    from medmax.data.preference_loader import check_preferences
    from medmax.vocab import Vocabulary

    out = _build(tmp_path, tiny_tokenizer_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    shard = next(out.rglob("*.parquet"))
    table = pq.read_table(shard)
    column = table.schema.get_field_index("weight")
    pq.write_table(table.set_column(column, "weight", pa.array([1.0, weight], type=pa.float64())), shard)
    vocab = Vocabulary.from_tokenizer(tiny_tokenizer)
    with pytest.raises(DataError, match="pair 1 .*weight"):
        check_preferences(load_preferences(out), tiny_tokenizer.get_vocab_size(), 4096, vocab.special_ids())
