"""build_sequences --image-layout shaped: non-square grids carry their shape; the fixed layout refuses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medmax.data.loader import check_one_image_layout, load_sequences
from medmax.data.shards import DataError, read_manifest, shard_paths
from medmax.image_layout import END_OF_LINE, ShapedTokens, size_token
from medmax.image_tokens import partition_table
from tokenization.build_sequences import main

EOT = "<reserved08706>"


def _grid(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, (h, w)).astype(np.int32)


@pytest.fixture
def grid_tokens(tmp_path) -> Path:
    """A version-3 image-token folder: a 4x16 grid (64 codes, as the square 8x8), a 6x9 and an 8x8."""
    folder = tmp_path / "tokens"
    folder.mkdir()
    table = partition_table(["wide.png", "tall.png", "square.png"], [_grid(1, 4, 16), _grid(2, 9, 6), _grid(3, 8, 8)])
    pq.write_table(table, folder / "tokens-rank00000-part000000.parquet")
    return folder


def _rows(tmp_path, *paths) -> Path:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"text": f"Draw {p}." + EOT + "<image>", "image_path": p}) + "\n" for p in paths))
    return src


def _build(tmp_path, src, tokenizer, tokens, out, *extra) -> Path:
    argv = ["--input", str(src), "--tokenizer", str(tokenizer), "--output", str(tmp_path / out), "--no-progress",
            "--image-tokens", str(tokens), *extra]
    assert main.__wrapped__(argv) == 0
    return tmp_path / out


def test_shaped_blocks_carry_height_width_and_end_of_lines(tmp_path, tiny_tokenizer, tiny_tokenizer_path, tiny_vocab, grid_tokens):
    out = _build(tmp_path, _rows(tmp_path, "wide.png", "tall.png", "square.png"), tiny_tokenizer_path, grid_tokens, "out",
                 "--image-layout", "shaped")
    manifest = read_manifest(out)
    assert manifest["image_layout"] == "shaped" and manifest["counts"]["rows_written"] == 3
    shaped = ShapedTokens.from_tokenizer(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    assert shaped.eol_id == vocab[END_OF_LINE] == 8603 and shaped.size_ids[4] == vocab[size_token(4)] == 8608
    rows = [r for p in shard_paths(out) for r in pq.read_table(p).to_pylist()]
    for row, (seed, h, w) in zip(rows, [(1, 4, 16), (2, 9, 6), (3, 8, 8)]):
        ids = np.array(row["input_ids"])
        start = int(np.flatnonzero(ids == tiny_vocab.boi_id)[0])
        block = ids[start : start + h * (w + 1) + 4]
        assert block[-1] == tiny_vocab.eoi_id and len(block) == h * (w + 1) + 4
        got_h, got_w, grid_ids = shaped.read_block(tiny_vocab, block)
        assert (got_h, got_w) == (h, w)
        assert np.array_equal(tiny_vocab.ids_to_codes(grid_ids), _grid(seed, h, w))
        assert row["labels"][start:start + len(block)] == block.tolist()  # the answer image, sizes and end-of-lines learned


def test_a_fixed_build_refuses_a_non_square_grid_naming_the_row(tmp_path, tiny_tokenizer_path, grid_tokens):
    # 4x16 has the 64 codes of the square 8x8 grid: only its recorded shape tells it apart
    out = _build(tmp_path, _rows(tmp_path, "square.png", "wide.png"), tiny_tokenizer_path, grid_tokens, "fixed",
                 "--codes-per-image", "64")
    manifest = read_manifest(out)
    assert manifest["image_layout"] == "fixed" and manifest["counts"]["rejected"] == {"non_square_grid": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["kind"]) for e in errors] == [(2, "non_square_grid")] and "4x16" in errors[0]["reason"]


def test_training_refuses_fixed_and_shaped_folders_together(tmp_path, tiny_tokenizer_path, grid_tokens):
    src = _rows(tmp_path, "square.png")
    fixed = load_sequences(_build(tmp_path, src, tiny_tokenizer_path, grid_tokens, "f", "--codes-per-image", "64"))
    shaped = load_sequences(_build(tmp_path, src, tiny_tokenizer_path, grid_tokens, "s", "--image-layout", "shaped"))
    assert check_one_image_layout([shaped, shaped]) == "shaped" and check_one_image_layout([fixed]) == "fixed"
    with pytest.raises(DataError, match="mix image layouts"):
        check_one_image_layout([fixed, shaped])


def test_no_image_loss_covers_sizes_and_end_of_lines_and_a_cut_never_splits_a_shaped_block(tiny_tokenizer, tiny_vocab):
    from medmax.data.rows import BuildConfigError, LengthDrop, SequenceBuilder, SequenceConfig

    row = {"text": "Draw." + EOT + "<image>", "image_tokens": [_grid(4, 3, 5).tolist()]}
    built = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_layout="shaped", image_loss=False)).build(row)
    start = built.input_ids.tolist().index(tiny_vocab.boi_id)
    assert len(built) == start + 3 * 6 + 4 + 1 and (built.labels[start : start + 22] == -100).all()
    short = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_layout="shaped", max_length=start + 9))
    with pytest.raises(LengthDrop, match="through an image"):
        short.fit_length(short.build(row))  # the cut would land on an end-of-line or size token
    with pytest.raises(BuildConfigError, match="codes-per-image"):
        SequenceConfig(image_layout="shaped", codes_per_image=64)
