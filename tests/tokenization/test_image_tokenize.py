"""tokenization.image_tokenize: exact codes, error reports, invariance to batching and world size, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medmax.image_tokens import iter_image_tokens, partition_files, read_image_tokens
from medmax.images import load_image, preprocess
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


def _run(csv: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return main(["--input", str(csv), "--output", str(out), "--ckpt", str(ckpt), "--workers", "0", "--no-progress", *extra])


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
    publish = image_tokenize.PartitionWriter._publish
    calls = []

    def crash_on_third(self, k, part):
        calls.append(k)
        if len(calls) == 3:
            (out / f".tokens-rank00000-part{k:06d}.parquet.tmp").write_bytes(b"half-written")
            raise KeyboardInterrupt("killed")
        publish(self, k, part)

    monkeypatch.setattr(image_tokenize.PartitionWriter, "_publish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(dataset, out, tiny_vqgan_dir, "--partition-size", "3")
    monkeypatch.setattr(image_tokenize.PartitionWriter, "_publish", publish)
    first = {p.name: p.stat().st_mtime_ns for p in partition_files(out)}
    assert len(first) == 2

    redone = []
    monkeypatch.setattr(image_tokenize.PartitionWriter, "_publish", lambda self, k, part: (redone.append(k), publish(self, k, part)))
    assert _run(dataset, out, tiny_vqgan_dir, "--partition-size", "3") == 0
    assert sorted(redone) == [2, 3, 4]  # 15 rows in 5 partitions; 0 and 1 were finished before the crash
    assert {p.name: p.stat().st_mtime_ns for p in partition_files(out) if p.name in first} == first
    rows = _all_rows(out)
    assert len(rows) == len(set(rows)) == N_GOOD and set(_errors(out)) == set(BAD)

    with pytest.raises(SystemExit, match="partition_size"):  # a different cut would overlap the finished partitions
        _run(dataset, out, tiny_vqgan_dir, "--partition-size", "4")


def test_column_choice_and_readers_ignore_temporary_files(dataset, tiny_vqgan_dir, tmp_path):
    csv = tmp_path / "other.csv"
    csv.write_text("id,image_path\n1,imgs/0.png\n2,imgs/1.png\n")
    with pytest.raises(SystemExit, match="no img_path or image_path"):
        _run(_rewrite(csv, "id,file\n1,imgs/0.png\n"), tmp_path / "x", tiny_vqgan_dir)
    out = tmp_path / "out"
    assert _run(csv, out, tiny_vqgan_dir, "--image-root", str(dataset.parent)) == 0
    (out / ".tokens-rank00000-part000009.parquet.tmp").write_bytes(b"partial")
    assert sorted(read_image_tokens(out)) == ["imgs/0.png", "imgs/1.png"]
    table = pq.read_table(partition_files(out)[0])
    assert table.column_names == ["img_path", "img_tokens"] and len(table.column("img_tokens")[0]) == 64
    with pytest.raises(SystemExit, match="--column 'nope'"):
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
    with pytest.raises(SystemExit, match="--trust-checkpoint"):
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


def test_torchrun_two_processes_match_one(dataset, tiny_vqgan_dir, tmp_path):
    single = tmp_path / "single"
    _run(dataset, single, tiny_vqgan_dir, "--partition-size", "2")
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tokenization.image_tokenize", "--input", str(dataset), "--output", str(double),
           "--ckpt", str(tiny_vqgan_dir), "--partition-size", "2", "--batch-size", "3", "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a hang takes the ranks down too
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 150 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    ranks = {p.name.split("-")[1] for p in partition_files(double)}
    assert ranks == {"rank00000", "rank00001"}  # both processes wrote partitions
    rows = _all_rows(double)
    assert len(rows) == len(set(rows)) == N_GOOD
    assert read_image_tokens(double) == read_image_tokens(single)
    assert _errors(double) == _errors(single)
    assert "tokenized 11 images, failed 4" in stdout
