"""medmax.image_tokens: the image-token folder format's one reader and writer, used by image_tokenize and build_sequences."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from medmax.errors import UserError
from medmax.image_tokens import partition_path, partition_table, read_image_tokens, write_errors, write_partition
from medmax.image_code_lookup import load_code_table


def _folder(root, rows: dict[str, list[int]]):
    root.mkdir()
    table = partition_table(list(rows), [np.asarray(c, dtype=np.int64) for c in rows.values()])
    write_partition(partition_path(root, 0, 0), table, {"partition": 0, "rows": len(rows)})
    return root


def test_a_partition_reads_back_as_written(tmp_path):
    folder = _folder(tmp_path / "a", {"x.png": [1, 2, 3], "y.png": [4, 5, 6]})
    assert read_image_tokens(folder) == {"x.png": [1, 2, 3], "y.png": [4, 5, 6]}
    assert str(pq.read_schema(partition_path(folder, 0, 0)).field("img_tokens").type) == "list<element: int32>"


def test_the_same_path_with_other_codes_in_two_folders_is_refused_by_both_readers(tmp_path):
    a = _folder(tmp_path / "a", {"x.png": [1, 2, 3]})
    b = _folder(tmp_path / "b", {"x.png": [1, 2, 4]})
    same = _folder(tmp_path / "c", {"x.png": [1, 2, 3]})
    assert load_code_table((str(a), str(same)))["x.png"].dtype == np.int16  # stored compactly
    for read in (lambda: read_image_tokens([a, b]), lambda: load_code_table((str(a), str(b)))):
        with pytest.raises(UserError, match=r"'x\.png' has different image tokens"):
            read()


def test_error_files_hold_exactly_the_failed_rows(tmp_path):
    path = tmp_path / "errors" / "part000000.jsonl"
    write_errors(path, [{"row": 1, "reason": "unreadable"}])
    assert path.read_text() == '{"row": 1, "reason": "unreadable"}\n'
    write_errors(path, [])
    assert not path.exists()
