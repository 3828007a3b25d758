import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medmax.dataset_io import read_manifest, shard_paths
from medmax.images import load_image, preprocess
from medmax.sequence_dataset import RowRejected
from medmax.sequences import SequenceBuilder
from tokenization.build_sequences import main

EOT = "<reserved08706>"
N = 64  # codes per image: the tiny VQGAN's 8x8 grid


def codes(seed: int, n: int = N) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, n).tolist()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def image_tokens(tmp_path) -> Path:
    folder = tmp_path / "image_tokens"
    folder.mkdir()
    table = pa.table({"img_path": ["a.png", "b.png", "sub/c.png"], "img_tokens": [codes(1), codes(2), codes(3)]})
    pq.write_table(table, folder / "tokens-rank00000-part000000.parquet")
    return folder


MEDMAX = [
    {"text": "Is there a lesion?<image>" + EOT + "Yes.", "image_path": "a.png", "source": "pmc", "task": "vqa", "credential": "no"},
    {"text": "Compare <image> with <image>" + EOT + "The second.", "image_path": ["a.png", "b.png"], "source": "x", "task": 3},
    {"text": "Generate a chest radiograph." + EOT + "<image>", "image_path": ["sub/c.png"], "extra": {"nested": True}},
]


def read_rows(folder: Path) -> list[dict]:
    return [row for path in shard_paths(folder) for row in pq.read_table(path).to_pylist()]


def run(tmp_path, inputs, tokenizer, out="out", *extra):
    argv = ["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--output", str(tmp_path / out), "--no-progress", *extra]
    assert main(argv) == 0
    return tmp_path / out


def test_medmax_rows_with_image_tokens_folder(tmp_path, tiny_tokenizer, tiny_tokenizer_path, tiny_vocab, image_tokens):
    bad = ["{not json", {"text": "Q<image>" + EOT + "A", "image_path": "missing.png"}, {"question": "?"}, "true"]
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX + bad)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    manifest = read_manifest(out)
    assert manifest["special_ids"] == tiny_vocab.special_ids()
    assert manifest["tokenizer"] == str(tiny_tokenizer_path) and manifest["codes_per_image"] == N
    counts = manifest["counts"]
    assert (counts["rows_read"], counts["rows_written"], counts["rejected_total"]) == (7, 3, 4)
    assert counts["rejected"] == {"invalid_json": 2, "missing_image": 1, "unknown_format": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["kind"]) for e in errors] == [(4, "invalid_json"), (5, "missing_image"), (6, "unknown_format"), (7, "invalid_json")]
    assert all(e["file"] == str(src) for e in errors)
    rows = read_rows(out)
    table = {"a.png": codes(1), "b.png": codes(2), "sub/c.png": codes(3)}
    builder = SequenceBuilder(tiny_tokenizer)
    for row, source in zip(rows, MEDMAX):
        paths = source["image_path"] if isinstance(source["image_path"], list) else [source["image_path"]]
        expected = builder.build({"text": source["text"], "image_tokens": [table[p] for p in paths]})
        assert row["input_ids"] == expected.input_ids.tolist() and row["labels"] == expected.labels.tolist()
        assert row["length"] == len(row["input_ids"])
    assert [r["source"] for r in rows] == ["pmc", "x", None] and rows[1]["task"] == "3"
    stats = manifest["token_stats"]
    assert stats["total_tokens"] == sum(r["length"] for r in rows)
    assert stats["trained_tokens"] == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    assert stats["max_length"] == max(r["length"] for r in rows)


def test_rerun_overwrites_instead_of_appending(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    args = ("--image-tokens", str(image_tokens), "--rows-per-shard", "2")
    first = read_rows(run(tmp_path, [src], tiny_tokenizer_path, "out", *args))
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    second = read_rows(run(tmp_path, [src], tiny_tokenizer_path, "out", *args))
    assert len(first) == 3 and first == second
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == ["part-00000-0000.parquet", "part-00000-0001.parquet"]


def test_strict_fails_on_the_first_bad_row(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX + [{"text": "Q<image>" + EOT + "A", "image_path": "gone.png"}])
    with pytest.raises(RowRejected, match=r"in\.jsonl row 4: no image codes for path 'gone.png'"):
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--strict")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path / "out")


def test_json_literals_parse_and_rows_without_images_build(tmp_path, tiny_tokenizer_path):
    rows = ['{"text": "Is the scan normal?' + EOT + 'Yes.", "flag": true, "note": null}']
    out = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], tiny_tokenizer_path)
    assert read_manifest(out)["counts"]["rows_written"] == 1


