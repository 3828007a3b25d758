"""Reading input rows (limits, bad bytes) and writing passthrough columns (types, schema widening)."""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax.data.inputs import iter_row_batches, row_id
from medmax.data.shards import ErrorLog, ShardWriter
from medmax.data.passthrough import ColumnFilter, type_name
from medmax.data.rows import Built, RowError


def rows_of(path: Path, **kw) -> list:
    return [item for batch in iter_row_batches(path, 2, **kw) for item in batch]


def test_an_over_limit_jsonl_line_is_its_own_error_and_is_never_read_whole(tmp_path):
    path = tmp_path / "in.jsonl"
    big = json.dumps({"text": "x" * 30_000_000}).encode()
    path.write_bytes(b'{"a": 1}\n' + big + b'\n{"a": 2}\n')
    tracemalloc.start()
    try:
        items = rows_of(path, max_row_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [n for n, _ in items] == [1, 2, 3]
    assert items[0][1] == {"a": 1} and items[2][1] == {"a": 2}
    err = items[1][1]
    assert isinstance(err, RowError) and err.kind == "row_too_large"
    assert "--max-row-bytes" in err.reason and "1000000" in err.reason
    assert peak < 8_000_000  # the 30 MB line was skipped in pieces, not held


def test_invalid_utf8_is_that_lines_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff\xfe"}\n\n{"a": 3}\n')
    items = rows_of(path)
    assert [n for n, _ in items] == [1, 2, 4]
    assert items[0][1] == {"a": 1} and items[2][1] == {"a": 3}
    assert items[1][1].kind == "invalid_utf8" and "byte" in items[1][1].reason


def test_a_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert [r for _, r in rows_of(path)] == [{"a": 1}, {"a": 2}]


def test_parquet_rows_over_the_limit_are_errors(tmp_path):
    path = tmp_path / "in.parquet"
    conv = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "y" * 5000}], [{"role": "user", "content": "ok"}]]
    pq.write_table(pa.table({"conversations": conv, "image": [b"\x00" * 9000, None, None]}), path)
    items = rows_of(path, max_row_bytes=1000)
    assert [n for n, _ in items] == [1, 2, 3]
    assert isinstance(items[0][1], dict)  # image bytes do not count against the text limit
    assert items[1][1].kind == "row_too_large" and items[2][1]["conversations"][0]["content"] == "ok"


def test_invalid_utf8_in_a_parquet_string_is_that_rows_error(tmp_path):
    good, bad = b"fine", b"\xff\xfe"
    data = good + bad + good
    offsets = pa.py_buffer(np.array([0, 4, 6, 10], dtype=np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])  # unvalidated: as other writers leave it
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": text, "n": [1, 2, 3]}), path)
    items = rows_of(path)
    assert [r["n"] for _, r in items if isinstance(r, dict)] == [1, 3]
    assert items[1][1].kind == "invalid_utf8"


def test_row_id_finds_the_rows_own_id_column():
    assert row_id({"qid": "q7", "text": "x"}) == ("qid", "q7")
    assert row_id({"id": 3, "question_id": "z"}) == ("id", 3)
    assert row_id({"text": "x", "id": None}) is None and row_id({"id": {"a": 1}}) is None


def test_error_log_names_the_id_column(tmp_path):
    log = ErrorLog(tmp_path / "e.jsonl")
    log.add(Path("in.jsonl"), 4, RowError("bad_field", "oops"), {"question_id": "Q-4"})
    log.add(Path("in.jsonl"), 5, RowError("invalid_json", "no"), None)
    log.close()
    first, second = (json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines())
    assert first == {"file": "in.jsonl", "row": 4, "id_column": "question_id", "id": "Q-4", "kind": "bad_field", "reason": "oops"}
    assert "id" not in second


def _built(n: int = 3) -> Built:
    ids = np.arange(n, dtype=np.int32)
    return Built(ids, ids.copy(), 0)


