"""`medmax demo` as a running server: several API sessions at once, and SIGTERM.

The server is started as a user starts it, on a free loopback port, with the tiny model; sessions are
``gradio_client`` clients (each its own Gradio session, as a browser tab is), each driving the page's
three events by their API names: the question, the generation, the answer's stream.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
pytestmark = pytest.mark.slow  # a server start costs ~10 s

ROOT = Path(__file__).resolve().parents[2]
CONTROLS = ("text", 0.0, 0.9, 3.0, 1.2, 0.7, 6)  # greedy text, 6 tokens; the seed is per session, then the rest:
REST = ("auto", "", "16", "percentile", False)  # decoding, edit mask, volume slices, window, one series
ASK, GENERATE, ANSWER = "/ask", "/ask_generate", "/ask_answer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path):
        self.port, self.log = _free_port(), log
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "medmax", "demo", "--model", str(model), "--port",
                                          str(self.port), "--device", "cpu", "--max-batch-size", "4"],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the demo exited: {self.text()[-2000:]}"
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not answer within 120 s"
                time.sleep(0.3)

    def text(self) -> str:
        return self.log.read_text()

    def workdir(self) -> Path:
        return Path(re.search(r"uploads and answers in (\S+)\)", self.text()).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, tmp_path / "server.log")
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def _session(url: str, k: int) -> tuple[str, list, str]:
    """One tab: ask question k (seed k), run the generation event, read the answer's stream; -> (question, chat, status)."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    question = f"Is there a lesion in scan {k}?"
    client.predict(question, None, *CONTROLS, k, *REST, api_name=ASK)
    client.predict(api_name=GENERATE)
    chat, _, status = client.submit(api_name=ANSWER).result(timeout=60)
    return question, chat, status


def _text(content) -> str:
    """A chat message's text (Gradio sends it as a list of typed parts)."""
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_every_concurrent_session_gets_its_own_answer_exactly_once(server):
    n = 6
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda k: _session(server.url, k), range(n)))
    for k, (question, chat, status) in enumerate(results):
        assert status.startswith("answer 1 done"), f"session {k}: {status}"
        assert chat[0]["role"] == "user" and _text(chat[0]["content"]) == question
        assert chat[-1]["role"] == "assistant"
    batches = [int(b) for b in re.findall(r"running a batch of (\d+) request", server.text())]
    assert sum(batches) == n, f"{sum(batches)} generations for {n} questions: {batches}"
    assert server.stop() == 0


def test_sigterm_removes_the_uploads_folder_and_exits_cleanly(server, tmp_path):
    """An uploaded volume and its slice previews, made through the page's API, go with the server too."""
    import numpy as np
    from gradio_client import Client, handle_file

    from medmax.synthetic_volumes import lesion_volume, write_nifti

    workdir = server.workdir()
    assert workdir.is_dir() and str(workdir).startswith(("/tmp", os.environ.get("TMPDIR", "/tmp")))
    scan = workdir / "upload-1" / "scan.png"
    scan.parent.mkdir()
    scan.write_bytes(b"a patient's scan")
    volume = write_nifti(tmp_path / "ct.nii.gz", lesion_volume(np.random.default_rng(0), shape=(8, 16, 16)).hu)
    client = Client(server.url, verbose=False, download_files=False)
    gallery, status = client.predict([handle_file(str(volume))], "4", "abdomen", False, api_name="/preview")
    assert len(gallery) == 4, status
    assert len(list(workdir.rglob("ct.nii.gz"))) == 1 and len(list(workdir.rglob("slice_*.png"))) == 4
    assert server.stop() == 0, server.text()[-2000:]
    assert not workdir.exists()


def test_a_killed_servers_uploads_are_removed_when_the_next_server_starts(tiny_model_dir, tmp_path):
    """SIGKILL runs no handler, so the folder of a killed server stays until the next `medmax demo` starts."""
    killed = Server(tiny_model_dir, tmp_path / "killed.log")
    workdir = killed.workdir()
    (workdir / "upload-1").mkdir()
    (workdir / "upload-1" / "scan.png").write_bytes(b"a patient's scan")
    killed.proc.kill()
    killed.proc.wait()
    assert workdir.is_dir()
    alive = Server(tiny_model_dir, tmp_path / "alive.log")
    try:
        assert not workdir.exists() and alive.workdir().is_dir()
        assert f"removed {workdir}" in alive.text()
    finally:
        assert alive.stop() == 0
