"""What checking a token store's checksums costs at open: xxh3_64 (used) against crc32 and blake2b, 20M and 200M tokens.

Usage::

    nice -n 10 python bench/store_checksum.py                  # 20M and 200M tokens, 3 rounds
    nice -n 10 python bench/store_checksum.py --sizes 20M --rounds 5

A store's ``tokens.arrow`` holds two list<int32> columns (input_ids, labels): 8 bytes a token. The file is written
once under ``--data-dir`` (1000-token rows, record batches of 2048 rows, as medmax.data.store writes them) and read
whole by each hash, from the page cache ("hot", median of the rounds) and after ``posix_fadvise(DONTNEED)`` has
evicted it ("evicted", first round: what a rank pays when no other process of the node has read the file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from medmax.data.integrity import CHUNK, file_checksum


def make(path: Path, tokens: int) -> None:
    rng = np.random.default_rng(0)
    rows = tokens // 1000
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for r0 in range(0, rows, 2048):
            k = min(2048, rows - r0)
            values = pa.array(rng.integers(0, 65536, k * 1000, dtype=np.int32))
            column = pa.ListArray.from_arrays(pa.array(np.arange(0, k * 1000 + 1, 1000, dtype=np.int32)), values)
            writer.write_batch(pa.record_batch([column, column], schema=schema))


def _streamed(update, path: Path) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            update(view[:n])


def crc32(path: Path) -> int:
    value = [0]
    _streamed(lambda b: value.__setitem__(0, zlib.crc32(b, value[0])), path)
    return value[0]


def blake2b(path: Path) -> str:
    digest = hashlib.blake2b()
    _streamed(digest.update, path)
    return digest.hexdigest()


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def timed(fn, path: Path) -> float:
    start = time.perf_counter()
    fn(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20M,200M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default="/tmp/medmax-bench-checksum")
    args = parser.parse_args()
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    for size in args.sizes.split(","):
        tokens = int(float(size.rstrip("M")) * 1e6)
        path = Path(args.data_dir) / f"tokens-{size}.arrow"
        if not path.exists():
            make(path, tokens)
        mib = path.stat().st_size / 2**20
        for name, fn in (("xxh3_64 (used)", file_checksum), ("crc32 (zlib)", crc32), ("blake2b", blake2b)):
            evict(path)
            cold = timed(fn, path)
            hot = statistics.median(timed(fn, path) for _ in range(args.rounds))
            print(f"{size} tokens ({mib:.0f} MiB)  {name:15s} hot {hot:.3f} s ({mib / 1024 / hot:.1f} GiB/s)  "
                  f"evicted {cold:.3f} s", flush=True)


if __name__ == "__main__":
    main()
