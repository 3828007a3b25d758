"""A process group's gloo threads end with the program, so a finished torchrun rank cannot abort at exit.

A group destroyed while something still refers to it keeps its threads; the interpreter then destroys them
while they run and the process aborts ("terminate called without an active exception") after its work is
done, about 1 run in 20 on a loaded machine. The tests check the cause, which is there every time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each rank: join, do one collective, import a module that holds the group once it exists, leave, and report.
# The atexit marker shows whether the interpreter's teardown ran.
RANK_BODY = """
import atexit, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from medmax.distributed import exit_process, group_threads, join_group, leave_group

out, rank = Path(sys.argv[1]), os.environ["RANK"]
atexit.register(lambda: (out / f"teardown{rank}").write_text("ran"))
JOIN
value = torch.tensor([7 if rank == "0" else 0]); dist.broadcast(value, src=0)
import torch.distributed.fsdp  # what transformers' Chameleon model imports
leave_group()
(out / f"threads{rank}").write_text(",".join(group_threads()))
print(f"rank {rank} got {int(value)}", flush=True)
exit_process(3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(join: str, out: Path) -> list[subprocess.CompletedProcess]:
    code = RANK_BODY.replace("JOIN", join)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def test_a_group_joined_here_ends_its_threads_and_the_process_exits_normally(tmp_path):
    """join_group imports what would hold the group first: leave_group ends its threads, and the exit is the usual one."""
    results = _two_ranks("join_group('gloo')", tmp_path)
    for rank, proc in enumerate(results):
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert f"rank {rank} got 7" in proc.stdout
        assert (tmp_path / f"threads{rank}").read_text() == ""  # no gloo thread outlived the group
        assert (tmp_path / f"teardown{rank}").read_text() == "ran"


def test_threads_that_outlive_their_group_are_not_left_to_the_interpreters_teardown(tmp_path):
    """A bare init_process_group, then the late import: the threads outlive the group (what aborted CI), so
    exit_process ends the process itself, with the program's code and its output flushed."""
    results = _two_ranks("dist.init_process_group('gloo')", tmp_path)
    for rank, proc in enumerate(results):
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert f"rank {rank} got 7" in proc.stdout
        assert "gloo" in (tmp_path / f"threads{rank}").read_text()  # the case this guards against is real here
        assert not (tmp_path / f"teardown{rank}").exists()


@pytest.mark.parametrize("module", ["tokenization.image_tokenize", "tokenization.train_vqgan", "eval.launch"])
def test_every_program_that_makes_a_group_joins_it_through_medmax_distributed(module):
    """No program calls init_process_group itself: only join_group imports first what would hold the group."""
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert "init_process_group" not in source
