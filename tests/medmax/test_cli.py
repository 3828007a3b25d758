"""medmax.cli: the runner every program's main goes through (one error line and exit code 2, bugs keep their traceback)."""

from __future__ import annotations

import logging

import pytest

from medmax.cli import LOG_FORMAT, program, setup_logging
from medmax.errors import UserError


def _main(exc: BaseException | None):
    @program("prog")
    def main(argv=None) -> int:
        if exc is not None:
            raise exc
        return 0
    return main


@pytest.mark.parametrize("exc", [UserError("--flag x: bad\nreally bad"), FileNotFoundError("data.csv: no such file"),
                                 SystemExit("--input x: no such CSV file")])
def test_a_users_mistake_is_one_line_and_exit_code_2(exc, capsys):
    assert _main(exc)() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: ") and str(exc.args[0]).split()[-1] in err


@pytest.mark.parametrize("exc", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug"), RuntimeError("a bug")])
def test_a_bug_keeps_its_traceback(exc, capsys):
    with pytest.raises(type(exc), match="a bug"):
        _main(exc)()
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("code", [0, 2, None])
def test_argparse_exits_pass_through(code):
    with pytest.raises(SystemExit) as info:
        _main(SystemExit(code))()
    assert info.value.code == code


def test_every_users_error_class_shares_the_base():
    from eval.data import BadRow
    from eval.errors import EvalError
    from eval.scoring import UnresolvedGold
    from finetune.config import ConfigError
    from finetune.modes import NothingToTrainError
    from medmax.demo import DemoError
    from medmax.images import ImageLoadError
    from medmax.memory import MemoryBudgetError
    from medmax.paths import PathEscapeError
    from medmax.data.build import RowRejected
    from medmax.data.rows import RowError
    from medmax.torch_files import CheckpointError, UntrustedCheckpointError
    from medmax.data.shards import DataError
    from medmax.vocab import ControlTokenInText

    for cls in (BadRow, EvalError, UnresolvedGold, ConfigError, NothingToTrainError, DemoError, ImageLoadError,
                MemoryBudgetError, PathEscapeError, RowRejected, RowError, CheckpointError, UntrustedCheckpointError,
                DataError, ControlTokenInText):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls


def test_a_torchrun_worker_logs_its_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        setup_logging()
        line = root.handlers[0].format(logging.makeLogRecord({"name": "x", "msg": "hello", "levelname": "INFO"}))
    finally:
        root.handlers[:] = saved
    assert line.endswith("INFO [rank 1] x: hello") and "%(name)s" in LOG_FORMAT


def test_a_message_that_already_names_the_program_is_not_prefixed_twice(capsys):
    assert _main(SystemExit("prog: error: --input x: no such file"))() == 2
    assert capsys.readouterr().err == "prog: error: --input x: no such file\n"


@pytest.mark.parametrize("code, words", [(28, "No space left on device"), (30, "Read-only file system"),
                                         (122, "Disk quota exceeded")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(code, words, capsys):
    """Every program: the file system refusing a write is the user's environment, not a bug."""
    assert _main(OSError(code, words, "/data/out/part-0.parquet"))() == 2
    err = capsys.readouterr().err
    assert err == f"prog: error: /data/out/part-0.parquet: cannot write: {words}\n"


def test_safetensors_refusing_a_write_is_one_line_too(capsys):
    from safetensors import SafetensorError

    assert _main(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))() == 2
    assert capsys.readouterr().err == "prog: error: writing: cannot write: No space left on device\n"
    with pytest.raises(SafetensorError):  # any other safetensors error is still a bug with its traceback
        _main(SafetensorError("Error while deserializing header: HeaderTooLarge"))()
