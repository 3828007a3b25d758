"""A token store on S3-compatible storage, read through fsspec/s3fs from a local moto server (no network).

moto's server mode (``moto[server]``, a test dependency) speaks the S3 API on 127.0.0.1; the store is
uploaded there and opened by URL, as a training config's ``datasets: [s3://bucket/path]`` would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")

from medmax.data.loader import load_sequences  # noqa: E402
from medmax.data.shards import DataError  # noqa: E402
from medmax.data.shards import write_sequences  # noqa: E402
from medmax.data.store import ensure_store, open_sequences, store_digest  # noqa: E402

KEYS = {"key": "testing", "secret": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def remote_store(endpoint, tmp_path):
    rng = np.random.default_rng(0)
    rows = [(ids, np.where(np.arange(len(ids)) < 3, -100, ids)) for ids in (rng.integers(0, 500, n) for n in rng.integers(5, 40, 50))]
    folder = write_sequences(tmp_path / "seq", rows, {"bos": 0}, rows_per_shard=20)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, **KEYS)
    bucket = f"medmax-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.mkdir(bucket)
    fs.put(str(ensure_store(folder)), f"{bucket}/train-store", recursive=True)
    return folder, f"s3://{bucket}/train-store"


def test_a_store_on_s3_serves_the_folders_sequences_after_one_copy(remote_store, endpoint, tmp_path, monkeypatch):
    folder, url = remote_store
    options = {"client_kwargs": {"endpoint_url": endpoint}, **KEYS}
    remote = open_sequences(url, store_root=tmp_path / "cache", storage_options=options)
    memory = load_sequences(folder)
    assert len(remote) == len(memory) and remote.manifest == memory.manifest and remote.folder == url
    for i in range(len(memory)):
        for a, b in zip(memory.sequence(i), remote.sequence(i)):
            np.testing.assert_array_equal(a, b)
    copies = list((tmp_path / "cache" / "remote").iterdir())
    # a second process of the machine maps the same copy; credentials and endpoint may come from the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["secret"])
    assert store_digest(url, tmp_path / "cache") == remote.store.meta["folder_digest"]
    assert list((tmp_path / "cache" / "remote").iterdir()) == copies


def test_a_url_holding_no_store_is_refused_naming_it(remote_store, endpoint, tmp_path):
    _, url = remote_store
    options = {"client_kwargs": {"endpoint_url": endpoint}, **KEYS}
    with pytest.raises(DataError, match=f"{url}-missing/store.json: not a readable token store"):
        open_sequences(url + "-missing", store_root=tmp_path / "cache", storage_options=options)
