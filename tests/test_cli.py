"""The ``kalmanopt`` command end to end: a --quick run of the default ablation, resume, Ctrl-C,
``list``, ``plot``, and bad configs that fail with one clear line before any training."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from runner_helpers import summary_rows

from kalmanopt.cli import main
from kalmanopt.runner import experiment
from kalmanopt.runner.training import MetricsLog

DEFAULT_OPTIMIZERS = {"koala++", "koala++-ns", "koala-m", "koala-v", "koala-diag", "adamw", "sgd"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``kalmanopt run --quick`` of the default ablation into a fresh folder (shared by the tests below)."""
    out = tmp_path_factory.mktemp("quick") / "out"
    status = main(["run", "--quick", "--out", str(out), "--no-progress"])
    return status, out


def test_quick_default_run_writes_every_output(quick_run):
    status, out = quick_run
    assert status == 0
    for name in ("results.json", "results.csv", "summary.md", "metrics.jsonl", "config.json", "curves.png",
                 "diagnostics.png", "diagnostics-koala++.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    records = json.loads((out / "results.json").read_text())
    assert len(records) == len(DEFAULT_OPTIMIZERS) * 2  # [quick]: 2 seeds
    assert {r["optimizer"] for r in records} == DEFAULT_OPTIMIZERS
    assert {r["seed"] for r in records} == {0, 1}
    for r in records:
        assert r["status"] == "finished"
        for key in ("final_train_loss", "val_loss", "val_accuracy", "seconds", "seconds_per_step"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["optimizer"], key)
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["val_accuracy"] > 0.5, r  # two epochs on digits are far above chance (0.1)
        assert r["seconds"] > 0 and 0 < r["seconds_per_step"] < r["seconds"]
        assert r["steps"] == 2 * 45  # 1437 training images, batch 32, 2 epochs
        assert "lr" in r["hyperparameters"]
    koala = next(r for r in records if r["optimizer"] == "koala++")
    assert set(koala["counters"]) >= {"steps", "nonfinite_steps", "skipped_layers"}
    assert koala["counters"]["steps"] == koala["steps"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {"optimizer", "seed", "val_accuracy", "hp_lr", "seconds_per_step"} <= set(rows[0])


def test_quick_run_summary_ranks_best_first(quick_run):
    _, out = quick_run
    records = json.loads((out / "results.json").read_text())
    table = summary_rows((out / "summary.md").read_text())
    assert len(table) == len(DEFAULT_OPTIMIZERS)
    ranked = [line.split("`")[1] for line in table]
    means = {name: sum(r["val_accuracy"] for r in records if r["optimizer"] == name) / 2 for name in ranked}
    assert [means[n] for n in ranked] == sorted(means.values(), reverse=True)
    assert "±" in table[0]


def test_quick_run_metrics_hold_curves_and_diagnostics(quick_run):
    _, out = quick_run
    metrics = MetricsLog.read(out / "metrics.jsonl")
    kinds = {m["kind"] for m in metrics}
    assert {"train", "eval", "diagnostics"} <= kinds
    evals = [m for m in metrics if m["kind"] == "eval" and m["optimizer"] == "adamw" and m["seed"] == 0]
    assert [m["epoch"] for m in evals] == [1.0, 2.0]
    diag = [m for m in metrics if m["kind"] == "diagnostics" and m["optimizer"] == "koala++"]
    layer = next(iter(diag[-1]["layers"].values()))
    assert {"S", "gain_scale", "lambda", "alpha", "w", "cos_Hv"} <= set(layer)
    assert set(diag[-1]["layers"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert all(v > 0 for v in (layer["S"], layer["gain_scale"]))
    assert not any(m["kind"] == "diagnostics" and m["optimizer"] in ("adamw", "sgd") for m in metrics)


def test_rerun_with_the_same_out_skips_finished_runs(quick_run, capsys):
    _, out = quick_run
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert f"resumed: {len(DEFAULT_OPTIMIZERS) * 2} run(s) were already finished" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


def test_plot_redraws_a_finished_folder(quick_run, capsys):
    _, out = quick_run
    (out / "curves.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "curves.png").is_file()
    assert "curves.png" in capsys.readouterr().out


QUADRATIC = """
task = "quadratic"
seeds = [0]
steps = 30
batch_size = 50
threads = 1
[task_options]
samples = 200
[[optimizers]]
preset = "koala++"
q = 0.01
[[optimizers]]
torch = "sgd"
lr = 0.05
[[optimizers]]
torch = "adamw"
"""


def test_ctrl_c_keeps_finished_runs_and_resume_completes(tmp_path, monkeypatch, capsys):
    config = tmp_path / "quad.toml"
    config.write_text(QUADRATIC)
    out = tmp_path / "out"
    real = experiment.train_run
    calls = []

    def interrupted_on_the_second_run(run, *args, **kwargs):
        calls.append(run.run_id)
        if len(calls) == 2:  # Ctrl-C at the 12th step of the second run, after it logged some metrics
            steps = []

            def on_step(n):
                steps.append(n)
                if len(steps) == 12:
                    raise KeyboardInterrupt

            kwargs["on_step"] = on_step
        return real(run, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_run", interrupted_on_the_second_run)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 130
    assert "interrupted: kept 1 finished run(s)" in capsys.readouterr().err
    records = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in records] == ["koala++"]
    assert {m["run_id"] for m in MetricsLog.read(out / "metrics.jsonl")} == {records[0]["run_id"]}
    assert (out / "summary.md").is_file() and (out / "curves.png").is_file()

    monkeypatch.setattr(experiment, "train_run", real)
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in records] == ["koala++", "sgd", "adamw"]
    assert len({r["run_id"] for r in records}) == 3


def test_list_prints_presets_parts_baselines_and_tasks(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("koala++", "koala-m", "koala++-lr", "lowrank", "symmetric", "random_walk", "memory=2",
                 "adamw", "sgd", "digits", "text", "cifar10", "cifar100", "quadratic", "resnet50", "sigma=0.1"):
        assert name in text, name


BAD_CONFIGS = [
    ('task = "mnist"\nsteps = 1\noptimizers = ["sgd"]', "unknown task 'mnist'",
     "valid tasks: cifar10, cifar100, digits"),
    ('steps = 1\noptimizers = ["koala+"]', "unknown optimizer 'koala+'", "presets koala++"),
    ('steps = 1\n[[optimizers]]\npreset = "koala-x"', "unknown preset 'koala-x'", "valid presets: koala++"),
    ('steps = 1\n[[optimizers]]\npreset = "koala++"\nsigmaa = 0.1', "unknown keyword(s) ['sigmaa']", "sigma"),
    ('steps = 1\n[[optimizers]]\ntorch = "adamw"\nmomentum = 0.9', "unknown keyword(s) ['momentum']", "betas"),
    ('steps = 1\n[[optimizers]]\npreset = "koala++"\n[optimizers.grid]\nqq = [1]', "unknown grid keyword(s)",
     "valid keywords"),
    ('steps = 1\n[[optimizers]]\npreset = "koala++"\nq = -1.0', "optimizer 'koala++'", "q"),
    ('steps = 1\n[[optimizers]]\ncompose = {surrogate = "banana"}', "unknown surrogate part 'banana'",
     "valid choices: adaptive_diagonal, block, diagonal, eigenbasis, factored, kronecker, lowrank, product, scalar"),
    ('steps = 1\nmodel = "vit"\noptimizers = ["sgd"]', "unknown model 'vit'", "valid models: cnn, mlp"),
    ('task = "cifar10"\nsteps = 1\noptimizers = ["sgd"]', "task 'cifar10' needs its data", "cifar-10-batches-py"),
    ('task = "text"\nsteps = 1\noptimizers = ["sgd"]\n[task_options]\ndata = "/nonexistent/corpus.txt"',
     "data file '/nonexistent/corpus.txt' not found", "--data FILE"),
    ('steps = 1\noptimizers = ["sgd"]\n[schedule]\nkind = "step"', "unknown schedule kind 'step'",
     "constant, multistep, cosine"),
    ('steps = 1\noptimizer = ["sgd"]', "unknown config key(s) ['optimizer']", "optimizers"),
    ('epochs = 1\nsteps = 1\noptimizers = ["sgd"]', "exactly one of epochs and steps", ""),
    ('steps = 1\ndevice = "tpu"\noptimizers = ["sgd"]', "unknown device 'tpu'", "cpu, cuda"),
    ('steps = 1\noptimizers = ["sgd"]\n[analysis]\nenable = true', "unknown [analysis] key(s) ['enable']",
     "enabled"),
    ('steps = [1\n', "not valid TOML", ""),
]


@pytest.mark.parametrize("text, problem, choices", BAD_CONFIGS, ids=[b[1][:30] for b in BAD_CONFIGS])
def test_bad_config_fails_with_one_line_before_training(tmp_path, capsys, text, problem, choices):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kalmanopt: error: ")
    assert problem in lines[0] and choices in lines[0], lines[0]
    assert not out.exists()  # nothing was started


def test_missing_cifar_folder_and_config_file_are_named(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('task = "cifar100"\nsteps = 1\noptimizers = ["sgd"]')
    assert main(["run", str(config), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "not found" in err and "--data DIR" in err
    assert main(["run", "--data", str(tmp_path)]) == 2  # the default task (digits) reads no file
    assert "task 'digits' takes no data path (--data)" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, message", [
    ("a,b", "--seeds 'a,b': a list of seeds must be integers separated by commas"),
    ("x", "give a count (3 runs seeds 0, 1, 2) or a list of seeds"),
    ("0", "is read as a count of seeds"),
    ("100000000", "it must lie in 1 .. 1000 (for the single seed 100000000, write --seeds 100000000,)"),
    (",", "the list names no seed"),
    ("-1,", "seeds must lie in [0, 2**32)"),
])
def test_bad_seeds_flag_is_one_error_line(capsys, seeds, message):
    assert main(["run", f"--seeds={seeds}", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kalmanopt: error: ") and message in lines[0], lines


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "kalmanopt.cli", "list"], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0 and "Presets" in result.stdout
