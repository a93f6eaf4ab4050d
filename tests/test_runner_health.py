"""What summary.md and results.json say about each run: health, provenance, the engine, timing off
the diagnostics steps, log lines, --version."""

import json
import math
from pathlib import Path

import pytest
from runner_helpers import summary_rows

from kalmanopt.cli import main
from kalmanopt.runner import load_config, run_experiment
from kalmanopt.runner.health import THRESHOLDS, assess
from kalmanopt.runner.results import summary_table
from kalmanopt.runner.training import MetricsLog


def healthy_record(**changes):
    record = {"status": "finished", "steps": 100, "counters": {"skipped_layers": 0, "guard_restarts": 0,
                                                               "nonfinite_steps": 0},
              "initial_train_loss": 2.3, "final_train_loss": 0.4, "val_accuracy": 0.9}
    record.update(changes)
    return record


# ---------------------------------------------------------------------------------------- health
def test_health_thresholds():
    assert assess(healthy_record(), layers=4, num_classes=10) == ("finished", "")
    assert assess(healthy_record(status="diverged"), layers=4)[0] == "diverged"
    limit = int(THRESHOLDS["skipped_fraction"] * 100 * 4)  # 2 % of 100 steps x 4 layers = 8
    assert assess(healthy_record(counters={"skipped_layers": limit}), layers=4)[0] == "finished"
    status, reason = assess(healthy_record(counters={"skipped_layers": limit + 1}), layers=4)
    assert status == "degenerate" and "skipped_layers 9: 2.2 %" in reason and "threshold 2 %" in reason
    assert assess(healthy_record(counters={"guard_restarts": 50}), layers=4)[0] == "degenerate"
    assert assess(healthy_record(counters={"nonfinite_steps": 2}), layers=4)[0] == "degenerate"
    status, reason = assess(healthy_record(val_accuracy=0.114), layers=4, num_classes=10)  # issue 10's case
    assert status == "stalled" and "no better than chance (10.0 %" in reason
    assert assess(healthy_record(val_accuracy=0.16), layers=4, num_classes=10)[0] == "finished"
    status, reason = assess(healthy_record(final_train_loss=2.29, val_accuracy=None), layers=4)
    assert status == "stalled" and "not below the first minibatch" in reason
    assert assess(healthy_record(final_train_loss=2.2, val_accuracy=None), layers=4)[0] == "finished"


def _record(optimizer, seed, accuracy, status="finished", reason=""):
    return {"run_id": f"{optimizer}-{seed}", "optimizer": optimizer, "seed": seed, "hyperparameters": {"lr": 1.0},
            "task": "digits", "model": "mlp", "status": status, "status_reason": reason, "val_accuracy": accuracy,
            "val_loss": 1.0, "seconds": 1.0, "seconds_per_step": 0.001, "engine": "foreach",
            "counters": {"skipped_layers": 50, "guard_restarts": 0, "nonfinite_steps": 0}}


def test_summary_ranks_unhealthy_rows_last_and_marks_them():
    records = [_record("broken", s, 0.99, "degenerate", "skipped_layers 50: 12.5 %") for s in (0, 1)]
    records += [_record("good", s, 0.95) for s in (0, 1)] + [_record("alone", 0, 0.90)]
    text = summary_table(records, "t", {"mode": "full", "epochs": 2, "steps_per_run": 90, "diagnostics_every": 10})
    rows = summary_rows(text)
    assert [r.split("`")[1] for r in rows] == ["good", "alone", "broken"]  # the best accuracy ranks last
    assert "**degenerate 2/2**" in rows[2] and "| ok |" in rows[0]
    assert "99.00 ± 0" in rows[2] and "95.00 ± 0" in rows[0]
    assert "90.00 |" in rows[1] and "±" not in rows[1]  # one seed: no "± 0"
    assert "## Unhealthy runs" in text and "`broken` seed 1: **degenerate**: skipped_layers 50" in text
    assert "2 epochs (90 steps per run)" in text and "every 10 steps (on the same engine)" in text


# ---------------------------------------------------------------------------------------- a real grid
@pytest.fixture(scope="module")
def digits_grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    config = folder / "grid.toml"
    config.write_text("""
task = "digits"
seeds = [0]
steps = 12
eval_every = 12
log_every = 4
diagnostics_every = 5
threads = 1
[model_options]
hidden = 16
[[optimizers]]
preset = "koala++"
q = 0.5
lr = 2.0
[[optimizers]]
label = "frozen"
torch = "sgd"
lr = 0.0
[[optimizers]]
torch = "adamw"
lr = 1e-2
""")
    out = folder / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["run", str(config), "--out", str(out), "--no-progress"])
    return status, out, err.getvalue()


