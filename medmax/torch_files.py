"""Read ``torch.save`` files (``.ckpt``, ``.pt``, ``.pth``) without running code from them, and say what is wrong.

:func:`load_torch_file` loads with ``torch.load(weights_only=True)``. When that fails, the file is
inspected, never unpickled, to tell the user the truth:

- the archive or pickle is broken (empty, truncated, a zip without ``data.pkl``, a pickle without the
  ``torch.save`` magic number, neither zip nor pickle): :class:`CheckpointError`, whatever the trust;
- it is a complete pickle that asks for globals ``weights_only`` does not allow (``argparse.Namespace``
  in a training checkpoint): :class:`UntrustedCheckpointError`, naming them, unless ``trust=True``,
  which loads it fully (that runs code the file names);
- it is complete and asks for nothing more, yet torch cannot read it: :class:`CheckpointError` with
  torch's reason.

The inspection reads the pickle's opcodes with :mod:`pickletools` (``genops`` parses, it does not
execute) and the archive with :mod:`zipfile`.
"""

from __future__ import annotations

import io
import logging
import pickletools
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (non-zip) torch.save file
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS, _PUT_OPS = {"BINGET", "LONG_BINGET", "GET"}, {"BINPUT", "LONG_BINPUT", "PUT"}


class CheckpointError(UserError):
    """A weights file that cannot be loaded as it is; the message names the file and what is wrong."""


class UntrustedCheckpointError(CheckpointError):
    """A complete checkpoint whose pickle names globals beyond ``weights_only``; loading it runs code from it."""


def check_zip_crc(path: str | Path) -> None:
    """Raise :class:`CheckpointError` when a member of a zip-format ``torch.save`` file fails its CRC.

    ``torch.load`` never checks the CRCs the archive records, so a flipped byte loads silently. This reads
    every byte once (the callers read them all anyway); a legacy (non-zip) file has no CRC and passes.
    A member whose CRC is 0 was saved without one (``torch.serialization.config.save.compute_crc32``) and is
    not checked.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                with zf.open(info) as member:  # raises BadZipFile at the end of a member whose CRC differs
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt: its zip archive fails its CRC check ({exc})") from None


def load_torch_file(path: str | Path, trust: bool = False, map_location="cpu", refusal: str | None = None):
    """``torch.load`` the file safely, its zip CRCs checked; see the module docstring for what happens when that fails.

    ``refusal``: for a file the caller never unpickles, whatever the user asks (no ``--trust-checkpoint``
    applies), what the refusal advises instead of passing that flag.
    """
    path = Path(path)
    if path.is_file():
        check_zip_crc(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # the safe unpickler and the archive reader raise many types
        failure = exc
    problem, wanted = inspect_torch_file(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}") from failure
    beyond = _beyond_weights_only(wanted, failure)
    if not beyond:
        raise CheckpointError(f"{path}: cannot be loaded ({_torch_reason(failure)})") from failure
    if refusal is not None:
        raise UntrustedCheckpointError(f"{path}: its pickle asks for {', '.join(beyond[:5])}, which weights_only loading does "
                                       f"not allow; {refusal}") from failure
    if not trust:
        raise UntrustedCheckpointError(
            f"{path}: needs --trust-checkpoint: its pickle asks for {', '.join(beyond[:5])}, which weights_only loading "
            "does not allow. Loading it runs code the file names; pass --trust-checkpoint (trust_checkpoint=True) "
            "only if you trust its source"
        ) from failure
    logger.warning("%s: loading with full unpickling (it asks for %s) because it is trusted", path, ", ".join(beyond[:5]))
    return torch.load(path, map_location=map_location, weights_only=False)


def inspect_torch_file(path: str | Path) -> tuple[str | None, list[str]]:
    """``(problem, globals)``: what is structurally wrong with a torch.save file (None if nothing), and the
    globals its pickle asks for. Nothing is unpickled."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty", []
    if head.startswith(b"PK"):
        return _inspect_zip(path)
    if head[:1] == b"\x80":  # PROTO: a pickle of protocol 2 or later, as torch.save writes
        return _inspect_legacy(path)
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)", []


def _inspect_zip(path: Path) -> tuple[str | None, list[str]]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pickles:
                return "a zip archive with no data.pkl: not a PyTorch checkpoint", []
            broken = zf.testzip()  # reads every member and checks its CRC
            if broken is not None:
                return f"truncated or corrupt: member {broken} of its zip archive fails its CRC check", []
            data = zf.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as exc:
        return f"truncated or corrupt: its zip archive cannot be read ({exc})", []
    try:
        wanted, storages = _scan(pickletools.genops(io.BytesIO(data)))
    except ValueError as exc:
        return f"truncated or corrupt: its data.pkl is not a complete pickle ({exc})", []
    prefix = pickles[0][: -len("data.pkl")]
    missing = [k for k in storages if f"{prefix}data/{k}" not in names]
    if missing:
        return f"truncated or corrupt: the zip archive lacks the records of {len(missing)} tensor storage(s) (first: {missing[0]})", []
    return None, wanted


