"""``--plugins`` (a module that registers parts), and what the runner writes: file modes, "triton: not installed"."""

from __future__ import annotations

import os
import stat
import sys

import pytest

import kalmanopt
from kalmanopt.cli import main

PLUGIN = '''
import kalmanopt
from kalmanopt.filters.koala import koala_pp

@kalmanopt.register_preset("my-koala", replace=True)
def my_koala():
    """KOALA++ under another name, from a plugin module."""
    return koala_pp()
'''


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    (tmp_path / "my_parts.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    yield tmp_path
    kalmanopt.registry._PRESETS.pop("my-koala", None)
    sys.modules.pop("my_parts", None)
    sys.path[:] = path


def test_plugins_are_imported_before_the_command(plugin_folder, capsys):
    assert "my-koala" not in kalmanopt.presets()
    assert main(["list", "--plugins", "my_parts"]) == 0
    out = capsys.readouterr().out
    assert "my-koala" in out and "KOALA++ under another name, from a plugin module." in out
    assert "class: kalmanopt.optim.MyKoala(params, **hyper-parameters)" in out


def test_a_plugin_that_does_not_import_is_one_line_and_exit_2(plugin_folder, capsys):
    assert main(["list", "--plugins", "my_parts,no_such_module"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kalmanopt: error: --plugins: cannot import 'no_such_module': ModuleNotFoundError")


def test_written_files_have_the_mode_open_gives(tmp_path):
    from kalmanopt.runner.storage import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "summary.md", "text")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.md").stat().st_mode) == 0o644


def test_the_summary_says_triton_is_not_installed():
    from kalmanopt.runner.results import _provenance_lines

    records = [{"seed": 0, "steps": 10, "seconds": 1.0,
                "provenance": {"torch": "2.13.0", "triton": None, "kalmanopt": "0.1.0", "python": "3.11"}}]
    text = "\n".join(_provenance_lines(records, {}))
    assert "triton not installed" in text and "torch 2.13.0" in text


def test_steps_or_epochs_from_the_command_line_replace_the_configs_length(capsys):
    from kalmanopt.runner import load_config

    default = load_config(None)
    assert default.epochs is not None and default.steps is None
    by_steps = load_config(None, overrides={"steps": 3})
    assert (by_steps.steps, by_steps.epochs) == (3, None)
    by_epochs = load_config(None, quick=True, overrides={"epochs": 1})
    assert (by_epochs.steps, by_epochs.epochs) == (None, 1)
    assert main(["run", "--steps", "2", "--epochs", "1", "--out", "/nonexistent/never"]) == 2
    assert "give exactly one of epochs and steps" in capsys.readouterr().err
    assert main(["run", "--steps", "0", "--out", "/nonexistent/never"]) == 2
    assert "steps" in capsys.readouterr().err
