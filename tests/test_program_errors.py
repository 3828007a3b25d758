"""One way to fail: every console script answers a user's mistake with one line and exit code 2.

Each script of pyproject.toml's ``[project.scripts]`` is run as its console-script wrapper runs it
(``sys.exit(main())``) with an argument it does not know, and with an input file that does not exist.
Both must end in one ``prog: error: message`` line on stderr (the message naming the missing file) and
exit code 2, never a traceback and never Python's bare ``SystemExit(message)`` (exit code 1). ``prog`` is the
console script's name, whichever way the program fails. Each script also gets a value its parser accepts and
its config refuses.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

# Each script's arguments with a missing input ({missing}); {tmp} is an empty folder.
MISSING_INPUT = {
    "medmax": ["generate", "--model", "{missing}", "--prompt", "x", "--mode", "text", "--output", "{tmp}/out"],
    "medmax-image-tokenize": ["--input", "{missing}", "--output", "{tmp}/out", "--ckpt", "{tmp}"],
    "medmax-train-vqgan": ["--input", "{missing}", "--output", "{tmp}/out"],
    "medmax-train-tokenizer": ["--input", "{missing}", "--output", "{tmp}/out"],
    "medmax-build-sequences": ["--input", "{missing}", "--tokenizer", "preset:tiny", "--output", "{tmp}/out"],
    "medmax-train": ["--config", "{missing}"],
    "medmax-export": ["--checkpoint", "{missing}", "--output", "{tmp}/out"],
    "medmax-convert": ["--input", "{missing}", "--output", "{tmp}/out"],
    "medmax-eval": ["--model", "{tmp}", "--data", "{missing}", "--output", "{tmp}/out"],
    "medmax-build-preferences": ["--input", "{missing}", "--tokenizer", "preset:tiny", "--output", "{tmp}/out"],
    "medmax-make-preferences": ["--model", "{missing}", "--input", "{missing}", "--output", "{tmp}/out.jsonl"],
}
NO_INPUT_FILE = {"medmax-quickstart"}  # it makes its own data; it still gets the bad-argument case
ERROR_LINE = re.compile(r"^(?P<prog>[\w.\- ]+): error: (?P<message>.+)$")


def test_every_script_has_a_missing_input_case():
    assert set(MISSING_INPUT) | NO_INPUT_FILE == set(SCRIPTS)


def _run(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run a console script's main as its wrapper does; -> (exit code, stderr)."""
    import importlib

    module, _, attr = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # sys.exit(main()) turns a str code into exit code 1
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=__import__("sys").stderr)
    return code or 0, capsys.readouterr().err


def _error_line(err: str) -> re.Match:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert sum(": error:" in line for line in lines) == 1, err
    match = ERROR_LINE.match(lines[-1])
    assert match, f"the last line of stderr is not 'prog: error: message': {lines[-1]!r}"
    return match


def _args(argv: list[str], tmp_path: Path) -> list[str]:
    return [a.format(missing=tmp_path / "no-such-file.csv", tmp=tmp_path) for a in argv]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_bad_argument_is_one_error_line_and_exit_code_2(name, tmp_path, capsys):
    argv = _args(MISSING_INPUT.get(name, []), tmp_path) + ["--no-such-flag"]
    code, err = _run(name, argv, capsys)
    assert code == 2, err
    line = _error_line(err)
    assert "--no-such-flag" in line["message"]
    assert line["prog"].split()[0] == name


@pytest.mark.parametrize("name", sorted(MISSING_INPUT))
def test_a_missing_input_file_is_one_error_line_and_exit_code_2(name, tmp_path, capsys):
    argv = _args(MISSING_INPUT[name], tmp_path)
    _, parse_err = _run(name, argv + ["--no-such-flag"], capsys)
    code, err = _run(name, argv, capsys)
    assert code == 2, err
    line = _error_line(err)
    assert "no-such-file.csv" in line["message"]
    assert line["prog"].split()[0] == _error_line(parse_err)["prog"].split()[0] == name  # one name: the console script's


# A value the program refuses once parsed (argparse accepts it): the flag is named in the one line.
BAD_VALUE = {
    "medmax": (["generate", "--model", "{tmp}", "--prompt", "x", "--mode", "text", "--output", "{tmp}/out",
                "--top-p", "1.5"], "top_p"),
    "medmax-image-tokenize": (["--input", "{csv}", "--output", "{tmp}/out", "--ckpt", "{tmp}", "--batch-size", "0"],
                              "--batch-size"),
    "medmax-build-sequences": (["--input", "{csv}", "--tokenizer", "preset:tiny", "--output", "{tmp}/out",
                                "--workers", "0"], "--workers"),
    "medmax-build-preferences": (["--input", "{csv}", "--tokenizer", "preset:tiny", "--output", "{tmp}/out",
                                  "--workers", "0"], "--workers"),
    "medmax-make-preferences": (["--model", "{tmp}", "--input", "{csv}", "--output", "{tmp}/out.jsonl",
                                 "--noise-level", "2"], "--noise-level"),
    "medmax-train-vqgan": (["--input", "{csv}", "--output", "{tmp}/out", "--batch-size", "0"], "batch_size"),
    "medmax-export": (["--checkpoint", "{tmp}", "--output", "{tmp}/out", "--format", "chameleon", "--shards", "0"],
                      "--shards"),
    "medmax-convert": (["--output", "{tmp}/out", "--model-size", "7b"], "--input"),
    "medmax-quickstart": (["--output", "{tmp}/qs", "--nproc", "0"], "--nproc"),
    "medmax-eval": (["--model", "{tmp}", "--data", "{tmp}", "--output", "{tmp}/out", "--batch-size", "0"], "--batch-size"),
    "medmax-train-tokenizer": (["--input", "{csv}", "--output", "{tmp}/out", "--text-vocab-size", "10"], "--text-vocab-size"),
    "medmax-train": (["--config", "{yaml}"], "mode='nonsense'"),
}


def test_every_script_has_a_refused_value_case():
    assert set(BAD_VALUE) == set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(BAD_VALUE))
def test_a_refused_value_is_one_error_line_naming_the_flag(name, tmp_path, capsys):
    (tmp_path / "in.csv").write_text("img_path\na.png\n")
    (tmp_path / "config.yaml").write_text("mode: nonsense\ndatasets: [data]\n")
    argv, flag = BAD_VALUE[name]
    argv = [a.format(tmp=tmp_path, csv=tmp_path / "in.csv", yaml=tmp_path / "config.yaml") for a in argv]
    code, err = _run(name, argv, capsys)
    assert code == 2, err
    line = _error_line(err)
    assert flag in line["message"]
    assert line["prog"].split()[0] == name