def _png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_image_bytes_in_parquet_are_encoded_with_ckpt(tmp_path, tiny_tokenizer_path, tiny_vocab, tiny_vqgan, tiny_vqgan_dir):
    data = _png_bytes(0)
    conv = [{"role": "user", "content": "<image> Which organ?"}, {"role": "assistant", "content": "liver"}]
    src = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"conversations": conv, "modalities": [{"type": "image", "value": data}]}]), src)
    without = run(tmp_path, [src], tiny_tokenizer_path, "plain")
    assert read_manifest(without)["counts"]["rejected"] == {"missing_image": 1}
    assert "--ckpt" in (without / "errors.jsonl").read_text()
    out = run(tmp_path, [src], tiny_tokenizer_path, "coded", "--ckpt", str(tiny_vqgan_dir))
    (row,) = read_rows(out)
    expected = tiny_vqgan.encode_codes(preprocess(load_image(data), 64)[None])[0]
    ids = np.array(row["input_ids"])
    assert tiny_vocab.ids_to_codes(ids[tiny_vocab.is_image_code(ids)]).tolist() == expected.tolist()
    assert read_manifest(out)["codebook_size"] == 512


def test_workers_over_shards_give_the_single_process_output(tmp_path, tiny_tokenizer_path, image_tokens):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", MEDMAX[i:] + MEDMAX[:i]) for i in range(3)]
    one = run(tmp_path, [tmp_path / "in*.jsonl"], tiny_tokenizer_path, "one", "--image-tokens", str(image_tokens))
    two = run(tmp_path, files, tiny_tokenizer_path, "two", "--image-tokens", str(image_tokens), "--workers", "2")
    assert read_rows(one) == read_rows(two) and len(read_rows(one)) == 9
    assert read_manifest(one)["files"] == read_manifest(two)["files"]


def test_max_length_drops_are_counted(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--max-length", "40")
    counts = read_manifest(out)["counts"]
    assert counts["dropped_for_length"] == 3 and counts["rows_written"] == 0 and counts["rejected_total"] == 0
    assert {json.loads(line)["kind"] for line in (out / "errors.jsonl").read_text().splitlines()} == {"too_long"}


def test_mixed_code_counts_need_codes_per_image(tmp_path, tiny_tokenizer_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    pq.write_table(pa.table({"img_path": ["a.png", "b.png"], "img_tokens": [codes(1), codes(2, 16)]}),
                   folder / "tokens-rank00000-part000000.parquet")
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX[:2])
    with pytest.raises(ValueError, match="different code counts"):
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(folder))
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(folder), "--codes-per-image", str(N))
    assert read_manifest(out)["counts"]["rejected"] == {"wrong_code_count": 1}


def test_read_manifest_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match=r"manifest\.json: format is 'something-else'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "medmax-sequences", "version": 1}))
    with pytest.raises(ValueError, match="missing keys"):
        read_manifest(tmp_path)


def test_resume_keeps_finished_files_and_rebuilds_the_rest(tmp_path, tiny_tokenizer_path, image_tokens, caplog):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", MEDMAX + ["{bad"]) for i in range(2)]
    args = ("--image-tokens", str(image_tokens))
    out = run(tmp_path, files, tiny_tokenizer_path, "out", *args)
    full_rows, full_errors = read_rows(out), (out / "errors.jsonl").read_text()
    # An interrupted run: file 1 never finished (no completion record, a half-written shard).
    (out / "progress" / "done-00001.json").unlink()
    (out / "part-00001-0000.parquet").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    kept = (out / "part-00000-0000.parquet").stat().st_mtime_ns
    caplog.clear()
    run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--resume")
    assert "resume: 1 of 2 input files already built" in caplog.text
    assert (out / "part-00000-0000.parquet").stat().st_mtime_ns == kept
    assert read_rows(out) == full_rows and (out / "errors.jsonl").read_text() == full_errors
    assert read_manifest(out)["counts"]["rows_read"] == 8
    # Different settings: nothing is kept.
    caplog.clear()
    run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--resume", "--no-image-loss")
    assert "resume: 0 of 2" in caplog.text


def test_image_root_paths_are_encoded_and_kept_inside_the_root(tmp_path, tiny_tokenizer_path, tiny_vocab, tiny_vqgan, tiny_vqgan_dir, image_tokens):
    root = tmp_path / "images"
    (root / "new").mkdir(parents=True)
    (root / "new" / "d.png").write_bytes(_png_bytes(1))
    (tmp_path / "outside.png").write_bytes(_png_bytes(2))
    rows = [
        {"text": "Which organ?<image>" + EOT + "liver", "image_path": "new/d.png"},
        {"text": "Which organ?<image>" + EOT + "liver", "image_path": "a.png"},  # from --image-tokens
        {"text": "Which organ?<image>" + EOT + "liver", "image_path": "../outside.png"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens),
              "--ckpt", str(tiny_vqgan_dir), "--image-root", str(root))
    first, second = read_rows(out)
    expected = tiny_vqgan.encode_codes(preprocess(load_image(root / "new" / "d.png"), 64)[None])[0].tolist()
    ids = np.array(first["input_ids"])
    assert tiny_vocab.ids_to_codes(ids[tiny_vocab.is_image_code(ids)]).tolist() == expected
    ids = np.array(second["input_ids"])
    assert tiny_vocab.ids_to_codes(ids[tiny_vocab.is_image_code(ids)]).tolist() == codes(1)
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["row"] == 3 and "leaves --image-root" in error["reason"]
