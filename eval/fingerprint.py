"""The fingerprint of what decides an evaluation's predictions, so results always belong to their model.

An output folder records it in ``fingerprint.json`` (and results.json carries it):

- ``model``: a SHA-256 of every file of the model folder (config, tokenizer, weights, ``vqgan/``), by
  its path inside the folder; never the folder's own path, so a copied model resumes and a retrained
  one at the same path does not. README, Markdown and image files are left out.
- ``data``: a SHA-256 of each data file the records are read from (MedMax-schema files, or a converter's
  ``--source`` file or folder). Image files are not hashed: their paths are part of the data files.
- ``clip_model`` / ``judge_prompt``: the same for those inputs when given.
- ``fid_features`` / ``fid_real`` (only when ``--fid-features`` is given, so other runs' fingerprints are
  unchanged): the extractor's files, and every file of the real images (images included: they are the data).
- ``settings``: every setting that can change a prediction or its score (prompt style, answer length,
  repetition penalty, seed, dtype, limit, data format, image folder, protocol, judge model ...): every
  field of ``EvalConfig`` except the ones listed in ``RUN_ONLY`` (how and where the run goes, not what
  it predicts). A field added to ``EvalConfig`` later is part of the fingerprint unless listed there.
- ``toolkit_version``: the installed medmax-toolkit's version (scoring rules change between versions).

Files are streamed through SHA-256 in 4 MiB blocks, the files of a folder on up to 8 threads (hashlib
releases the GIL), so the cost is one read of the weights, once per launch: under torchrun only rank 0
computes it. Within one process a digest is reused while the file's (path, size, mtime) stay the same.
Measured here: 118 MB/s for one 512 MB file on this shared 2-core machine at load 13 (the CPU's SHA
extensions run far faster on an idle core), so budget a read of the weights, not a rerun.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

RUN_ONLY = frozenset({
    "model", "data", "source", "clip_model", "judge_prompt", "fid_features", "fid_real",  # digested by content, not path
    "output", "tasks", "batch_size", "device", "skip_memory_check", "workers", "shard_rank", "num_shards", "merge_timeout_s",
    "judge_url", "judge_key_env", "judge_deadline_s", "judge_max_reply_bytes", "overwrite", "run_id", "fingerprint_checked",
})
IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif")
_BLOCK = 4 << 20
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, streamed; reused within this process while (path, size, mtime) hold."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def tree_digests(root: Path, ignored: tuple[str, ...] = IGNORED_SUFFIXES) -> dict[str, str]:
    """``{relative posix path: digest}`` of a file (keyed by its name) or of every file under a folder
    (but those ending in ``ignored``: by default images and notes, which decide no prediction)."""
    if root.is_file():
        return {root.name: file_digest(root)}
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: does not exist")
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts) \
                and path.suffix.lower() not in ignored:
            files[rel.as_posix()] = path
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return dict(zip(files, pool.map(file_digest, files.values())))


def toolkit_version() -> str:
    """The installed medmax-toolkit's version; from pyproject.toml for a source tree that is not installed."""
    try:
        return importlib.metadata.version("medmax-toolkit")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return f"{match.group(1)}+source" if match else "unknown"


def settings(config) -> dict:
    """Every EvalConfig field that decides predictions (see RUN_ONLY), as JSON values."""
    values = {k: v for k, v in asdict(config).items() if k not in RUN_ONLY}
    if not config.judge_url:
        values["judge_model"] = None  # no judge: its model name decides nothing
    if not getattr(config, "fid_features", None):  # no FID: its settings decide nothing (and older runs still match)
        for key in ("fid_kind", "fid_pool"):
            values.pop(key, None)
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def compute(config, data: dict[str, str]) -> dict:
    """The fingerprint dict, with ``digest`` (SHA-256 of the rest, canonical JSON); ``data``: the data files'
    digests by name (:func:`tree_digests` of each file or folder the records are read from)."""
    fp = {
        "toolkit_version": toolkit_version(),
        "model": tree_digests(config.model),
        "data": dict(sorted(data.items())),
        "clip_model": tree_digests(config.clip_model) if config.clip_model else None,
        "judge_prompt": file_digest(config.judge_prompt) if config.judge_prompt and config.judge_url else None,
        "settings": settings(config),
    }
    if getattr(config, "fid_features", None):  # the extractor and the real images decide the FID
        fp["fid_features"] = tree_digests(config.fid_features)
        fp["fid_real"] = tree_digests(config.fid_real, ignored=())
    fp["digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp


def row_tag(fp: dict) -> str:
    """The short form of the digest every prediction row carries."""
    return fp["digest"][:16]


def _file_changes(kind: str, old: dict | None, new: dict | None) -> list[str]:
    old, new = old or {}, new or {}
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"{kind} file {name} added")
        elif name not in new:
            out.append(f"{kind} file {name} removed")
        elif old[name] != new[name]:
            out.append(f"{kind} file {name} changed")
    return out


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, one short phrase each, in a stable order."""
    out = []
    if old.get("toolkit_version") != new.get("toolkit_version"):
        out.append(f"toolkit version {old.get('toolkit_version')} -> {new.get('toolkit_version')}")
    for kind in ("model", "data", "clip_model", "fid_features", "fid_real"):
        out += _file_changes(kind.replace("_", " "), old.get(kind), new.get(kind))
    if old.get("judge_prompt") != new.get("judge_prompt"):
        out.append("judge prompt changed")
    old_s, new_s = old.get("settings") or {}, new.get("settings") or {}
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key) != new_s.get(key):
            out.append(f"{key} {old_s.get(key)!r} -> {new_s.get(key)!r}")
    return out or ["fingerprint digest differs"]


def describe(changes: list[str], limit: int = 4) -> str:
    shown = "; ".join(changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")