def test_a_frozen_run_is_stalled_and_ranked_last(digits_grid):
    status, out, _ = digits_grid
    assert status == 0
    records = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())}
    assert records["frozen"]["status"] == "stalled"
    assert "chance" in records["frozen"]["status_reason"] or "first minibatch" in records["frozen"]["status_reason"]
    rows = summary_rows((out / "summary.md").read_text())
    assert rows[-1].startswith("| `frozen` | 1 | **stalled 1/1** |")


def test_provenance_in_config_results_and_summary(digits_grid):
    _, out, _ = digits_grid
    config = json.loads((out / "config.json").read_text())
    for key in ("device", "device_name", "torch", "triton", "kalmanopt", "git_commit", "python"):
        assert key in config["provenance"], key
    assert config["provenance"]["device"] == "cpu" and config["steps_per_run"] == 12 and config["mode"] == "full"
    records = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())}
    koala, adamw = records["koala++"], records["adamw"]
    assert koala["provenance"]["torch"] == config["provenance"]["torch"]
    assert koala["resolved_hyperparameters"]["lr"] == 2.0  # as built: the schedule has not scaled it
    built = koala["resolved_hyperparameters"]
    assert {"sigma", "q", "alpha_r", "weight_decay", "guard", "loss_statistic"} <= set(built)
    assert koala["resolved_hyperparameters"]["sigma"] == 0.1  # a default the config did not set
    assert adamw["resolved_hyperparameters"]["betas"] == [0.9, 0.999] and adamw["engine"] == "torch"
    assert koala["engine"] in ("fused", "foreach")  # the fast engine, not the reference path
    summary = (out / "summary.md").read_text()
    assert "**Device**: cpu" in summary and "**Versions**: torch " in summary and "**Mode**: full" in summary
    assert "## Optimizers as built" in summary and "sigma=0.1" in summary and "betas=[0.9, 0.999]" in summary


def test_diagnostics_are_recorded_at_their_interval_and_left_out_of_the_timing(digits_grid):
    _, out, _ = digits_grid
    metrics = MetricsLog.read(out / "metrics.jsonl")
    diag = [m for m in metrics if m["kind"] == "diagnostics"]
    assert [m["step"] for m in diag] == [5, 10] and all(m["optimizer"] == "koala++" for m in diag)
    assert set(diag[0]["layers"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    records = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())}
    assert records["koala++"]["timed_steps"] == 10 and records["adamw"]["timed_steps"] == 12
    assert records["koala++"]["counters"]["steps"] == 12


def test_log_lines_without_progress_bars(digits_grid):
    _, out, err = digits_grid
    lines = err.strip().splitlines()
    assert lines[0] == f"kalmanopt: run grid: writing into {out}"
    finished = [line for line in lines if line.startswith("kalmanopt: [")]
    assert len(finished) == 3 and finished[0].startswith("kalmanopt: [1/3] koala++ seed 0: val accuracy (%) ")
    assert "ms/step on f" in finished[0] and finished[1].endswith("STALLED (" + finished[1].split("STALLED (")[1])
    assert "\r" not in err


def test_recording_diagnostics_does_not_change_the_run(tmp_path):
    text = """
task = "digits"
seeds = [0]
steps = 15
eval_every = 15
threads = 1
diagnostics = {diagnostics}
diagnostics_every = 2
[model_options]
hidden = 16
[[optimizers]]
preset = "koala++"
q = 0.5
lr = 2.0
"""
    results = []
    for flag in ("true", "false"):
        path = tmp_path / f"{flag}.toml"
        path.write_text(text.replace("{diagnostics}", flag))
        outcome = run_experiment(load_config(path), tmp_path / flag)
        results.append(outcome.records[0])
    assert results[0]["timed_steps"] == 8 and results[1]["timed_steps"] == 15
    assert math.isclose(results[0]["val_loss"], results[1]["val_loss"], rel_tol=1e-4)


def test_version_flag(capsys):
    import kalmanopt

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"kalmanopt {kalmanopt.__version__}"


def test_plots_label_every_axis_share_one_legend_and_use_no_symlog(digits_grid, monkeypatch):
    from kalmanopt.runner import plots

    _, out, _ = digits_grid
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: figures.append((Path(path).name, fig)))
    records = json.loads((out / "results.json").read_text())
    metrics = MetricsLog.read(out / "metrics.jsonl")
    plots.plot_all(out, metrics, records, x_key="step", title="t")
    names = [name for name, _ in figures]
    assert {"curves.png", "diagnostics.png", "diagnostics-koala++.png"} <= set(names)
    for name, fig in figures:
        assert len(fig.legends) == 1, name  # one legend for the figure, beside the panels
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert ax.get_legend() is None
            assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel(), (name, ax.get_title())
            assert ax.get_yscale() in ("linear", "log"), (name, ax.get_title())
            if ax.get_title().startswith("skipped layer updates"):
                assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1
            if ax.get_title().startswith("angle"):
                for collection in ax.collections:  # the bands
                    for path in collection.get_paths():
                        assert path.vertices[:, 1].min() >= 0 and path.vertices[:, 1].max() <= 180
