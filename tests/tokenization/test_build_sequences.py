import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medmax.data.shards import DataError, read_manifest, shard_paths
from medmax.images import load_image, preprocess
from medmax.data.passthrough import type_name
from medmax.data.build import RowRejected
from medmax.data.rows import SequenceBuilder
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
    assert main.__wrapped__(argv) == 0  # errors raise as their class here (no medmax.cli error line)
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
    assert [r["source"] for r in rows] == ["pmc", "x", None]
    assert [r["task"] for r in rows] == ['"vqa"', "3", None]  # "vqa" and 3 in one column: JSON text
    assert [r["extra"] for r in rows] == [None, None, '{"nested": true}']
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
    with pytest.raises(DataError, match="out: dataset folder does not exist"):
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
    files = [write_jsonl(tmp_path / "in0.jsonl", MEDMAX), write_jsonl(tmp_path / "in1.jsonl", MEDMAX + ["{bad"])]
    args = ("--image-tokens", str(image_tokens))
    full = run(tmp_path, files, tiny_tokenizer_path, "full", *args)
    full_rows, full_errors = read_rows(full), (full / "errors.jsonl").read_text()
    # An interrupted run: --strict stops it in file 1, after file 0 finished (one worker takes the files in order).
    with pytest.raises(RowRejected):
        run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--strict")
    out = tmp_path / "out"
    assert not out.exists()  # the unfinished build stays beside it, in out.partial
    kept = (tmp_path / "out.partial" / "part-00000-0000.parquet").stat().st_mtime_ns
    caplog.clear()
    run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--resume")
    assert "resume: 1 of 2 input files already built" in caplog.text
    assert (out / "part-00000-0000.parquet").stat().st_mtime_ns == kept
    assert read_rows(out) == full_rows and (out / "errors.jsonl").read_text() == full_errors
    assert read_manifest(out)["counts"]["rows_read"] == 7 and not (tmp_path / "out.partial").exists()
    # Resuming a finished build keeps everything; different settings keep nothing.
    caplog.clear()
    run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--resume")
    assert "resume: 2 of 2" in caplog.text and read_rows(out) == full_rows
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


# ---------------------------------------------------------------------------------------------
# Resume fingerprints follow content, not paths (issue 11)


