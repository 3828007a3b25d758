"""How every program starts and fails: one logging format, one error line, one exit code.

Each program's ``main(argv=None)`` is decorated with :func:`program`::

    @program("medmax-eval")
    def main(argv: list[str] | None = None) -> int:
        ...

which sets up logging (:data:`LOG_FORMAT`, level INFO; under torchrun each line names its rank) and runs
``main``. A user's mistake ends the program with one line on stderr, ``prog: error: message``, and
exit code 2, as argparse ends a bad argument:

- a :class:`medmax.errors.UserError` (every error class that describes a user's mistake subclasses it);
- a missing, existing or unreadable path (``FileNotFoundError``, ``FileExistsError``,
  ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``), whose message names the path;
- ``SystemExit(message)`` with a text message;
- a write the file system refuses (a full disk, a read-only file system, a quota: ``OSError`` with an errno
  in :data:`medmax.errors.DISK_ERRNOS`, or safetensors' error carrying one), as ``path: cannot write: reason``.

Anything else is a bug in the toolkit and raises with its traceback. Under torchrun each failing rank
prints its own one line; ranks that stop because another failed say which.

This module imports nothing heavy: ``--help`` of every program stays free of torch.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from .errors import UserError, is_disk_refusal, refusal_reason

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_USER_ERROR = 2  # argparse's code for a bad argument


def setup_logging(level: int = logging.INFO) -> None:
    """The one log format of every program; a line of a torchrun worker also names its rank."""
    fmt = LOG_FORMAT
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fmt = LOG_FORMAT.replace("%(name)s", f"[rank {os.environ.get('RANK', '?')}] %(name)s")
    logging.basicConfig(level=level, format=fmt)
    logging.getLogger("DeepSpeed").addFilter(not_deepspeed_cpu_notice)


def not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's "Setting accelerator to CPU" notice, a filter on DeepSpeed's own logger.

    accelerate imports DeepSpeed whenever it is installed (its ``unwrap_model`` looks for a ``DeepSpeedEngine``,
    and transformers' Trainer calls it as it starts), and DeepSpeed, finding no CUDA device as it loads, prints
    that notice on stdout in every program that trains or exports on CPU, DeepSpeed used or not. A logger keeps
    its filters when DeepSpeed sets it up on import. ``finetune.train`` removes it when ``deepspeed=`` is set.
    """
    return not record.getMessage().startswith("Setting accelerator to CPU")


def error_line(prog: str, error: BaseException | str) -> str:
    """``prog: error: message`` on one line (a message's own line breaks become spaces; one prefix only)."""
    message = " ".join(str(error).split())
    return message if message.startswith(f"{prog}: error: ") else f"{prog}: error: {message}"


def fail(prog: str, error: BaseException | str) -> int:
    """Print the one error line to stderr; -> the exit code of a user's mistake."""
    print(error_line(prog, error), file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run(prog: str, body: Callable[..., int | None], *args, **kwargs) -> int:
    """``body(*args, **kwargs)`` with logging set up; a user's mistake becomes one error line and code 2."""
    setup_logging()
    try:
        return body(*args, **kwargs) or 0
    except USER_ERRORS as err:
        return fail(prog, err)
    except Exception as err:  # noqa: BLE001 -- only a disk refusal is handled; everything else re-raised
        if not is_disk_refusal(err):
            raise
        return fail(prog, f"{getattr(err, 'filename', None) or 'writing'}: cannot write: "
                          f"{getattr(err, 'strerror', None) or refusal_reason(err)}")
    except SystemExit as exc:
        if isinstance(exc.code, str):  # SystemExit("message"): Python would print it bare and exit 1
            return fail(prog, exc.code)
        raise


def program(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a program's ``main(argv=None)`` so it runs through :func:`run` as ``prog``."""
    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            return run(prog, main, argv)
        return wrapped
    return wrap
