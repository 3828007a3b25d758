"""Sharded runs cannot merge stale or partial work (issue 10).

Reproduced before: after a finished 2-shard run, a relaunch with one more task merged rank 1's leftover
done-marker at once and wrote a results.json with half of the rows; rank 0 also rewrote rank 1's
predictions file while rank 1 could be writing it. Ranks here are threads of the test process running
``eval.run.main`` with ``--shard-rank/--num-shards/--run-id`` (what ``--workers`` and torchrun hand each rank).
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

import eval.run as run

ROOT = Path(run.__file__).resolve().parents[1]
TASKS = "vqa_rad_closed,pmc_vqa_mcq"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharddata")
    for i in range(3):
        Image.new("RGB", (64, 64), (70 * i, 90, 200 - 60 * i)).save(root / f"{i}.png")
    rows = [{"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Is there a lesion {i}?", "answer": "yes",
             "image_path": f"{i % 3}.png"} for i in range(6)]
    rows += [{"task_name": "pmc_vqa", "question_type": "mcq", "prompt": f"Which organ {i}?\n(A) lung\n(B) liver",
              "answer": "B", "image_path": f"{i % 3}.png"} for i in range(4)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--device", "cpu", "--max-new-tokens", "2",
            "--batch-size", "1", *extra]


def _rank(argv, rank, run_id, timeout=60):
    return argv + ["--shard-rank", str(rank), "--num-shards", "2", "--run-id", run_id, "--merge-timeout-s", str(timeout)]


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert run.main(_argv(tiny_model_dir, data, out, "--tasks", TASKS)) == 0
    return json.loads((out / "results.json").read_text())


class Rank(threading.Thread):
    def __init__(self, argv):
        super().__init__(daemon=True)
        self.argv, self.code, self.error = argv, None, None

    def run(self):
        try:
            self.code = run.main(self.argv)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e


def _marker_run_id(out: Path, rank: int):
    try:
        return json.loads((out / f".shard{rank}.done").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _wait(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _assert_merged_like_single(rank0: Rank, out: Path, single: dict) -> None:
    rank0.join(60)
    assert rank0.error is None and rank0.code == 0
    results = json.loads((out / "results.json").read_text())
    for key in TASKS.split(","):
        assert results[key] == single[key]


def test_rank0_first_with_a_stale_marker_waits_for_this_launch(tiny_model_dir, data, single, tmp_path):
    out = tmp_path / "out"
    base = _argv(tiny_model_dir, data, out, "--tasks", "vqa_rad_closed")
    assert run.main(_rank(base, 1, "launch-1")) == 0  # a finished first launch: rank 1's marker stays behind
    assert run.main(_rank(base, 0, "launch-1")) == 0
    assert set(json.loads((out / "results.json").read_text())) >= {"vqa_rad_closed"}

    relaunch = _argv(tiny_model_dir, data, out, "--tasks", TASKS)  # one more task, rank 0 starts first
    rank0 = Rank(_rank(relaunch, 0, "launch-2"))
    rank0.start()
    _wait(lambda: _marker_run_id(out, 0) == "launch-2")  # rank 0 finished its own shard...
    time.sleep(1.0)
    assert rank0.is_alive() and rank0.error is None  # ...and waits: the stale marker of launch-1 is not accepted
    assert "pmc_vqa_mcq" not in json.loads((out / "results.json").read_text())
    assert run.main(_rank(relaunch, 1, "launch-2")) == 0
    _assert_merged_like_single(rank0, out, single)


def test_a_rank_killed_mid_task_then_the_launch_repeated(tiny_model_dir, data, single, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = _argv(tiny_model_dir, data, out, "--tasks", TASKS)
    real, calls = run.evaluate_batch, {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands in for kill -9 of rank 1 between two batches
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        run.main(_rank(argv, 1, "launch-1"))
    monkeypatch.setattr(run, "evaluate_batch", real)
    shard1 = out / "predictions" / "vqa_rad_closed.rank1.jsonl"
    with open(shard1, "a") as f:
        f.write('{"uid": "rows.jsonl:')  # rank 1 died mid-line
    partial = shard1.read_bytes()

    # rank 0 of the same launch finishes its shard, then gives up waiting: no results.json from partial work
    assert run.main(_rank(argv, 0, "launch-1", timeout=1)) == 2
    err = capsys.readouterr().err
    assert "shards [1]" in err and "did not finish" in err
    assert not (out / "results.json").exists()
    assert shard1.read_bytes() == partial  # rank 0 never rewrites another rank's file

    rank0 = Rank(_rank(argv, 0, "launch-2"))  # the launch repeated
    rank0.start()
    assert run.main(_rank(argv, 1, "launch-2")) == 0
    _assert_merged_like_single(rank0, out, single)
    lines = shard1.read_text().splitlines()
    assert len(lines) == 3 and len({json.loads(line)["uid"] for line in lines}) == 3  # rank 1's rows, none twice


def test_a_marker_cut_short_or_from_another_fingerprint_is_not_accepted(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(tiny_model_dir, data, out, "--tasks", "vqa_rad_closed")
    assert run.main(_rank(argv, 1, "launch-1")) == 0
    marker = out / ".shard1.done"
    good = marker.read_text()
    marker.write_text(good[: len(good) // 2])  # a marker cut short: never fatal, never accepted
    assert run.main(_rank(argv, 0, "launch-1", timeout=0.5)) == 2
    assert "shards [1]" in capsys.readouterr().err
    marker.write_text(json.dumps({**json.loads(good), "fingerprint": "0" * 16}))
    assert run.main(_rank(argv, 0, "launch-1", timeout=0.5)) == 2
    marker.write_text(good)
    assert run.main(_rank(argv, 0, "launch-1")) == 0


def test_shards_started_by_hand_need_a_run_id(tiny_model_dir, data, tmp_path, capsys):
    argv = _argv(tiny_model_dir, data, tmp_path / "out", "--tasks", "vqa_rad_closed", "--shard-rank", "1", "--num-shards", "2")
    assert run.main(argv) == 2
    assert "--run-id" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree_in_rank(rank: int, port: int, queue) -> None:
    """One torchrun-like rank (the environment torchrun gives, the same TORCHELASTIC_RUN_ID every launch)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="none")
    from eval.launch import agree, under_torchrun

    assert under_torchrun()
    queue.put((rank, agree(lambda: uuid.uuid4().hex)))


def _torchrun_like_launch() -> list[str]:
    """Two ranks as forked processes (forked, so that they need not import torch again)."""
    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_agree_in_rank, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    return [run_id for _, run_id in sorted(queue.get(timeout=5) for _ in procs)]


def test_torchrun_ranks_agree_on_a_launch_unique_id():
    first, second = _torchrun_like_launch(), _torchrun_like_launch()
    assert first[0] == first[1] and second[0] == second[1]  # every rank of a launch has rank 0's id
    assert first[0] != second[0] and len(first[0]) >= 16  # and a relaunch has another one


@pytest.mark.slow
def test_torchrun_relaunch_with_one_more_task(tiny_model_dir, data, single, tmp_path):
    """The issue's reproduction under real torchrun: a finished 2-rank launch, then a relaunch with one more task;
    the first launch's markers are still there and torchrun's own run id is the same for both launches."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for tasks in ("vqa_rad_closed", TASKS):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               str(ROOT / "tests" / "leaves_no_threads.py"), "-m", "eval.run", *_argv(tiny_model_dir, data, out, "--tasks", tasks)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    for key in TASKS.split(","):
        assert results[key] == single[key]
