"""A sequence folder as a memory-mapped token store: converted once, shared by every rank through the page cache.

Reading every shard into each process costs 8 bytes a token per rank (ids and labels as int32) and a full
read before the first step. A store instead holds the token-id list columns (``input_ids`` and ``labels``;
any list columns, e.g. a preference folder's) as one Arrow IPC stream file, the format Hugging Face
``datasets`` memory-maps (``datasets.Dataset.from_file`` opens it, and this module opens it that way), with
per-row figures beside it. Every process maps the same file: the OS page cache holds one copy per node, and a
row's pages are read only when a batch asks for that row (its values are zero-copy views of the map).

Layout, beside the folder (or under ``store_root``)::

    FOLDER.store/<sha256 of FOLDER/manifest.json, 16 hex>/
        tokens.arrow            the list<int32> columns, record batches of BATCH_ROWS rows
        lengths.<column>.npy    (N,) int64 per column
        stats.<column>.npy      (N, 5) int64: min, max, and min, max, count of the values that are not -100
        store.json              format, version, columns, rows, the folder's manifest, its sha256, each data
                                file's size and mtime, the folder's content digest, and the size and xxh3_64
                                checksum of each store file above (``checksums``); written last
        plans/                  cached epoch plans (medmax.data.plans), each with its own checksums

The store is made by the first process that needs it, under a file lock; the others wait and map it. It is
used while ``store.json`` records the same manifest digest, columns and data files of the same size and
mtime, and its files match their checksums (:mod:`medmax.data.integrity`; a store changed or cut short is made
again with a warning); otherwise it is made again (and the stores of the folder's older manifests are removed). Making it reads
the folder twice (a sha256 of its content, which a resumed run compares, and the conversion), in bounded memory.

A store can also be read from S3-compatible storage (``s3://bucket/path/to/store``, through ``fsspec`` /
``s3fs``): its files are copied once per machine into ``store_root`` (default ``~/.cache/medmax/stores``)
under the same lock, then mapped like a local one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import is_disk_refusal
from .integrity import checksums, damage
from .loader import holds_sequences, require_sequences, row_stats
from .plans import locked
from .shards import MANIFEST, DataError, folder_digest, read_manifest

logger = logging.getLogger(__name__)

FORMAT = "medmax-token-store"
VERSION = 2  # 2: store.json records each file's checksum
META = "store.json"
TOKENS = "tokens.arrow"
PLANS = "plans"
SEQUENCE_COLUMNS = ("input_ids", "labels")
BATCH_ROWS = 2048  # rows per record batch: ~8 MB a column at MedMax's lengths
REMOTE_CACHE = Path("~/.cache/medmax/stores")


# ------------------------------------------------------------------------------------------ making a store
def _stamps(folder: Path, files: list[str]) -> dict:
    stats = {name: (folder / name).stat() for name in files}
    return {name: [s.st_size, s.st_mtime_ns] for name, s in stats.items()}


def store_group(folder: Path, store_root: str | Path | None) -> Path:
    """The folder that holds ``folder``'s stores (one per manifest digest)."""
    folder = folder.absolute()
    if store_root is None:
        return folder.with_name(folder.name + ".store")
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return Path(store_root).expanduser() / f"{folder.name}-{tag}.store"


def _wanted(folder: Path, columns: tuple[str, ...], read=read_manifest) -> tuple[dict, dict]:
    manifest = read(folder)
    want = {"format": FORMAT, "version": VERSION, "columns": list(columns),
            "manifest_sha256": hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest(),
            "stamps": _stamps(folder, manifest["files"])}
    return manifest, want


def _is_fresh(path: Path, want: dict) -> bool:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in want.items())


def _store_damage(path: Path) -> str | None:
    """What is wrong with a store's files against the checksums its store.json recorded (None: intact)."""
    try:
        recorded = json.loads((path / META).read_text()).get("checksums")
    except (OSError, ValueError) as err:
        return f"{path / META}: unreadable ({err})"
    return damage(path, recorded)


def _usable(path: Path, want: dict, warn: bool = False) -> bool:
    """The store at ``path`` is for ``want`` and its files are intact (``warn``: say so when they are not)."""
    if not _is_fresh(path, want):
        return False
    problem = _store_damage(path)
    if problem and warn:
        logger.warning("token store %s fails its integrity check (%s); making it again", path, problem)
    return problem is None


