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


class UserError(ValueError):
    """A user's mistake (a setting, file, row or folder that cannot be used); the message names it and why."""
