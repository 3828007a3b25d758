"""tokenization.image_tokenize: exact codes, error reports, invariance to batching and world size, resume."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medmax.image_tokens import (
    folder_fingerprint,
    iter_image_tokens,
    partition_files,
    read_image_token_manifest,
    read_image_tokens,
)
from medmax.images import load_image, preprocess
from medmax.vqgan import VQGAN, save_vqgan
from medmax import image_tokenizing
from tokenization import image_tokenize
from tokenization.image_tokenize import main

REPO = Path(__file__).resolve().parents[2]
N_GOOD = 11
BAD = {
    "imgs/missing.png": "cannot read file",
    "../outside.png": "leaves the image root",
    "imgs/broken.png": "not a recognised image format",
    "": "empty image path",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A CSV of good images of assorted sizes and modes, interleaved with four bad rows."""
    root = tmp_path_factory.mktemp("images")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    good = []
    for i in range(N_GOOD):
        pixels = rng.integers(0, 256, (48 + 7 * i, 90 - 3 * i, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(("RGB", "L", "RGBA")[i % 3])
        image.save(root / "imgs" / f"{i}.png")
        good.append(f"imgs/{i}.png")
    (root / "imgs" / "broken.png").write_bytes(b"this is not a png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root.parent / "outside.png")
    rows = good[:4] + list(BAD)[:2] + good[4:8] + list(BAD)[2:] + good[8:]
    (root / "data.csv").write_text("img_path,caption\n" + "".join(f"{r},x\n" for r in rows))
    return root / "data.csv"


class Refused(Exception):
    """The run ended in its one error line (``medmax-image-tokenize: error: ...``, exit code 2), raised here to be matched."""


def _run(csv: Path, out: Path, ckpt: Path, *extra: str) -> int:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--input", str(csv), "--output", str(out), "--ckpt", str(ckpt), "--workers", "0", "--no-progress", *extra])
    if code == 2:
        assert err.getvalue().startswith("medmax-image-tokenize: error: ") and err.getvalue().count("\n") == 1, err.getvalue()
        raise Refused(err.getvalue())
    sys.stderr.write(err.getvalue())
    return code


def _errors(out: Path) -> dict[str, str]:
    lines = [json.loads(line) for p in sorted((out / "errors").glob("*.jsonl")) for line in p.read_text().splitlines()]
    return {e["img_path"]: e["reason"] for e in lines}


def _all_rows(out: Path) -> list[str]:
    return [path for path, _ in iter_image_tokens(out)]


def test_codes_are_the_vqgans_and_bad_rows_are_reported(dataset, tiny_vqgan, tiny_vqgan_dir, tmp_path):
    out = tmp_path / "out"
    assert _run(dataset, out, tiny_vqgan_dir, "--batch-size", "4", "--partition-size", "5") == 0
    tokens = read_image_tokens(out)
    assert sorted(tokens) == sorted(f"imgs/{i}.png" for i in range(N_GOOD))
    for path in ("imgs/0.png", "imgs/7.png"):
        pixels = preprocess(load_image(dataset.parent / path), tiny_vqgan.resolution)[None]
        assert tokens[path] == tiny_vqgan.encode_codes(pixels)[0].tolist()
    errors = _errors(out)
    assert set(errors) == set(BAD) and all(reason in errors[p] for p, reason in BAD.items())
    assert len(partition_files(out)) == 3  # 15 CSV rows in partitions of 5
    assert _run(dataset, tmp_path / "strict", tiny_vqgan_dir, "--strict") == 1


def test_rows_do_not_depend_on_batch_partition_or_workers(dataset, tiny_vqgan_dir, tmp_path):
    a = tmp_path / "a"
    _run(dataset, a, tiny_vqgan_dir, "--batch-size", "1", "--partition-size", "100")
    b = tmp_path / "b"
    main(["--input", str(dataset), "--output", str(b), "--ckpt", str(tiny_vqgan_dir), "--batch-size", "3",
          "--partition-size", "2", "--workers", "2", "--no-progress"])
    rows_b = _all_rows(b)
    assert len(rows_b) == len(set(rows_b)) == N_GOOD
    assert read_image_tokens(a) == read_image_tokens(b)
    assert _errors(a) == _errors(b)


def test_resume_after_a_crash_finishes_only_what_is_missing(dataset, tiny_vqgan_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    publish = image_tokenizing.PartitionWriter._publish
    calls = []

    def crash_on_third(self, k, part):
        calls.append(k)
        if len(calls) == 3:
            (out / f".tokens-rank00000-part{k:06d}.parquet.tmp").write_bytes(b"half-written")
            raise KeyboardInterrupt("killed")
        publish(self, k, part)

    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(dataset, out, tiny_vqgan_dir, "--partition-size", "3")
    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", publish)
    first = {p.name: p.stat().st_mtime_ns for p in partition_files(out)}
    assert len(first) == 2

    redone = []
    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", lambda self, k, part: (redone.append(k), publish(self, k, part)))
    assert _run(dataset, out, tiny_vqgan_dir, "--partition-size", "3") == 0
    assert sorted(redone) == [2, 3, 4]  # 15 rows in 5 partitions; 0 and 1 were finished before the crash
    assert {p.name: p.stat().st_mtime_ns for p in partition_files(out) if p.name in first} == first
    rows = _all_rows(out)
    assert len(rows) == len(set(rows)) == N_GOOD and set(_errors(out)) == set(BAD)

    with pytest.raises(Refused, match="--partition-size was 3, now 4"):  # a different cut would overlap the finished partitions
        _run(dataset, out, tiny_vqgan_dir, "--partition-size", "4")


def test_column_choice_and_readers_ignore_temporary_files(dataset, tiny_vqgan_dir, tmp_path):
    csv = tmp_path / "other.csv"
    csv.write_text("id,image_path\n1,imgs/0.png\n2,imgs/1.png\n")
    with pytest.raises(Refused, match="no img_path or image_path"):
        _run(_rewrite(csv, "id,file\n1,imgs/0.png\n"), tmp_path / "x", tiny_vqgan_dir)
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", str(dataset.parent)) == 0
    (out / ".tokens-rank00000-part000009.parquet.tmp").write_bytes(b"partial")
    assert sorted(read_image_tokens(out)) == ["imgs/0.png", "imgs/1.png"]
    table = pq.read_table(partition_files(out)[0])
    assert table.column_names == ["img_path", "img_tokens", "grid_h", "grid_w"] and len(table.column("img_tokens")[0]) == 64
    with pytest.raises(Refused, match="--column 'nope'"):
        _run(csv, tmp_path / "y", tiny_vqgan_dir, "--column", "nope")


def _rewrite(path: Path, text: str) -> Path:
    other = path.with_name("bad_columns.csv")
    other.write_text(text)
    return other


def test_untrusted_checkpoint_is_refused_naming_the_flag(dataset, tiny_vqgan, tmp_path):
    import argparse

    import yaml

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": tiny_vqgan.params}}))
    torch.save({"state_dict": tiny_vqgan.state_dict(), "args": argparse.Namespace(a=1)}, ckpt / "vqgan.ckpt")
    with pytest.raises(Refused, match="--trust-checkpoint"):
        _run(dataset, tmp_path / "out", ckpt)
    assert _run(dataset, tmp_path / "out", ckpt, "--trust-checkpoint") == 0


def test_bf16_gives_valid_codes_close_to_fp32(dataset, tiny_vqgan_dir, tmp_path):
    _run(dataset, tmp_path / "fp32", tiny_vqgan_dir)
    _run(dataset, tmp_path / "bf16", tiny_vqgan_dir, "--dtype", "bf16")
    exact, fast = read_image_tokens(tmp_path / "fp32"), read_image_tokens(tmp_path / "bf16")
    assert fast.keys() == exact.keys()
    agree = np.mean([a == b for k in exact for a, b in zip(exact[k], fast[k])])
    assert all(len(v) == 64 and 0 <= min(v) and max(v) < 512 for v in fast.values())
    assert agree > 0.5, agree


def _torchrun(dataset: Path, out: Path, ckpt: Path, program: list[str]) -> str:
    """Tokenize ``dataset`` with two torchrun processes; their stdout. Each rank must also have ended its
    process group's threads before it returned, or it can abort at exit (see tests/leaves_no_threads.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "leaves_no_threads.py"), *program,
           "--input", str(dataset), "--output", str(out), "--ckpt", str(ckpt), "--partition-size", "2",
           "--batch-size", "3", "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a hang takes the ranks down too
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 150 s: {stderr[-3000:]}")
    # rank 0's own message comes first; the launcher's traceback after it is the same on every failure
    assert proc.returncode == 0, stderr[:3000]
    return stdout


@pytest.mark.parametrize("program", [
    ["-m", "tokenization.image_tokenize"],
    # rank 0 loads its VQGAN 3 s late: rank 1 must not write partitions before rank 0 has checked the folder
    [str(Path(__file__).with_name("slow_rank0.py"))],
], ids=["torchrun", "rank0-late"])
def test_torchrun_two_processes_match_one(dataset, tiny_vqgan_dir, tmp_path, program):
    single = tmp_path / "single"
    _run(dataset, single, tiny_vqgan_dir, "--partition-size", "2")
    double = tmp_path / "double"
    stdout = _torchrun(dataset, double, tiny_vqgan_dir, program)
    ranks = {p.name.split("-")[1] for p in partition_files(double)}
    assert ranks == {"rank00000", "rank00001"}  # both processes wrote partitions
    rows = _all_rows(double)
    assert len(rows) == len(set(rows)) == N_GOOD
    assert read_image_tokens(double) == read_image_tokens(single)
    assert _errors(double) == _errors(single)
    assert "15 rows: 11 written, 4 failed" in stdout


# ------------------------------------------------------------------- resume: settings, weights, content


def _manifest(out: Path) -> dict:
    manifest = read_image_token_manifest(out)
    assert manifest is not None and manifest["complete"] is True
    rows = manifest["rows"]
    assert rows["input"] == rows["written"] + rows["failed"] + rows["duplicate"]  # every row counted once
    return manifest


def _good_csv(path: Path, indices) -> Path:
    path.write_text("img_path\n" + "".join(f"imgs/{i}.png\n" for i in indices))
    return path


def _published(monkeypatch) -> list[int]:
    """Record the partitions a run publishes."""
    publish, redone = image_tokenizing.PartitionWriter._publish, []
    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", lambda self, k, part: (redone.append(k), publish(self, k, part)))
    return redone


def test_a_resume_with_any_setting_that_changes_codes_is_refused(dataset, tiny_vqgan, tiny_vqgan_dir, tmp_path):
    """Issue 11: --dtype, --channels-last and --frame were not in the manifest; a bf16 restart mixed codes."""
    out = tmp_path / "out"
    assert _run(dataset, out, tiny_vqgan_dir, "--partition-size", "5") == 0
    settings = _manifest(out)["settings"]
    assert settings["dtype"] == "fp32" and settings["vqgan_digest"] == tiny_vqgan.codes_digest()
    for flag in (["--dtype", "bf16"], ["--channels-last"], ["--frame", "1"], ["--max-image-pixels", "1000000"],
                 ["--max-aspect-ratio", "5"], ["--partition-size", "4"]):
        with pytest.raises(Refused, match=rf"holds image tokens made with other settings: {flag[0]} was .*, now "):
            _run(dataset, out, tiny_vqgan_dir, "--partition-size", "5", *flag)


def test_the_vqgan_is_known_by_its_weights_not_its_path(dataset, tiny_vqgan, tiny_vqgan_dir, tmp_path, monkeypatch):
    out, ckpt = tmp_path / "out", tmp_path / "vqgan"
    shutil.copytree(tiny_vqgan_dir, ckpt)
    assert _run(dataset, out, ckpt, "--partition-size", "5") == 0
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    redone = _published(monkeypatch)
    assert _run(dataset, out, moved, "--partition-size", "5") == 0 and redone == []  # same weights elsewhere: all done
    torch.manual_seed(99)
    save_vqgan(VQGAN.from_params(tiny_vqgan.params), ckpt)  # other weights at the same path
    with pytest.raises(Refused, match=r"--ckpt \(the VQGAN's weights\) was [0-9a-f]{12}.*, now [0-9a-f]{12}"):
        _run(dataset, out, ckpt, "--partition-size", "5")


def test_appended_rows_are_tokenized_on_rerun(dataset, tiny_vqgan_dir, tmp_path, monkeypatch, capsys):
    """Issue 12: a finished run, 10 rows appended, the same command: "tokenized 0 images", exit 0 even with --strict."""
    csv, root = _good_csv(tmp_path / "data.csv", range(8)), str(dataset.parent)
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3", "--strict") == 0
    before = {p.name: p.stat().st_mtime_ns for p in partition_files(out)}
    with open(csv, "a") as f:
        f.write("imgs/8.png\nimgs/9.png\nimgs/missing.png\nimgs/10.png\n")
    redone = _published(monkeypatch)
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3", "--strict") == 1  # the missing one
    assert sorted(redone) == [2, 3]  # the partial last partition and the new one; 0 and 1 are kept as they were
    kept = [p for p in partition_files(out) if p.name.endswith(("part000000.parquet", "part000001.parquet"))]
    assert len(kept) == 2 and all(p.stat().st_mtime_ns == before[p.name] for p in kept)
    assert sorted(read_image_tokens(out)) == sorted(f"imgs/{i}.png" for i in range(11))
    assert list(_errors(out)) == ["imgs/missing.png"]
    assert _manifest(out)["rows"] == {"input": 12, "written": 11, "failed": 1, "duplicate": 0}
    assert "12 rows: 11 written, 1 failed" in capsys.readouterr().out


def test_rows_edited_out_after_a_kill_lose_nothing(dataset, tiny_vqgan_dir, tmp_path, monkeypatch):
    """Issue 12: a run killed mid-way, rows edited out of the CSV, rerun: three good rows were lost."""
    csv, root, out = _good_csv(tmp_path / "data.csv", range(11)), str(dataset.parent), tmp_path / "out"
    publish, calls = image_tokenizing.PartitionWriter._publish, []

    def crash_on_third(self, k, part):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        publish(self, k, part)

    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3")
    monkeypatch.setattr(image_tokenizing.PartitionWriter, "_publish", publish)
    kept = [0, 2, 3, 5, 6, 8, 9, 10]
    _good_csv(csv, kept)  # rows 1, 4 and 7 edited out: every later row moves to another partition
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3") == 0
    rows = _all_rows(out)
    assert sorted(rows) == sorted(f"imgs/{i}.png" for i in kept) and len(rows) == len(set(rows))
    assert _manifest(out)["rows"] == {"input": 8, "written": 8, "failed": 0, "duplicate": 0}


def test_shrinking_the_csv_removes_partitions_past_its_end(dataset, tiny_vqgan_dir, tmp_path):
    csv, root, out = _good_csv(tmp_path / "data.csv", ["missing", *range(1, 9)]), str(dataset.parent), tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3") == 0
    assert list(_errors(out)) == ["imgs/missing.png"] and len(partition_files(out)) == 3
    _good_csv(csv, range(4))
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", root, "--partition-size", "3") == 0
    assert sorted(_all_rows(out)) == sorted(f"imgs/{i}.png" for i in range(4)) and _errors(out) == {}
    assert len(partition_files(out)) == 2 and _manifest(out)["rows"]["input"] == 4


def test_the_same_csv_elsewhere_resumes_without_redoing_anything(dataset, tiny_vqgan_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _run(dataset, out, tiny_vqgan_dir, "--partition-size", "5") == 0
    fingerprint = folder_fingerprint(out)
    copy = tmp_path / "copy.csv"
    copy.write_bytes(dataset.read_bytes())
    redone = _published(monkeypatch)
    assert _run(copy, out, tiny_vqgan_dir, "--partition-size", "5", "--image-root", str(dataset.parent)) == 0
    assert redone == [] and folder_fingerprint(out) == fingerprint
    assert fingerprint["rows"] == {"input": 15, "written": 11, "failed": 4, "duplicate": 0}


def test_duplicate_paths_are_tokenized_once_and_counted(dataset, tiny_vqgan_dir, tmp_path):
    csv = tmp_path / "dups.csv"
    csv.write_text("img_path\nimgs/0.png\nimgs/1.png\nimgs/0.png\nimgs/missing.png\nimgs/missing.png\nimgs/2.png\n")
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", str(dataset.parent), "--partition-size", "2") == 0
    rows = _all_rows(out)
    assert sorted(rows) == ["imgs/0.png", "imgs/1.png", "imgs/2.png"] and len(rows) == 3
    assert len((out / "errors" / "part000001.jsonl").read_text().splitlines()) == 1
    assert _manifest(out)["rows"] == {"input": 6, "written": 3, "failed": 1, "duplicate": 2}


def test_invalid_utf8_in_a_row_is_that_rows_error(dataset, tiny_vqgan_dir, tmp_path):
    """Issue 12: invalid UTF-8 in one CSV row aborted the whole run."""
    csv = tmp_path / "bytes.csv"
    csv.write_bytes(b"img_path,caption\nimgs/0.png,ok\nimgs/\xff1.png,x\nimgs/2.png,caf\xe9 in another column\n")
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", str(dataset.parent)) == 0
    assert sorted(read_image_tokens(out)) == ["imgs/0.png", "imgs/2.png"]
    errors = _errors(out)
    assert list(errors) == ["imgs/\\xff1.png"] and "not valid UTF-8" in errors["imgs/\\xff1.png"]


def test_hostile_images_are_failed_rows_that_never_take_down_their_batch(dataset, tiny_vqgan_dir, tmp_path, monkeypatch):
    """Issue 12: an image too large for memory crashed its partition and every later one."""
    root = tmp_path / "root"
    shutil.copytree(dataset.parent / "imgs", root / "imgs")
    Image.new("L", (1, 100_000), 128).save(root / "imgs" / "strip.png")  # a few hundred bytes; 2 GB in the old resize
    Image.new("RGB", (400, 300), (9, 9, 9)).save(root / "imgs" / "big.png")
    shutil.copy(root / "imgs" / "3.png", root / "imgs" / "boom.png")
    load = image_tokenizing.load_image

    def out_of_memory_on_boom(source, **kwargs):
        if str(source).endswith("boom.png"):
            raise MemoryError
        return load(source, **kwargs)

    monkeypatch.setattr(image_tokenizing, "load_image", out_of_memory_on_boom)
    csv = _good_csv(tmp_path / "data.csv", [0, "strip", 1, "big", "boom", 2, 4])
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", str(root), "--batch-size", "8", "--partition-size", "3",
                "--max-image-pixels", "100000") == 0
    assert sorted(read_image_tokens(out)) == ["imgs/0.png", "imgs/1.png", "imgs/2.png", "imgs/4.png"]
    errors = _errors(out)
    assert "aspect ratio 100000 is over the limit of 20" in errors["imgs/strip.png"] and "--max-aspect-ratio" in errors["imgs/strip.png"]
    assert "120,000 pixels, over the limit of 100,000" in errors["imgs/big.png"]
    assert "MemoryError" in errors["imgs/boom.png"]
    assert _manifest(out)["rows"] == {"input": 7, "written": 4, "failed": 3, "duplicate": 0}


def test_a_broken_checkpoint_is_not_called_untrusted(dataset, tiny_vqgan, tmp_path):
    import yaml

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": tiny_vqgan.params}}))
    torch.save({"state_dict": tiny_vqgan.state_dict()}, ckpt / "vqgan.ckpt")
    data = (ckpt / "vqgan.ckpt").read_bytes()
    (ckpt / "vqgan.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(Refused, match=r"vqgan\.ckpt: truncated or corrupt") as info:
        _run(dataset, tmp_path / "out", ckpt)
    assert "trust" not in str(info.value)
    huge = {**tiny_vqgan.params, "n_embed": 10**10}
    (ckpt / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": huge}}))
    with pytest.raises(Refused, match=r"--skip-memory-check"):
        _run(dataset, tmp_path / "out", ckpt)


def test_default_batch_size_is_chosen_per_device_and_recorded(dataset, tiny_vqgan_dir, tmp_path):
    """On CPU a forward pass takes one image unless --batch-size says otherwise (see DEFAULT_BATCH_SIZE)."""
    _run(dataset, tmp_path / "default", tiny_vqgan_dir)
    _run(dataset, tmp_path / "given", tiny_vqgan_dir, "--batch-size", "3")
    summary = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("default", "given")}
    assert summary["default"]["batch_size"] == image_tokenizing.DEFAULT_BATCH_SIZE["cpu"] == 1
    assert summary["given"]["batch_size"] == 3
    assert read_image_tokens(tmp_path / "default") == read_image_tokens(tmp_path / "given")  # fp32: batching is invisible
    assert "1 on cpu" in image_tokenize.build_parser().format_help()


def test_aspect_keep_stores_each_grid_and_the_vqgans_codes(dataset, tiny_vqgan, tiny_vqgan_dir, tmp_path):
    from medmax.image_layout import grid_budget, pick_grid

    out = tmp_path / "keep"
    _run(dataset, out, tiny_vqgan_dir, "--aspect", "keep", "--resolution", "64", "--batch-size", "4")
    grids = read_image_tokens(out, grids=True)
    flat = read_image_tokens(out)
    shapes = set()
    for path, codes in grids.items():
        image = load_image(dataset.parent / path)
        assert codes.shape == pick_grid(image.width, image.height, grid_budget(64, 8))
        pixels = preprocess(image, 64, keep_aspect_factor=8)[None]
        assert codes.reshape(-1).tolist() == tiny_vqgan.encode_codes(pixels)[0].tolist() == flat[path]
        shapes.add(codes.shape)
    assert len(shapes) > 2  # the images' sizes vary: several grids, batched together
    manifest = read_image_token_manifest(out)
    assert manifest["version"] == 3 and manifest["settings"]["aspect"] == "keep"
    assert sum(manifest["grids"].values()) == N_GOOD
    assert {tuple(map(int, k.split("x"))) for k in manifest["grids"]} == shapes
    with pytest.raises(Refused, match="--aspect"):  # a resume with the other aspect would mix grids
        _run(dataset, out, tiny_vqgan_dir, "--resolution", "64")


def test_square_default_records_square_grids(dataset, tiny_vqgan_dir, tmp_path):
    out = tmp_path / "square"
    _run(dataset, out, tiny_vqgan_dir)
    assert {c.shape for c in read_image_tokens(out, grids=True).values()} == {(8, 8)}
    assert read_image_token_manifest(out)["grids"] == {"8x8": N_GOOD}
