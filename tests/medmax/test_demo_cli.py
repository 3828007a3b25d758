"""`medmax demo`: listed among the programs, loopback by default, clear errors before serving anything."""

from __future__ import annotations

import sys

import pytest

from medmax.__main__ import _build_parser, main


def test_programs_lists_the_demo(capsys):
    assert main(["programs"]) == 0
    assert "medmax demo --model DIR" in capsys.readouterr().out


def test_defaults_serve_on_loopback_without_a_share_link():
    args = _build_parser().parse_args(["demo", "--model", "m"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--share" in out and "--host" in out and "--max-upload-mb" in out


def test_a_folder_without_a_model_is_refused(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_without_gradio_the_error_says_which_extra_to_install(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    assert main(["demo", "--model", str(tiny_model_dir), "--device", "cpu"]) == 2
    assert "pip install -e '.[demo]'" in capsys.readouterr().err
