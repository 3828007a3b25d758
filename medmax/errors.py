"""The one base class of the errors that describe a user's mistake.

A :class:`UserError` is a setting, an input file, a data row or a folder that cannot be used as it
was given; its message is one line naming the flag, file or row and the reason. Every program's
``main`` runs through :func:`medmax.cli.program`, which prints such an error as ``prog: error:
message`` and exits with code 2; any other exception is a bug in the toolkit and keeps its traceback.

It subclasses ``ValueError``, so code that caught ``ValueError`` before still catches it. The
specific classes (``finetune.config.ConfigError``, ``medmax.data.shards.DataError``,
``medmax.images.ImageLoadError``, ``medmax.paths.PathEscapeError``, ``medmax.torch_files.CheckpointError``,
``eval.errors.EvalError``, ...) subclass it; raise one of them, or this class, never a bare
``SystemExit(message)``.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(ValueError):
    """A user's mistake (a setting, file, row or folder that cannot be used); the message names it and why."""


# A write the file system refuses: the user's environment (a full disk, a read-only mount, a quota), not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report one: "... (os error 28)"


def disk_errno(err: BaseException) -> int | None:
    """The errno of a write the file system refused (see :data:`DISK_ERRNOS`), None for anything else.

    An ``OSError``'s own errno; safetensors raises its own class with the Rust I/O error in the message.
    """
    if isinstance(err, OSError):
        code = err.errno
    else:
        found = _RUST_IO_ERROR.search(str(err)) if type(err).__name__ == "SafetensorError" else None
        code = int(found.group(1)) if found else None
    return code if code in DISK_ERRNOS else None


def is_disk_refusal(err: BaseException) -> bool:
    return disk_errno(err) is not None


class WriteRefused(UserError):
    """An output the file system would not let us write (full, read-only, over quota); names where and why."""


def refusal_reason(err: BaseException) -> str:
    """``reason`` or ``reason at FILE`` of a disk refusal (:func:`disk_errno`)."""
    reason = getattr(err, "strerror", None) or os.strerror(disk_errno(err) or 0)
    filename = getattr(err, "filename", None)
    return f"{reason} at {filename}" if filename else reason


def write_refused(where, err: BaseException, advice: str = "nothing was kept") -> WriteRefused:
    """The one-line :class:`WriteRefused` for a disk refusal ``err`` while writing ``where``."""
    reason = refusal_reason(err).removesuffix(f" at {where}")
    return WriteRefused(f"{where}: cannot write ({reason}); {advice}")
