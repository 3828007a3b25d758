"""What the install promises: the Python versions pyproject.toml claims, and the Makefile's torch index."""

from __future__ import annotations

import ast
import glob
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SOURCES = [p for folder in ("medmax", "tokenization", "finetune", "eval", "bench", "tests") for p in (ROOT / folder).rglob("*.py")]
SOURCES += [ROOT / "quickstart.py"]


def _floor() -> tuple[int, int]:
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"].strip())
    assert match, f"requires-python {PROJECT['requires-python']!r}: expected >=X.Y"
    return int(match[1]), int(match[2])


def _interpreter(version: tuple[int, int]) -> str | None:
    if sys.version_info[:2] == version:
        return sys.executable
    name = f"python{version[0]}.{version[1]}"
    pyenv = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / f"{version[0]}.{version[1]}.*" / "bin" / name)))
    for candidate in [*pyenv[-1:], shutil.which(name)]:  # a pyenv shim on PATH may not run: try each
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_running_python_is_one_the_project_claims():
    assert sys.version_info[:2] >= _floor()


def test_the_oldest_claimed_python_has_every_stdlib_module_and_parses_every_file():
    """requires-python >= 3.10 with `import tomllib` (3.11+) in the tests: the claim must hold for every file."""
    floor = _floor()
    python = _interpreter(floor)
    if python is None:
        pytest.skip(f"no Python {floor[0]}.{floor[1]} interpreter here to check requires-python against")
    script = ("import json, sys\nbad = []\nfor f in sys.argv[1:]:\n    try:\n        compile(open(f).read(), f, 'exec')\n"
              "    except SyntaxError as e:\n        bad.append(f'{f}: {e}')\n"
              "print(json.dumps({'stdlib': sorted(sys.stdlib_module_names), 'bad': bad}))")
    out = json.loads(subprocess.run([python, "-c", script, *map(str, SOURCES)], capture_output=True, text=True,
                                    check=True).stdout)
    assert not out["bad"]
    missing = {f"{p.relative_to(ROOT)}: {m}" for p in SOURCES for m in _top_level_imports(p)
               if m in sys.stdlib_module_names and m not in out["stdlib"]}
    assert not missing, f"standard-library modules Python {floor[0]}.{floor[1]} lacks: {sorted(missing)}"


def _dry_run(*variables: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n prints the install recipe without running it; -B as if nothing were installed yet
    return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install", "VENV=/nonexistent/venv", *variables],
                          capture_output=True, text=True, check=True).stdout


def test_make_takes_the_torch_index_for_a_cpu_only_install():
    url = "https://download.pytorch.org/whl/cpu"
    torch_line = next(l for l in _dry_run(f"TORCH_INDEX_URL={url}").splitlines() if " torch==" in l)
    assert f"--index-url {url}" in torch_line
    default = next(l for l in _dry_run().splitlines() if " torch==" in l)
    assert "--index-url" not in default
