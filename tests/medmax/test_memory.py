"""medmax.memory: an estimated allocation is checked against available memory before it is made."""

from __future__ import annotations

import logging

import pytest

from medmax import memory
from medmax.memory import MemoryBudgetError, available_bytes, check_fits, format_bytes


def test_too_large_is_refused_naming_what_and_the_override():
    with pytest.raises(MemoryBudgetError, match=r"x\.yaml: codebook needs about 3\.7 GiB, but only 1\.0 GiB .* pass --skip-it"):
        check_fits(4 * 10**9, "x.yaml: codebook", override="--skip-it", available=1 << 30)
    check_fits(1 << 30, "fits exactly", available=1 << 30)


def test_override_logs_instead_of_raising(caplog):
    with caplog.at_level(logging.WARNING, logger="medmax.memory"):
        check_fits(10**12, "huge", allow=True, available=1 << 20)
    assert "huge needs about 931.3 GiB" in caplog.text and "overridden" in caplog.text


def test_available_memory_is_measured_and_an_impossible_size_fails():
    free = available_bytes()
    assert free is not None and 0 < free < 1 << 50  # this machine reports MemAvailable
    with pytest.raises(MemoryBudgetError):
        check_fits(1 << 55, "32 PiB")  # no machine has it, whatever it reports


def test_cgroup_limit_lowers_the_figure(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("3000000\n")
    (tmp_path / "memory.current").write_text("1000000\n")
    monkeypatch.setattr(memory, "_CGROUP", tmp_path)
    assert available_bytes() == 2_000_000
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the kernel's figure alone
    assert available_bytes() == memory._meminfo_available()


def test_format_bytes():
    assert [format_bytes(n) for n in (5, 1536, 3 << 30)] == ["5 B", "1.5 KiB", "3.0 GiB"]
