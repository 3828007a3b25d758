"""The mistakes eval.run reports as one line (``medmax-eval: error: ...``, exit code 2) instead of a traceback."""

from __future__ import annotations

from medmax.errors import UserError


class EvalError(UserError):
    """A setting, input or output folder that cannot be used as given; the message names it and why."""


class FingerprintMismatch(EvalError):
    """An output folder holds predictions made from other inputs or settings."""


class ShardError(EvalError):
    """Shards of one launch that cannot agree or did not all finish."""
