"""``kalmanopt tune``: the sweep, the pick on validation loss (edges refused, ties to the middle), seeds at the pick."""

import json
import math
import re

import pytest

from kalmanopt.cli import main
from kalmanopt.runner import ConfigError, load_config
from kalmanopt.runner.results import load_results
from kalmanopt.runner.tuning import check_tunable, pick

TINY = """
name = "tiny-tuning"
task = "digits"
steps = 30
batch_size = 32
threads = 1
eval_every = 30
diagnostics = false
[model_options]
hidden = 32

[[optimizers]]
torch = "sgd"
lr = {logspace = [1e-3, 1e3, 5]}

[[optimizers]]
torch = "muon"
lr = {logspace = [1e-4, 10, 5]}
"""


# ------------------------------------------------------------------------------------ the pick
def _points(losses, lrs=(1e-3, 1e-2, 1e-1, 1.0, 10.0)):
    return [({"lr": lr}, loss) for lr, loss in zip(lrs, losses)]


def test_pick_is_the_lowest_loss_and_diverged_runs_lose():
    assert pick(_points([2.0, 1.5, 1.2, 1.4, math.nan])) == ({"lr": 1e-1}, "")
    assert pick(_points([2.0, 1.1, math.inf, 1.4, 0.1]))[0] is None  # 0.1 at the edge: refused
    setting, note = pick(_points([math.nan] * 5))
    assert setting is None and "every run of the sweep diverged" in note


def test_a_pick_on_the_edge_is_refused_with_the_reason():
    setting, note = pick(_points([0.5, 1.0, 1.1, 1.2, 1.3]))
    assert setting is None
    assert note.startswith("the best lr 0.001 lies on the sweep's lower edge")
    assert "extend the sweep below 0.001" in note
    setting, note = pick(_points([1.3, 1.2, 1.1, 1.0, 0.5]))
    assert setting is None and "upper edge" in note and "above 10" in note


def test_ties_go_toward_the_middle_of_the_sweep():
    assert pick(_points([2.0, 1.0, 1.0, 1.0005, 2.0]))[0] == {"lr": 1e-1}   # within 0.1 %: the middle one
    assert pick(_points([2.0, 1.0, 1.01, 1.5, 2.0]))[0] == {"lr": 1e-2}     # 1 % apart: not a tie
    swept_twice = [({"lr": lr, "weight_decay": wd}, 1.0 if lr == 1e-2 else 2.0)
                   for lr in (1e-3, 1e-2, 1e-1) for wd in (0.0, 0.1)]
    assert pick(swept_twice)[0] == {"lr": 1e-2, "weight_decay": 0.0}       # equal: the first in grid order


# ------------------------------------------------------------------------------------ end to end
def test_tune_through_the_cli_picks_the_best_then_runs_the_seeds(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "out"
    assert main(["tune", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Tuning: tiny-tuning (digits / mlp)")
    for name in ("tuning.md", "tuning.json", "tuning.png", "summary.md", "results.json", "curves.png"):
        assert (out / name).is_file(), name
    document = json.loads((out / "tuning.json").read_text())
    records = load_results(out)
    assert document["protocol"]["seeds"] == [0, 1, 2] and document["protocol"]["sweep_seed"] == 0
    for tuned in document["optimizers"]:
        sweep = [r for r in records if r["optimizer"] == tuned["label"] and r["seed"] == 0]
        assert len(sweep) == 5
        losses = {r["hyperparameters"]["lr"]: r["val_loss"] if r["status"] != "diverged" else math.inf for r in sweep}
        best = min(losses, key=losses.get)
        lrs = sorted(losses)
        assert lrs[0] < best < lrs[-1], "the tiny config is meant to have its optimum inside the sweep"
        assert tuned["pick"] == {"lr": best} and tuned["note"] == ""
        at_pick = [r for r in records if r["optimizer"] == tuned["label"] and r["hyperparameters"] == {"lr": best}]
        assert sorted(r["seed"] for r in at_pick) == [0, 1, 2]
        assert [s["run_id"] for s in tuned["seeds"]] == [r["run_id"] for r in sorted(at_pick, key=lambda r: r["seed"])]
        assert tuned["val_loss_mean"] == pytest.approx(sum(r["val_loss"] for r in at_pick) / 3)
    assert len(records) == 2 * (5 + 2)  # the sweep's seed-0 run at the pick is not trained twice
    table = (out / "tuning.md").read_text()
    assert "| `muon` | 5 |" in table and "**lr " in table

    assert main(["tune", str(path), "--out", str(out), "--no-progress"]) == 0  # resume: nothing to train
    assert "resumed: 14 run(s) were already finished" in capsys.readouterr().out
    assert json.loads((out / "tuning.json").read_text()) == document


def test_an_edge_pick_gets_no_seeds_and_a_warning(tmp_path, capsys):
    path = tmp_path / "edge.toml"
    path.write_text(TINY.replace("lr = {logspace = [1e-3, 1e3, 5]}", "lr = {logspace = [1e-5, 1e-3, 5]}")
                    .replace('torch = "muon"\nlr = {logspace = [1e-4, 10, 5]}', 'torch = "adam"\nlr = '
                             '{logspace = [1e-4, 10, 5]}'))
    out = tmp_path / "out"
    assert main(["tune", str(path), "--out", str(out), "--no-progress", "--seeds", "2"]) == 0
    document = json.loads((out / "tuning.json").read_text())
    sgd = document["optimizers"][0]
    assert sgd["pick"] is None and "upper edge" in sgd["note"] and sgd["seeds"] == []
    assert "## Warnings" in (out / "tuning.md").read_text()
    assert len([r for r in load_results(out) if r["optimizer"] == "sgd"]) == 5


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("entry, message", [
    ('torch = "adamw"\nlr = 1e-3', r"optimizer 'adamw': the tuning protocol sweeps lr over at least 5 values; "
                                   r"got a fixed lr = 0.001"),
    ('torch = "adamw"\nlr = {logspace = [1e-4, 1e-2, 3]}', r"at least 5 values; got grid.lr = \[0.0001, 0.001, 0.01\]"),
    ('torch = "adamw"\nlr = {logspace = [1e-4, 1e-2, 1]}', r"logspace needs an integer number of points n >= 2, got 1"),
    ('torch = "adamw"\nlr = {logspace = [-1e-4, 1e-2, 5]}', r"logspace bound low must be a positive finite number"),
    ('torch = "adamz"\nlr = {logspace = [1e-4, 1e-2, 5]}', r"unknown torch baseline 'adamz'; valid baselines: ada"),
])
def test_bad_tuning_configs_stop_with_one_clear_line(tmp_path, capsys, entry, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'task = "digits"\nsteps = 2\n[[optimizers]]\n{entry}\n')
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kalmanopt: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "results.json").exists()


def test_check_tunable_names_every_optimizer_at_fault(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('task = "digits"\nsteps = 2\noptimizers = ["adamw", "koala++"]\n')
    with pytest.raises(ConfigError, match=r"2 problems: \(1\) optimizer 'adamw': .* got no lr; .*"
                                          r"\(2\) optimizer 'koala\+\+'"):
        check_tunable(load_config(path))
