"""The runner loses nothing and says what is wrong: atomic rewrites, the output-folder lock, a torn
results.json, repeated grid values, every config mistake at once, an unwritable --out, SIGTERM,
and resuming a folder with another config or mode."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kalmanopt.cli import main
from kalmanopt.runner import ConfigError, load_config
from kalmanopt.runner.storage import LOCK_NAME, OutputLock, atomic_write
from kalmanopt.runner.training import MetricsLog

ROOT = Path(__file__).parents[1]

TINY = """
task = "quadratic"
seeds = [0]
steps = 6
batch_size = 50
threads = 1
[task_options]
samples = 200
[[optimizers]]
torch = "sgd"
lr = 0.05
[[optimizers]]
preset = "koala++"
q = 0.01
"""


def run_cli(capsys, *args):
    status = main(["run", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kalmanopt: error: "), err
    return lines[0]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


# ---------------------------------------------------------------------------------------- atomic files
def test_atomic_write_leaves_the_old_file_whole_when_interrupted(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    class Boom(KeyboardInterrupt):
        pass

    def failing_replace(src, dst):
        raise Boom

    real = os.replace
    os.replace = failing_replace
    try:
        with pytest.raises(Boom):
            atomic_write(path, "new")
    finally:
        os.replace = real
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    atomic_write(path, "new")
    assert path.read_text() == "new"


def test_metrics_rewrite_interrupted_midway_keeps_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"run_id": f"r{i % 3}", "step": i}) for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    calls = []
    real_loads = json.loads

    class Killed(KeyboardInterrupt):
        pass

    def loads(text, *args, **kwargs):
        if any(p.suffix == ".tmp" for p in tmp_path.iterdir()):  # the copy is being written
            calls.append(1)
            if len(calls) == 1500:  # half-way through it
                raise Killed
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    with pytest.raises(Killed):
        MetricsLog.keep_only(path, {"r0", "r1"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    MetricsLog.keep_only(path, {"r0", "r1"})
    kept = MetricsLog.read(path)
    assert len(kept) == 2000 and {r["run_id"] for r in kept} == {"r0", "r1"}
    mtime = path.stat().st_mtime_ns
    MetricsLog.keep_only(path, {"r0", "r1"})  # nothing to drop: not rewritten
    assert path.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_locked_folder_fails_and_a_stale_lock_is_taken_over(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a live process holds the folder (as a run in progress would)
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        status, _, err = run_cli(capsys, tiny, "--out", out)
        assert status == 2
        line = one_error_line(err)
        assert f"another kalmanopt run (process {holder.pid}) is writing into" in line and "--out" in line
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and the next run takes it over
    (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
    status, _, err = run_cli(capsys, tiny, "--out", out)
    assert status == 0
    assert f"took over {out / LOCK_NAME}" in err and str(holder.pid) in err
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert len(json.loads((out / "results.json").read_text())) == 2
    with OutputLock(out) as lock:  # the API: a context manager that writes this process id
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid() and lock.took_over is None
    assert not (out / LOCK_NAME).exists()


def test_unwritable_out_is_one_error_line_before_training(tmp_path, tiny, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, _, err = run_cli(capsys, tiny, "--out", blocker / "sub")
    assert status == 2
    assert "cannot create the output folder" in one_error_line(err)
    status, _, err = run_cli(capsys, tiny, "--out", blocker)
    assert status == 2 and "exists and is not a folder" in one_error_line(err)


# ---------------------------------------------------------------------------------------- torn results
def test_a_torn_results_json_is_an_error_and_nothing_is_deleted(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, tiny, "--out", out)[0] == 0
    text = (out / "results.json").read_text()
    (out / "results.json").write_text(text[: len(text) // 2])  # torn by a crash
    metrics = (out / "metrics.jsonl").read_bytes()
    status, _, err = run_cli(capsys, tiny, "--out", out)
    assert status == 2
    line = one_error_line(err)
    assert "results.json" in line and "unreadable" in line and "nothing was changed or deleted" in line
    assert (out / "results.json").read_text() == text[: len(text) // 2]
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert not (out / LOCK_NAME).exists()
    assert main(["plot", str(out)]) == 2
    assert "unreadable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- config mistakes
def test_every_config_mistake_is_reported_at_once_before_training(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("""
seeds = 3
epochs = 2
[model_options]
hidden = "big"
[schedule]
kind = "multistep"
milestones = "10"
[[optimizers]]
torch = "sgd"
label = 5
[[optimizers]]
preset = "koala++"
[optimizers.grid]
lr = [0.5, 1.0, 0.5]
""")
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, config, "--out", out)
    assert status == 2
    line = one_error_line(err)
    for problem in ("seeds must be a non-empty list of integers", "label of optimizer entry",
                    "milestones must be a list of non-negative numbers", "option hidden must be an integer",
                    "grid.lr repeats [0.5]"):
        assert problem in line, (problem, line)
    assert line.count("(") >= 5 and "5 problems" in line
    assert not out.exists()


@pytest.mark.parametrize("text, problem", [
    ('steps = 1\noptimizers = ["sgd"]\n[model_options]\ndepth = 1.5', "option depth must be an integer"),
    ('steps = 1\noptimizers = ["sgd"]\n[task_options]\nmax_train = "all"', "option max_train must be an integer"),
    ('steps = "5"\noptimizers = ["sgd"]', "steps must be a positive integer"),
    ('steps = 1\ndiagnostics = "yes"\noptimizers = ["sgd"]', "diagnostics must be true or false"),
    ('steps = 1\nautocast = "fp8"\noptimizers = ["sgd"]', "autocast must be one of 'none', 'bf16'"),
    ('steps = 1\noptimizers = ["sgd"]\n[schedule]\nkind = "multistep"\nmilestones = [20, 10]', "increasing order"),
    ('steps = 1\n[[optimizers]]\ntorch = "sgd"\nclip_grad_norm = -1.0', "clip_grad_norm must be a positive"),
    ('steps = 1\n[[optimizers]]\ntorch = "sgd"\nlr = 0.1\n[optimizers.grid]\nlr = [0.1]', "both as a fixed"),
    ('steps = 1\nseeds = [1, 1]\noptimizers = ["sgd"]', "seeds must not repeat"),
])
def test_type_errors_are_named(text, problem):
    with pytest.raises(ConfigError, match="") as info:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kalmanopt-bad-{os.getpid()}.toml"
        path.write_text(text)
        try:
            load_config(path)
        finally:
            path.unlink()
    assert problem in str(info.value)


# ---------------------------------------------------------------------------------------- resume
def test_resuming_with_another_mode_or_config_is_refused(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, tiny, "--out", out)[0] == 0
    before = (out / "results.json").read_text()
    status, _, err = run_cli(capsys, tiny, "--out", out, "--quick")
    assert status == 2
    assert "holds a full run of config 'tiny'; this is a quick run: resume it without --quick" in one_error_line(err)
    tiny.write_text(TINY.replace("steps = 6", "steps = 7"))
    status, _, err = run_cli(capsys, tiny, "--out", out)
    assert status == 2
    assert "holds runs of another config (steps: 6 -> 7)" in one_error_line(err)
    assert (out / "results.json").read_text() == before
    # more seeds, another device or thread count: a resume, not another config
    tiny.write_text(TINY)
    status, out_text, _ = run_cli(capsys, tiny, "--out", out, "--seeds", "0,1", "--device", "cpu")
    assert status == 0 and "resumed: 2 run(s) were already finished" in out_text
    assert len(json.loads((out / "results.json").read_text())) == 4


TEXT = """
name = "text-tiny"
task = "text"
seeds = [0, 1]
steps = 4
batch_size = 4
threads = 1
[task_options]
block_size = 8
[model_options]
d_model = 16
n_layer = 1
n_head = 2
[[optimizers]]
torch = "adamw"
"""


def _corpus(folder):
    folder.mkdir()
    (folder / "corpus.txt").write_text("the filter's gain weighs the innovation by its noise. " * 40)
    return folder / "corpus.txt"


def test_the_same_data_at_another_path_resumes_every_run(tmp_path, capsys, monkeypatch):
    corpus, config, out = _corpus(tmp_path / "data"), tmp_path / "text.toml", tmp_path / "out"
    config.write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, config, "--out", out, "--data", "data/corpus.txt")[0] == 0
    before = json.loads((out / "results.json").read_text())
    moved = corpus.rename(_corpus(tmp_path / "elsewhere"))  # the same text, at another (absolute) path
    status, text, _ = run_cli(capsys, config, "--out", out, "--data", moved.resolve())
    assert status == 0 and "resumed: 2 run(s) were already finished" in text
    assert json.loads((out / "results.json").read_text()) == before


def test_a_folder_whose_run_ids_held_the_data_path_resumes_under_the_ids_of_now(tmp_path, capsys):
    corpus, config, out = _corpus(tmp_path / "data"), tmp_path / "text.toml", tmp_path / "out"
    config.write_text(TEXT)
    assert run_cli(capsys, config, "--out", out, "--data", corpus)[0] == 0
    now = load_config(config, overrides={"data": corpus})
    ids = {r.run_id: now.legacy_run_id(r.optimizer, r.hyperparameters, r.seed, str(corpus)) for r in now.runs()}
    assert all(old != new for new, old in ids.items())
    # the folder as an earlier kalmanopt wrote it: its ids held the data path
    records = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps([{**r, "run_id": ids[r["run_id"]]} for r in records]))
    MetricsLog.rename(out / "metrics.jsonl", ids)
    assert {m["run_id"] for m in MetricsLog.read(out / "metrics.jsonl")} == set(ids.values())
    status, text, _ = run_cli(capsys, config, "--out", out, "--data", corpus)
    assert status == 0 and "resumed: 2 run(s) were already finished" in text
    assert [r["run_id"] for r in json.loads((out / "results.json").read_text())] == [r["run_id"] for r in records]
    metrics = MetricsLog.read(out / "metrics.jsonl")
    assert {m["run_id"] for m in metrics} == set(ids) and len(metrics) > len(ids)


def test_quick_runs_get_their_own_default_folder(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, tiny, "--quick")[0] == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("tiny-quick-")
    assert json.loads((folder / "config.json").read_text())["mode"] == "quick"
    assert "**Mode**: quick" in (folder / "summary.md").read_text()


# ---------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text("""
task = "digits"
seeds = [0, 1, 2, 3]
steps = 400
eval_every = 400
log_every = 50
threads = 1
[[optimizers]]
torch = "sgd"
lr = 0.1
""")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "kalmanopt.cli", "run", str(config), "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "results.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    if process.returncode == 0:  # the grid finished before the signal: nothing to test on this machine
        pytest.skip("the grid finished before SIGTERM arrived")
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM): kept" in stderr and f"--out {out}" in stderr
    assert "Traceback" not in stderr
    kept = json.loads((out / "results.json").read_text())
    assert 1 <= len(kept) < 4
    assert {m["run_id"] for m in MetricsLog.read(out / "metrics.jsonl")} == {r["run_id"] for r in kept}
    assert not (out / LOCK_NAME).exists()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resumed: {len(kept)} run(s) were already finished" in result.stdout
    assert len(json.loads((out / "results.json").read_text())) == 4
