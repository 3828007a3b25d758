"""The one base class of the errors that describe a user's mistake.

A :class:`UserError` is a setting, an input file, a data row or a folder that cannot be used as it
was given; its message is one line naming the flag, file or row and the reason. Every program's
``main`` runs through :func:`medmax.cli.program`, which prints such an error as ``prog: error:
message`` and exits with code 2; any other exception is a bug in the toolkit and keeps its traceback.

It subclasses ``ValueError``, so code that caught ``ValueError`` before still catches it. The
specific classes (``finetune.config.ConfigError``, ``medmax.data.loader.DataError``,
``medmax.images.ImageLoadError``, ``medmax.paths.PathEscapeError``, ``medmax.torch_files.CheckpointError``,
``eval.errors.EvalError``, ...) subclass it; raise one of them, or this class, never a bare
``SystemExit(message)``.
"""

from __future__ import annotations

import errno


class UserError(ValueError):
    """A user's mistake (a setting, file, row or folder that cannot be used); the message names it and why."""


# A write the file system refuses: the user's environment (a full disk, a read-only mount, a quota), not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})


def is_disk_refusal(err: BaseException) -> bool:
    """``err`` is an OSError the file system raised refusing a write (see :data:`DISK_ERRNOS`)."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


class WriteRefused(UserError):
    """An output the file system would not let us write (full, read-only, over quota); names where and why."""


def write_refused(where, err: OSError, advice: str = "nothing was kept") -> WriteRefused:
    """The one-line :class:`WriteRefused` for a disk refusal ``err`` while writing ``where``."""
    at = f" at {err.filename}" if err.filename and str(err.filename) != str(where) else ""
    return WriteRefused(f"{where}: cannot write ({err.strerror}{at}); {advice}")