def test_passthrough_columns_keep_their_types(tmp_path):
    writer = ShardWriter(tmp_path, 0, ColumnFilter(), rows_per_shard=10)
    rows = [
        {"text": "consumed", "qid": "a", "n": 1, "score": 1, "flag": True, "tags": ["x"], "codes": [[1, 2]], "meta": {"k": 1}, "raw": b"\x01"},
        {"text": "consumed", "qid": "b", "n": 2, "score": 2.5, "flag": False, "tags": [], "codes": None, "meta": [1, "mixed"], "raw": None},
    ]
    for row in rows:
        writer.add(_built(), row)
    (name,) = writer.close()
    table = pq.read_table(tmp_path / name)
    types = {f.name: type_name(f.type) for f in table.schema}
    assert "text" not in types
    assert types == {"input_ids": "list<int32>", "labels": "list<int32>", "length": "int32", "format": "string",
                     "qid": "string", "n": "int64", "score": "double", "flag": "bool", "tags": "list<string>",
                     "codes": "list<list<int64>>", "meta": "string", "raw": "binary"}
    out = table.to_pylist()
    assert [r["score"] for r in out] == [1.0, 2.5] and out[0]["codes"] == [[1, 2]] and out[1]["tags"] == []
    assert [json.loads(r["meta"]) for r in out] == [{"k": 1}, [1, "mixed"]]
    assert table.schema.field("meta").metadata == {b"encoding": b"json"}


def test_a_column_appearing_late_or_changing_type_widens_earlier_shards(tmp_path):
    writer = ShardWriter(tmp_path, 0, ColumnFilter(), rows_per_shard=2, rows_per_group=1)
    rows = [{"id": 1}, {"id": 2}, {"id": 3, "late": "x"}, {"id": "four"}]
    for row in rows:
        writer.add(_built(), row)
    names = writer.close()
    table = pa.concat_tables([pq.read_table(tmp_path / n) for n in names])  # one schema for every shard
    assert [json.loads(v) for v in table.column("id").to_pylist()] == [1, 2, 3, "four"]
    assert table.column("late").to_pylist() == [None, None, "x", None]
    assert writer.columns == {"id": "json", "late": "string"}


def test_keep_and_drop_select_columns(tmp_path):
    row = {"text": "t", "image_path": "a.png", "qid": "q", "source": "s"}
    assert ColumnFilter().select(row) == ["qid", "source"]
    assert ColumnFilter(keep=("qid", "image_path")).select(row) == ["qid", "image_path"]
    assert ColumnFilter(drop=("source",)).select(row) == ["qid"]
    with pytest.raises(ValueError, match="--keep and --drop"):
        ColumnFilter(keep=("qid",), drop=("source",))
    with pytest.raises(ValueError, match="'length'"):
        ColumnFilter(keep=("length",))


def test_an_input_column_named_like_an_output_column_needs_drop(tmp_path):
    writer = ShardWriter(tmp_path, 0, ColumnFilter(), rows_per_shard=10)
    with pytest.raises(ValueError, match=r"column 'format'.*--drop format"):
        writer.add(_built(), {"text": "t", "format": "x"})
        writer.close()


def test_lone_surrogates_from_json_survive_as_escaped_json(tmp_path):
    writer = ShardWriter(tmp_path, 0, ColumnFilter(), rows_per_shard=10)
    writer.add(_built(), {"note": "ok \ud800", "id": "\ud801"})
    (name,) = writer.close()
    (row,) = pq.read_table(tmp_path / name).to_pylist()
    assert json.loads(row["note"]) == "ok \ud800" and writer.columns == {"note": "json", "id": "json"}
    log = ErrorLog(tmp_path / "e.jsonl")
    log.add(Path("in.jsonl"), 1, RowError("untokenizable", "bad \ud802"), {"id": "\ud803"})
    log.close()
    assert json.loads((tmp_path / "e.jsonl").read_text())["id"] == "\ud803"