def ensure_store(folder: str | Path, columns: tuple[str, ...] = SEQUENCE_COLUMNS,
                 store_root: str | Path | None = None, read=read_manifest) -> Path:
    """The store of ``folder``'s list ``columns``: made (under a lock) when missing or stale, else found.

    ``read(folder)`` returns the folder's checked manifest (with ``files``); the default reads a sequence
    folder's, another format (e.g. preference pairs) passes its own reader and columns.
    """
    folder = Path(folder)
    manifest, want = _wanted(folder, columns, read)
    group = store_group(folder, store_root)
    path = group / want["manifest_sha256"][:16]
    if _usable(path, want):
        return path
    try:
        group.mkdir(parents=True, exist_ok=True)
        (group / ".lock").touch()
        with locked(group / ".lock"):
            if not _usable(path, want, warn=True):
                _make(folder, manifest, want, path)
    except OSError as err:  # writing the store (numpy's short write on a full disk names no file nor errno)
        if err.filename is not None and not Path(err.filename).is_relative_to(group) and not is_disk_refusal(err):
            raise  # e.g. a shard that went missing: not about the store's place
        at = f" at {err.filename}" if err.filename and Path(err.filename) != group else ""
        raise DataError(f"{folder}: cannot write its token store in {group} ({err.strerror or err}{at}); set store_dir "
                        "to a writable folder, or data_store=false to read the folder into memory") from None
    return path


