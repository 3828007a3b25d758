"""Asking a program for --help costs no heavy import: torch and transformers load only when a run needs them.

Each console script of pyproject.toml runs ``main(["--help"])`` in a fresh interpreter, which then
reports the heavy modules it holds. (Importing torch alone takes about a second; with transformers'
Chameleon modules a --help took 3 to 9 s; bench/bench_startup.py times it as a whole process.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "transformers", "pandas", "accelerate", "peft")
PROBE = """
import sys
from {module} import {attr} as main
try:
    main({argv!r})
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules))
"""

CASES = [(name, ["--help"]) for name in sorted(SCRIPTS)] + [("medmax", ["generate", "--help"]), ("medmax", ["demo", "--help"])]


@pytest.mark.parametrize("name,argv", CASES, ids=[" ".join([n, *a]) for n, a in CASES])
def test_help_imports_no_heavy_module(name, argv):
    module, _, attr = SCRIPTS[name].partition(":")
    code = PROBE.format(module=module, attr=attr, argv=argv, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
    loaded = proc.stdout.rsplit("HEAVY", 1)[1].strip()
    assert loaded == "", f"{name} {' '.join(argv)} imported {loaded}"
