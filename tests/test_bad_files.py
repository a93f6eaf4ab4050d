"""Bad data files and full disks reach the user as one line and exit status 2, nothing lost (issue 27, item 4)."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest

from kalmanopt.cli import main
from kalmanopt.runner import storage, training

TEXT_CONFIG = """
name = "tiny-text"
task = "text"
model = "gpt"
seeds = [0]
steps = 2
batch_size = 2
threads = 1
log_every = 1
diagnostics = false

[task_options]
block_size = 8

[model_options]
d_model = 8
n_layer = 1
n_head = 1

[[optimizers]]
torch = "sgd"
lr = 0.01
"""

DIGITS_CONFIG = """
name = "tiny-digits"
task = "digits"
model = "mlp"
seeds = [0, 1]
steps = 2
batch_size = 16
threads = 1
diagnostics = false

[model_options]
hidden = 4

[[optimizers]]
torch = "sgd"
lr = 0.01
"""


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("kalmanopt: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def text_config(tmp_path):
    config = tmp_path / "text.toml"
    config.write_text(TEXT_CONFIG)
    return config


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"abc", "too few"),
])
def test_an_empty_or_too_short_text_file_is_one_line_and_status_2(tmp_path, capsys, text_config, content, words):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    out = tmp_path / "out"
    assert main(["run", str(text_config), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert words in line and str(data) in line, line
    assert not out.exists()  # refused upfront, before the output folder was made


def test_a_missing_or_directory_text_file_is_one_line(tmp_path, capsys, text_config):
    for data in (tmp_path / "nope.txt", tmp_path):
        assert main(["run", str(text_config), "--data", str(data), "--no-progress"]) == 2
        assert "not found" in _one_error_line(capsys)


def test_an_unreadable_text_file_is_one_line(tmp_path, capsys, text_config, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_bytes(b"x" * 1000)
    real_open = open

    def refusing(path, *args, **kwargs):
        if Path(path) == data:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing)
    monkeypatch.setattr(Path, "read_bytes", lambda self: refusing(self))
    assert main(["run", str(text_config), "--data", str(data), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "cannot read" in line and "Permission denied" in line, line


def test_binary_garbage_trains_as_bytes(tmp_path, capsys, text_config):
    """Any bytes are a corpus for the byte vocabulary: a binary file trains (no traceback)."""
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 4)
    assert main(["run", str(text_config), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0


def test_a_garbage_cifar_archive_is_one_line(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x00garbage, not a pickle\xff" * 10)
    config = tmp_path / "c.toml"
    config.write_text('task = "cifar10"\nsteps = 1\nthreads = 1\noptimizers = ["sgd"]\n')
    assert main(["run", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "not a CIFAR python-format batch" in line and "data_batch_1" in line, line
    # a pickle of the wrong thing
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}))
    assert main(["run", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not a CIFAR python-format batch" in _one_error_line(capsys)


def _full_disk_after(monkeypatch, target: str, calls_before: int) -> None:
    """Make the ``calls_before + 1``-th atomic write of ``target`` fail with ENOSPC (a full disk)."""
    real = storage.atomic_write_with
    seen = {"n": 0}

    def writing(path, write, **kwargs):
        if Path(path).name == target:
            seen["n"] += 1
            if seen["n"] > calls_before:
                def failing(f):
                    write(f)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, failing, **kwargs)
        return real(path, write, **kwargs)

    monkeypatch.setattr(storage, "atomic_write_with", writing)
    for module in ("kalmanopt.runner.storage", "kalmanopt.runner.results", "kalmanopt.runner.training"):
        mod = __import__(module, fromlist=["x"])
        if hasattr(mod, "atomic_write_with"):
            monkeypatch.setattr(mod, "atomic_write_with", writing)


def test_a_full_disk_while_writing_results_is_one_line_and_keeps_results(tmp_path, capsys, monkeypatch):
    config = tmp_path / "d.toml"
    config.write_text(DIGITS_CONFIG)
    out = tmp_path / "out"
    _full_disk_after(monkeypatch, "results.json", 1)  # the first run's results are written, the second's not
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "results.json" in line and "resume" in line, line
    records = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in records] == [0]  # intact: the run saved before the disk filled
    assert not list(out.glob(".results.json.*.tmp"))  # no temporary file left behind
    assert not (out / ".kalmanopt.lock").exists()  # the folder is released
    monkeypatch.undo()
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0  # the same command resumes
    assert sorted(r["seed"] for r in json.loads((out / "results.json").read_text())) == [0, 1]


def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "d.toml"
    config.write_text(DIGITS_CONFIG)
    out = tmp_path / "out"

    class FullFile:
        """A file on a full disk: every write fails."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    real_init = training.MetricsLog.__init__

    def init(self, path):
        real_init(self, path)
        self._file = FullFile(self._file)

    monkeypatch.setattr(training.MetricsLog, "__init__", init)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "metrics.jsonl" in line, line
    assert not (out / ".kalmanopt.lock").exists()


def test_a_full_disk_in_plot_is_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "d.toml"
    config.write_text(DIGITS_CONFIG)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    before = (out / "results.json").read_bytes()
    _full_disk_after(monkeypatch, "summary.md", 0)
    assert main(["plot", str(out)]) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert (out / "results.json").read_bytes() == before