def _make(folder: Path, manifest: dict, want: dict, path: Path) -> None:
    if not manifest["files"]:
        raise DataError(f"{folder}/{MANIFEST}: lists no shard files")
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger.info("%s: writing its token store %s (once; later runs and other ranks map it)", folder, path)
    try:
        _write(folder, manifest, want, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    for other in path.parent.iterdir():  # earlier manifests' stores, and work folders of killed conversions
        if other != path and other.is_dir() and ((other / META).is_file() or ".partial-" in other.name):
            shutil.rmtree(other, ignore_errors=True)


def _write(folder: Path, manifest: dict, want: dict, tmp: Path) -> None:
    """Every file of a store into the work folder ``tmp``, ``store.json`` last."""
    columns = tuple(want["columns"])
    digest = folder_digest(folder, manifest)
    rows, stats = _convert([folder / name for name in manifest["files"]], columns, tmp / TOKENS)
    for column in columns:
        np.save(tmp / f"lengths.{column}.npy", np.concatenate(stats[column]["lengths"]))
        np.save(tmp / f"stats.{column}.npy", np.concatenate(stats[column]["stats"]))
    meta = {**want, "rows": rows, "source": str(folder.absolute()), "folder_digest": digest, "manifest": manifest,
            "tokens": {c: int(sum(x.sum() for x in stats[c]["lengths"])) for c in columns},
            "checksums": checksums(tmp, _data_files(columns))}
    (tmp / META).write_text(json.dumps(meta, indent=1))


def _data_files(columns) -> list[str]:
    """The files of a store beside its store.json."""
    return [TOKENS, *(f"{kind}.{c}.npy" for c in columns for kind in ("lengths", "stats"))]


def _int32_lists(column: pa.Array, shard: Path, name: str, row0: int) -> pa.ListArray:
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not pa.types.is_integer(column.type.value_type):
        raise DataError(f"{shard}: column {name!r} is {column.type}, expected a list of integers")
    if column.null_count:
        bad = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        raise DataError(f"{shard}: row {row0 + bad[0]}: {name} is null ({len(bad)} rows)")
    return column.cast(pa.list_(pa.int32()))


def _convert(shards: list[Path], columns: tuple[str, ...], out: Path) -> tuple[int, dict]:
    """Stream ``columns`` of every shard into one Arrow IPC stream file; -> (rows, per-column lengths and stats)."""
    schema = pa.schema([(c, pa.list_(pa.int32())) for c in columns])
    stats = {c: {"lengths": [], "stats": []} for c in columns}
    rows = 0
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for shard in shards:
            rows += _convert_shard(shard, schema, writer, stats)
    return rows, stats


def _convert_shard(shard: Path, schema: pa.Schema, writer, stats: dict) -> int:
    columns = tuple(schema.names)
    try:
        parquet = pq.ParquetFile(shard)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{shard}: not a readable parquet file ({err})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{shard}: no column {missing[0]!r}")
    aligned = [c for c in SEQUENCE_COLUMNS if c in columns] + (["length"] if "length" in names else [])
    row0, bad = 0, []
    for batch in parquet.iter_batches(BATCH_ROWS, columns=[*columns, *(["length"] if "length" in names else [])]):
        arrays = [_int32_lists(batch.column(c), shard, c, row0) for c in columns]
        lengths = {c: np.diff(a.offsets.to_numpy()).astype(np.int64) for c, a in zip(columns, arrays)}
        if len(aligned) > 1:  # ids, labels and the length column agree row by row (as load_sequences checks)
            first = lengths.get(aligned[0])
            others = [lengths.get(c, batch.column(c).to_numpy(zero_copy_only=False)) for c in aligned[1:]]
            bad.append(row0 + np.flatnonzero(np.any([o != first for o in others], axis=0)))
        writer.write_batch(pa.record_batch(arrays, schema=schema))
        for c, a in zip(columns, arrays):
            stats[c]["lengths"].append(lengths[c])
            stats[c]["stats"].append(row_stats(a.values.to_numpy(), a.offsets.to_numpy()))
        row0 += batch.num_rows
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    if len(bad):
        raise DataError(f"{shard}: row {bad[0]}: {', '.join(aligned[:-1])} and {aligned[-1]} disagree ({len(bad)} rows)")
    return row0


# ------------------------------------------------------------------------------------------ reading a store
class _Column:
    """Zero-copy numpy views of one list<int32> column of a memory-mapped table, chunk by chunk."""

    def __init__(self, chunked: pa.ChunkedArray):
        self.starts, self.offsets, self.values = [0], [], []
        for chunk in chunked.chunks:
            self.offsets.append(chunk.offsets.to_numpy())
            self.values.append(chunk.values.to_numpy(zero_copy_only=True))
            self.starts.append(self.starts[-1] + len(chunk))

    def __getitem__(self, i: int) -> np.ndarray:
        c = bisect.bisect_right(self.starts, i) - 1
        offsets = self.offsets[c]
        j = i - self.starts[c]
        return self.values[c][offsets[j] : offsets[j + 1]]


class TokenStore:
    """A store folder, memory-mapped: ``store.row(column, i)`` is row ``i`` of ``column`` (a read-only view)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path / META}: not a readable token store ({err})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{self.path / META}: format {self.meta.get('format')!r} version {self.meta.get('version')!r}, "
                            f"expected {FORMAT!r} version {VERSION}")
        self.columns = tuple(self.meta["columns"])

    @cached_property
    def dataset(self):
        """The Hugging Face ``datasets.Dataset`` over the store's Arrow file (memory-mapped, nothing read yet)."""
        from datasets import Dataset

        return Dataset.from_file(str(self.path / TOKENS))

    @cached_property
    def _columns(self) -> dict[str, _Column]:
        table = self.dataset.data.table
        return {c: _Column(table.column(c)) for c in self.columns}

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __getstate__(self):  # worker processes re-map the file instead of pickling its views
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def key(self) -> str:
        return f"{self.meta['folder_digest']}:{','.join(self.columns)}"

    def row(self, column: str, i: int) -> np.ndarray:
        return self._columns[column][i]

    def lengths(self, column: str) -> np.ndarray:
        return np.load(self.path / f"lengths.{column}.npy", mmap_mode="r")

    def stats(self, column: str) -> np.ndarray:
        return np.load(self.path / f"stats.{column}.npy", mmap_mode="r")


@dataclass
class StoreSequences:
    """The sequences of a store (or a subset of them, ``index``), read as ``medmax.data.loader.SequenceData`` is."""

    store: TokenStore
    folder: Path | str  # where the data came from, for messages (a URL for a remote store)
    index: np.ndarray | None = None  # the store rows this holds, in order (None: all)

    @property
    def manifest(self) -> dict:
        return self.store.meta["manifest"]

    @property
    def identity(self) -> str:
        """What a cached plan over these sequences depends on: the folder's content and the subset."""
        if self.index is None:
            return self.store.key
        return f"{self.store.key}:{hashlib.sha256(np.ascontiguousarray(self.index, dtype=np.int64)).hexdigest()[:16]}"

    @property
    def plan_cache(self) -> Path:
        return self.store.path / PLANS

    def __len__(self) -> int:
        return len(self.store) if self.index is None else len(self.index)

    def _rows(self, array: np.ndarray) -> np.ndarray:
        return array if self.index is None else array[self.index]

    @cached_property
    def lengths(self) -> np.ndarray:
        return self._rows(self.store.lengths("input_ids"))

    def row_stats(self, column: str) -> np.ndarray:
        return self._rows(self.store.stats(column))

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k = i if self.index is None else int(self.index[i])
        return self.store.row("input_ids", k), self.store.row("labels", k)

    def subset(self, index: np.ndarray) -> StoreSequences:
        index = np.asarray(index, dtype=np.int64)
        return StoreSequences(self.store, self.folder, index if self.index is None else self.index[index])


# ------------------------------------------------------------------------------------------ entry points
def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def fetch_store(url: str, store_root: str | Path | None = None, storage_options: dict | None = None) -> Path:
    """A local copy of the store at ``url`` (e.g. ``s3://bucket/train.store/KEY``), made once per machine."""
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        meta = json.loads(fs.cat_file(f"{remote}/{META}"))
    except (OSError, ValueError) as err:
        raise DataError(f"{url}/{META}: not a readable token store ({err})") from None
    group = Path(store_root or REMOTE_CACHE).expanduser() / "remote"
    local = group / f"{meta.get('folder_digest', 'unknown')[:16]}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
    want = {k: meta.get(k) for k in ("format", "version", "columns", "manifest_sha256", "stamps", "folder_digest",
                                     "checksums")}
    if _usable(local, want):
        return local
    with locked(group / ".lock"):
        if not _usable(local, want, warn=local.exists()):
            tmp = local.with_name(f"{local.name}.partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in _data_files(meta.get("columns", ())):
                fs.get_file(f"{remote}/{name}", str(tmp / name))
            problem = damage(tmp, meta.get("checksums"))
            if problem:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(f"{url}: its copy fails the checksums its {META} records ({problem}); the store "
                                "there is damaged or was made by an older version: upload it again")
            (tmp / META).write_text(json.dumps(meta))  # last: a copy cut short is never taken as whole
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
            logger.info("%s: copied to %s", url, local)
    return local


def open_store(source: str | Path, columns: tuple[str, ...] = SEQUENCE_COLUMNS, store_root: str | Path | None = None,
               storage_options: dict | None = None, read=read_manifest) -> TokenStore:
    """The token store of ``source``: a data folder (its store made when needed; ``read`` as in
    :func:`ensure_store`), a store folder, or a store URL."""
    if is_remote(source):
        return TokenStore(fetch_store(str(source), store_root, storage_options))
    if (Path(source) / META).is_file():
        store = TokenStore(source)
        problem = _store_damage(store.path)
        if problem:
            raise DataError(f"{problem}: the token store fails its checksum check; name its data folder instead "
                            "(a damaged store is made again from it) or delete the store")
        return store
    return TokenStore(ensure_store(source, columns, store_root, read))


def open_sequences(source: str | Path, store_root: str | Path | None = None,
                   storage_options: dict | None = None) -> StoreSequences:
    """A sequence folder (or store) as :class:`StoreSequences`, for ``medmax.data.loader.SequenceDataset``;
    a preference folder is refused, as ``load_sequences`` refuses it."""
    store = open_store(source, SEQUENCE_COLUMNS, store_root, storage_options, read=require_sequences)
    missing = [c for c in SEQUENCE_COLUMNS if c not in store.columns]
    if missing:
        raise DataError(f"{source}: its token store has no column {missing[0]!r}")
    data = StoreSequences(store, source if is_remote(source) else Path(source))
    logger.info("%s: %d sequences, %d tokens (memory-mapped from %s)", source, len(data),
                store.meta["tokens"]["input_ids"], store.path)
    return data


def store_digest(source: str | Path, store_root: str | Path | None = None, storage_options: dict | None = None) -> str:
    """The content digest of a sequence folder (``medmax.data.shards.folder_digest``), as its store recorded it."""
    return open_store(source, SEQUENCE_COLUMNS, store_root, storage_options, read=require_sequences).meta["folder_digest"]


def dataset_digest(source: str | Path, use_store: bool = True, store_root: str | Path | None = None) -> str:
    """The content digest a training run records for a data folder of any layout (a resume compares it).

    The manifest is read once, its errors a :class:`DataError` naming the folder. A sequence folder served from
    its token store gives the digest the store recorded when it was made (making the store if needed); any
    other folder (a preference folder, or ``use_store=False``) is digested from its files.
    """
    if is_remote(source):
        return store_digest(source, store_root)
    manifest = read_manifest(source)
    if use_store and holds_sequences(manifest):
        store = open_store(source, SEQUENCE_COLUMNS, store_root, read=lambda _: manifest)
        return store.meta["folder_digest"]
    try:
        return folder_digest(source, manifest)
    except OSError as err:
        raise DataError(f"{source}: cannot read its data files ({err})") from None