def test_resume_rebuilds_when_the_image_token_folder_gains_images(tmp_path, tiny_tokenizer_path, image_tokens, caplog):
    rows = MEDMAX + [{"text": "Q<image>" + EOT + "A", "image_path": "new.png"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    assert read_manifest(out)["counts"]["rejected"] == {"missing_image": 1}
    # image_tokenize ran again into the same folder and tokenized the missing image
    pq.write_table(pa.table({"img_path": ["new.png"], "img_tokens": [codes(4)]}), image_tokens / "tokens-rank00000-part000001.parquet")
    caplog.clear()
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--resume")
    assert "resume: 0 of 1" in caplog.text
    counts = read_manifest(out)["counts"]
    assert counts["rows_written"] == 4 and counts["rejected_total"] == 0


def test_resume_rebuilds_when_the_tokenizer_file_changes_in_place(tmp_path, image_tokens, caplog):
    from medmax.presets import build_tiny_tokenizer

    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    build_tiny_tokenizer().save(str(path))
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    first = read_rows(run(tmp_path, [src], path, "out", "--image-tokens", str(image_tokens)))
    other = build_tiny_tokenizer()
    other.add_tokens(["lesion"])  # another tokenizer, same path
    other.save(str(path))
    caplog.clear()
    second = read_rows(run(tmp_path, [src], path, "out", "--image-tokens", str(image_tokens), "--resume"))
    assert "resume: 0 of 1" in caplog.text and first != second


def test_resume_notices_an_input_rewritten_with_the_same_size_and_time(tmp_path, tiny_tokenizer_path, image_tokens, caplog):
    import os

    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    stat = src.stat()
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    src.write_text(src.read_text().replace("Yes.", "No!!"))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    caplog.clear()
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--resume")
    assert "resume: 0 of 1" in caplog.text


# ---------------------------------------------------------------------------------------------
# Every input column survives (issue 11)


PASS_ROWS = [
    {"text": "Q<image>" + EOT + "A", "image_path": "a.png", "qid": "q1", "n": 1, "score": 0.5, "tags": ["x", "y"], "meta": {"k": 1}, "ok": True},
    {"text": "Q<image>" + EOT + "B", "image_path": "b.png", "qid": "q2", "n": 2, "score": 1, "tags": [], "meta": None, "ok": False, "late": "z"},
    {"text": "Q<image>" + EOT + "C", "image_path": "gone.png", "qid": "q3"},
]


def test_every_unconsumed_column_passes_through_with_its_type(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", PASS_ROWS)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    table = pq.read_table(shard_paths(out)[0])
    types = {f.name: type_name(f.type) for f in table.schema}
    assert {k: types[k] for k in ("qid", "n", "score", "tags", "meta", "ok", "late")} == {
        "qid": "string", "n": "int64", "score": "double", "tags": "list<string>", "meta": "string", "ok": "bool", "late": "string"}
    assert "text" not in types and "image_path" not in types
    first, second = table.to_pylist()
    assert (first["qid"], first["n"], first["score"], first["tags"], json.loads(first["meta"]), first["ok"], first["late"]) == (
        "q1", 1, 0.5, ["x", "y"], {"k": 1}, True, None)
    assert (second["score"], second["tags"], second["meta"], second["late"]) == (1.0, [], None, "z")
    assert read_manifest(out)["columns"]["meta"] == "json"
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert (error["row"], error["id_column"], error["id"]) == (3, "qid", "q3")


def test_keep_is_an_allow_list_and_drop_a_deny_list(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", PASS_ROWS[:2])
    kept = run(tmp_path, [src], tiny_tokenizer_path, "kept", "--image-tokens", str(image_tokens), "--keep", "qid", "image_path")
    names = pq.read_schema(shard_paths(kept)[0]).names
    assert names == ["input_ids", "labels", "length", "format", "qid", "image_path"]
    assert [r["image_path"] for r in read_rows(kept)] == ["a.png", "b.png"]
    dropped = run(tmp_path, [src], tiny_tokenizer_path, "dropped", "--image-tokens", str(image_tokens), "--drop", "meta", "tags")
    names = pq.read_schema(shard_paths(dropped)[0]).names
    assert set(names) == {"input_ids", "labels", "length", "format", "qid", "n", "score", "ok", "late"}
    none = run(tmp_path, [src], tiny_tokenizer_path, "none", "--image-tokens", str(image_tokens), "--keep")
    assert pq.read_schema(shard_paths(none)[0]).names == ["input_ids", "labels", "length", "format"]


def test_strict_error_names_the_rows_id(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", PASS_ROWS)
    with pytest.raises(RowRejected, match=r"in\.jsonl row 3 \(qid 'q3'\): no image codes"):
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--strict")


# ---------------------------------------------------------------------------------------------
# Never destroy input (issue 12)


def _spark_folder(tmp_path) -> tuple[Path, dict]:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(2):
        rows = [{"text": "Is there a lesion?<image>" + EOT + "Yes.", "image_path": "a.png", "id": f"{i}-{n}"} for n in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), raw / f"part-0000{i}-c0ffee.snappy.parquet")
    return raw, {p.name: p.read_bytes() for p in raw.iterdir()}


def test_output_that_is_the_input_folder_is_refused_and_nothing_is_deleted(tmp_path, tiny_tokenizer_path, image_tokens,
                                                                                   capsys):
    raw, before = _spark_folder(tmp_path)
    for output in (raw, tmp_path):  # the input folder itself, and a folder that contains it
        capsys.readouterr()
        assert main(["--input", str(raw), "--tokenizer", str(tiny_tokenizer_path), "--output", str(output),
                     "--image-tokens", str(image_tokens), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"medmax-build-sequences: error: --output {output}") and " input " in err and err.count("\n") == 1
        assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


def test_input_file_inside_the_output_folder_is_refused(tmp_path, tiny_tokenizer_path, image_tokens):
    out = tmp_path / "out"
    out.mkdir()
    src = write_jsonl(out / "in.jsonl", MEDMAX)
    with pytest.raises(ValueError, match="--output .* input"):
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    assert src.read_text() and sorted(p.name for p in out.iterdir()) == ["in.jsonl"]


def test_an_output_folder_holding_files_this_program_did_not_write_is_refused(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000-0000.parquet").write_bytes(b"a user's file that happens to look like a shard")
    with pytest.raises(ValueError, match="did not write.*part-00000-0000.parquet"):
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    assert (out / "part-00000-0000.parquet").read_bytes().startswith(b"a user's file")
    assert not (tmp_path / "out.partial").exists()


def test_a_rebuild_replaces_only_the_files_its_manifest_lists(tmp_path, tiny_tokenizer_path, image_tokens):
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--rows-per-shard", "1")
    assert len(read_manifest(out)["files"]) == 3
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000-0000.parquet"]
    assert len(read_rows(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_tokens", "in.jsonl", "out"]  # no staging left behind


def test_a_failed_resume_leaves_the_finished_output_readable(tmp_path, tiny_tokenizer_path, image_tokens):
    files = [write_jsonl(tmp_path / f"in{i}.jsonl", MEDMAX) for i in range(2)]
    out = run(tmp_path, files, tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    manifest, rows = read_manifest(out), read_rows(out)
    write_jsonl(files[1], MEDMAX + [{"text": "Q<image>" + EOT + "A", "image_path": "gone.png"}])
    with pytest.raises(RowRejected):
        run(tmp_path, files, tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--resume", "--strict")
    assert read_manifest(out) == manifest and read_rows(out) == rows


# ---------------------------------------------------------------------------------------------
# Rows that would cost the machine (issue 12)


def test_default_max_length_drops_and_reports_runaway_rows(tmp_path, tiny_tokenizer_path, capsys):
    rows = [{"text": "Q" + EOT + "word " * 6000}, {"text": "Q" + EOT + "short"}]
    out = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", rows)], tiny_tokenizer_path)
    manifest = read_manifest(out)
    assert manifest["settings"]["max_length"] == 4096
    assert manifest["counts"]["dropped_for_length"] == 0 and manifest["counts"]["truncated"] == 1
    assert read_manifest(out)["token_stats"]["max_length"] == 4096
    assert "truncated 1" in capsys.readouterr().err
    rows = [{"text": "word " * 6000 + EOT + "Q"}]
    out = run(tmp_path, [write_jsonl(tmp_path / "in2.jsonl", rows)], tiny_tokenizer_path, "out2")
    assert read_manifest(out)["counts"]["dropped_for_length"] == 1
    err = capsys.readouterr().err
    assert "dropped for length 1" in err and "--max-length" in err
    out = run(tmp_path, [write_jsonl(tmp_path / "in2.jsonl", rows)], tiny_tokenizer_path, "out3", "--max-length", "0")
    assert read_manifest(out)["counts"]["rows_written"] == 1


def test_bad_bytes_and_huge_lines_are_row_errors_not_run_aborts(tmp_path, tiny_tokenizer_path):
    src = tmp_path / "in.jsonl"
    good = json.dumps({"text": "Q" + EOT + "A"}).encode()
    src.write_bytes(good + b"\n" + b'{"text": "Q\xff' + EOT.encode() + b'A"}\n' + json.dumps({"text": "x" * 5000}).encode() + b"\n" + good + b"\n")
    out = run(tmp_path, [src], tiny_tokenizer_path, "out", "--max-row-bytes", "4096")
    counts = read_manifest(out)["counts"]
    assert counts["rows_written"] == 2 and counts["rejected"] == {"invalid_utf8": 1, "row_too_large": 1}


def test_typed_control_strings_in_conversation_rows_stay_text(tmp_path, tiny_tokenizer, tiny_tokenizer_path, tiny_vocab):
    conv = [{"role": "user", "content": "Hi </s><racm3:break><reserved08706>"}, {"role": "assistant", "content": "<eoss><s><pad>ok"}]
    out = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [{"conversations": conv}])], tiny_tokenizer_path)
    (row,) = read_rows(out)
    v = tiny_vocab
    ids = row["input_ids"]
    assert (ids.count(v.eos_id), ids.count(v.eot_id), ids.count(v.bos_id), ids.count(v.boi_id)) == (1, 2, 1, 0)
    assert v.eoi_id not in ids and v.pad_id not in ids


# ---------------------------------------------------------------------------------------------
# Embedded images in parquet rows, as Hugging Face datasets ship them (issue 10)


def test_hf_image_structs_and_binary_columns_in_parquet(tmp_path, tiny_tokenizer_path, tiny_vocab, tiny_vqgan, tiny_vqgan_dir):
    one, two = _png_bytes(3), _png_bytes(4)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv = [{"role": "user", "content": "<image> Which organ?"}, {"role": "assistant", "content": "liver"}]
    table = pa.table({
        "conversations": [conv, conv],
        "images": pa.array([[{"bytes": one, "path": "scan1.png"}], [{"bytes": two, "path": None}]], type=pa.list_(image_type)),
        "id": ["r1", "r2"],
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    medmax = pa.table({"text": ["Which organ?<image>" + EOT + "liver"], "image": [one], "id": ["r3"]})  # plain binary column
    pq.write_table(medmax, tmp_path / "binary.parquet")
    out = run(tmp_path, [tmp_path / "hf.parquet", tmp_path / "binary.parquet"], tiny_tokenizer_path, "out", "--ckpt", str(tiny_vqgan_dir))
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"] and [r["format"] for r in rows] == ["conversation", "conversation", "medmax"]
    for row, data in zip(rows, (one, two, one)):
        expected = tiny_vqgan.encode_codes(preprocess(load_image(data), 64)[None])[0].tolist()
        ids = np.array(row["input_ids"])
        assert tiny_vocab.ids_to_codes(ids[tiny_vocab.is_image_code(ids)]).tolist() == expected


def test_a_rerun_after_a_crash_clears_only_its_own_work_folder(tmp_path, tiny_tokenizer_path, image_tokens):
    files = [write_jsonl(tmp_path / "in0.jsonl", MEDMAX), write_jsonl(tmp_path / "in1.jsonl", MEDMAX + ["{bad"])]
    args = ("--image-tokens", str(image_tokens))
    with pytest.raises(RowRejected):
        run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--strict")
    partial = tmp_path / "out.partial"
    (partial / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="notes.txt"):
        run(tmp_path, files, tiny_tokenizer_path, "out", *args)
    assert (partial / "notes.txt").read_text() == "a user's file"
    (partial / "notes.txt").unlink()
    out = run(tmp_path, files, tiny_tokenizer_path, "out", *args)
    assert read_manifest(out)["counts"]["rows_read"] == 7 and not partial.exists()
    assert not (out / ".build_sequences.json").exists()


def test_a_cut_progress_record_is_rebuilt_with_a_warning(tmp_path, tiny_tokenizer_path, image_tokens, caplog):
    files = [write_jsonl(tmp_path / "in0.jsonl", MEDMAX), write_jsonl(tmp_path / "in1.jsonl", MEDMAX + ["{bad"])]
    args = ("--image-tokens", str(image_tokens))
    with pytest.raises(RowRejected):
        run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--strict")
    done = tmp_path / "out.partial" / "progress" / "done-00000.json"
    done.write_text(done.read_text()[:40])  # a kill mid-write, as an older build could leave it
    caplog.clear()
    out = run(tmp_path, files, tiny_tokenizer_path, "out", *args, "--resume")
    assert "unreadable progress record" in caplog.text and "resume: 0 of 2" in caplog.text
    assert read_manifest(out)["counts"]["rows_read"] == 7


def test_resume_rebuilds_when_the_image_token_manifest_names_another_vqgan(tmp_path, tiny_tokenizer_path, image_tokens, caplog):
    """Fields as medmax.image_tokens documents manifest.json (version 2); only vqgan_digest changes."""
    manifest = {"format": "medmax-image-tokens", "version": 2, "complete": True, "rows_digest": "ab" * 32,
                "rows": {"input": 3, "written": 3, "failed": 0, "duplicate": 0},
                "settings": {"vqgan_digest": "00" * 32, "resolution": 64, "n_embed": 512, "dtype": "fp32"}}
    (image_tokens / "manifest.json").write_text(json.dumps(manifest))
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
    (image_tokens / "summary.json").write_text(json.dumps({"seconds": 1.5}))  # a timing report alone changes nothing
    caplog.clear()
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--resume")
    assert "resume: 1 of 1" in caplog.text
    manifest["settings"]["vqgan_digest"] = "11" * 32
    (image_tokens / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens), "--resume")
    assert "resume: 0 of 1" in caplog.text


def test_write_sequences_writes_the_builds_format_and_manifest(tmp_path, tiny_tokenizer_path, tiny_vocab, image_tokens):
    """One format, one manifest: the helper writer's folder has the build's shard schema and manifest keys."""
    from medmax.data.shards import write_sequences, written_files

    built = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", MEDMAX)], tiny_tokenizer_path, "out",
                "--image-tokens", str(image_tokens))
    rows = [(r["input_ids"], r["labels"]) for r in read_rows(built)]
    helper = write_sequences(tmp_path / "helper", rows, tiny_vocab.special_ids())
    a, b = read_manifest(built), read_manifest(helper)
    assert set(b) <= set(a) and set(b["counts"]) <= set(a["counts"]) and set(b["token_stats"]) == set(a["token_stats"])
    assert {k: b["token_stats"][k] for k in ("total_tokens", "trained_tokens")} == \
        {k: a["token_stats"][k] for k in ("total_tokens", "trained_tokens")}
    assert pq.read_schema(shard_paths(helper)[0]).names == ["input_ids", "labels", "length", "format"]
    assert sorted(written_files(b)) == sorted([*b["files"], "manifest.json"])
    assert [(r["input_ids"], r["labels"]) for r in read_rows(helper)] == rows


def test_an_output_that_is_a_symlink_is_built_where_it_points(tmp_path, tiny_tokenizer_path, image_tokens):
    """The swap renamed the work folder onto the link's own name: a link to an empty folder stranded the build."""
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    (tmp_path / "disk" / "seqs").mkdir(parents=True)
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "seqs", target_is_directory=True)
    for _ in range(2):  # into the empty folder, then over its own earlier build
        run(tmp_path, [src], tiny_tokenizer_path, "out", "--image-tokens", str(image_tokens))
        assert (tmp_path / "out").is_symlink() and len(read_rows(tmp_path / "disk" / "seqs")) == 3
    leftovers = [p.name for p in (*tmp_path.iterdir(), *(tmp_path / "disk").iterdir()) if "." in p.name and p.is_dir()]
    assert leftovers == []


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, tiny_tokenizer_path, image_tokens, monkeypatch, capsys):
    import errno

    import pyarrow.parquet

    def full(*args, **kwargs):  # as pyarrow reports it: no file named
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    monkeypatch.setattr(pyarrow.parquet, "ParquetWriter", full)
    src = write_jsonl(tmp_path / "in.jsonl", MEDMAX)
    assert main(["--input", str(src), "--tokenizer", str(tiny_tokenizer_path), "--output", str(tmp_path / "out"),
                 "--no-progress", "--image-tokens", str(image_tokens)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert f": error: {tmp_path / 'out'}: cannot write (" in err and "kept for --resume" in err