def _inspect_legacy(path: Path) -> tuple[str | None, list[str]]:
    """Legacy torch.save: pickles of the magic number, protocol version, system info, the object and the
    storage keys, then each storage as an int64 element count and its bytes."""
    wanted: list[str] = []
    with open(path, "rb") as f:
        for i, what in enumerate(("magic number", "protocol version", "system info", "object", "storage keys")):
            try:
                ops = list(pickletools.genops(f))
            except ValueError as exc:
                return f"truncated or corrupt: its {what} pickle is incomplete ({exc})", []
            if i == 0 and not any(op.name in ("LONG1", "LONG4", "INT", "LONG") and arg == TORCH_MAGIC for op, arg, _ in ops):
                return "a pickle, but not a PyTorch checkpoint (no torch.save magic number)", []
            if i == 3:
                wanted, storages = _scan(ops)
        order = [arg for op, arg, _ in ops if op.name in _STRING_OPS]  # the storage keys pickle: a list of strings
        problem = _check_legacy_storages(f, order, storages, path.stat().st_size)
    return problem, wanted


def _check_legacy_storages(f, keys: list[str], storages: dict[str, str], size: int) -> str | None:
    for key in keys:
        header = f.read(8)
        itemsize = _itemsize(storages.get(key, ""))
        if len(header) < 8 or itemsize is None:
            return f"truncated or corrupt: the data of tensor storage {key} is missing or of an unknown type"
        end = f.tell() + int.from_bytes(header, "little") * itemsize
        if end > size:
            return f"truncated or corrupt: the data of tensor storage {key} ends {end - size} bytes early"
        f.seek(end)
    return None


def _itemsize(storage_global: str) -> int | None:
    """Bytes per element of a ``torch.FloatStorage``-style global, None for anything else."""
    cls = getattr(torch, storage_global.removeprefix("torch."), None) if storage_global.startswith("torch.") else None
    with warnings.catch_warnings():  # typed storage classes are deprecated; their dtype is still the answer
        warnings.simplefilter("ignore")
        dtype = getattr(cls, "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


class _Global(str):
    """A global on the simulated stack (its ``module.name``), told apart from a plain string."""


def _scan(ops) -> tuple[list[str], dict[str, str]]:
    """From ``genops`` opcodes: ``module.name`` of every GLOBAL / STACK_GLOBAL, and the storage keys the
    tensors name, each with its storage global (the key is the string pushed right after a
    ``torch.*Storage`` global, itself often fetched from the memo). Pushed values are tracked through the memo."""
    memo: dict[int, object] = {}
    pushed: list[object] = []  # what each opcode pushed: strings and globals kept, other values as None
    found: list[str] = []
    storages: dict[str, str] = {}
    for op, arg, _ in ops:
        if op.name in _STRING_OPS or op.name in _GET_OPS:
            value = arg if op.name in _STRING_OPS else memo.get(arg)
            previous = pushed[-1] if pushed else None
            if isinstance(previous, _Global) and previous.endswith("Storage") and type(value) is str:
                storages.setdefault(value, previous)
            pushed.append(value)
        elif op.name in _PUT_OPS or op.name == "MEMOIZE":
            memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif op.name in ("GLOBAL", "STACK_GLOBAL"):
            found.append(_global_name(op.name, arg, pushed))
            pushed.append(_Global(found[-1]))
        elif op.stack_after:
            pushed.append(None)
    return found, storages


def _global_name(opname: str, arg, pushed: list[object]) -> str:
    if opname == "GLOBAL":
        return arg.replace(" ", ".")
    module, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
    return f"{module}.{name}" if type(module) is str and type(name) is str else "<a global named on the stack>"


def _beyond_weights_only(wanted: list[str], failure: Exception) -> list[str]:
    """The globals ``weights_only`` refuses: checked against torch's allow-lists, plus the one torch's message names."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        allowed = set(_get_allowed_globals()) | set(_get_user_allowed_globals())
        beyond = [g for g in dict.fromkeys(wanted) if g not in allowed]
    except (ImportError, AttributeError):  # a torch without these private helpers: its message is the only source
        beyond = []
    named = re.search(r"Unsupported global: GLOBAL (\S+)", str(failure))
    if named and named.group(1) not in beyond:
        beyond.insert(0, named.group(1))
    return beyond


def _torch_reason(failure: Exception) -> str:
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    return f"{type(failure).__name__}: {lines[0] if lines else ''}"
