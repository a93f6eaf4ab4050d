"""The experiment runner: config parsing and checks, each task on tiny data it makes itself,
grids of presets, compositions and baselines, resume keys, schedules, tables and the analysis."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from runner_helpers import summary_rows

from kalmanopt.runner import DEFAULT_CONFIG, ConfigError, load_config, run_experiment
from kalmanopt.runner.config import Schedule, parse_config, parse_toml
from kalmanopt.runner.results import load_results, save_results, summary_table
from kalmanopt.runner.tasks import get_task, stdlib_corpus
from kalmanopt.runner.training import MetricsLog

ROOT = Path(__file__).parents[1]


def run_toml(tmp_path, text, progress=False, **overrides):
    """Write ``text`` as a config, load and check it, run it into ``tmp_path/out``."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(path, overrides=overrides)
    return run_experiment(config, tmp_path / "out", progress=progress)


def write_fake_cifar(root: Path, classes: int, images: int = 8) -> Path:
    """A tiny archive in the real python format: pickled dicts of uint8 rows and label lists."""
    rng = np.random.default_rng(0)
    if classes == 10:
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            b"labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    for name in files:
        batch = {b"data": rng.integers(0, 256, (images, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, images).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


# ---------------------------------------------------------------------------------------- configs
def test_configs_default_toml_is_the_embedded_default():
    assert (ROOT / "configs" / "default.toml").read_text() == DEFAULT_CONFIG
    config = load_config()
    assert [s.label for s in config.optimizers] == ["koala++", "koala++-ns", "koala-m", "koala-v", "koala-diag",
                                                    "adamw", "sgd"]
    assert config.task == "digits" and config.device == "cpu" and config.seeds == [0, 1, 2]
    assert len(config.runs()) == 21


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_checks(path, tmp_path):
    raw = parse_toml(path.read_text())
    data = None
    if raw["task"].startswith("cifar"):
        data = write_fake_cifar(tmp_path, 10 if raw["task"] == "cifar10" else 100)
    if (raw.get("task_options") or {}).get("require_data"):
        data = tmp_path / "corpus.txt"
        data.write_text("a small text of a few characters\n" * 400)
    for quick in (False, True):
        config = load_config(path, quick=quick, overrides={"data": data, "device": "cpu"})
        assert config.runs()


def test_paper_presets_carry_the_papers_settings():
    raw = parse_toml((ROOT / "configs" / "cifar100-resnet50-koala++.toml").read_text())
    koala = next(o for o in raw["optimizers"] if o.get("preset") == "koala++")
    assert (raw["model"], raw["batch_size"], raw["epochs"]) == ("resnet50", 128, 100)
    assert (koala["sigma"], koala["q"], koala["lr"], koala["weight_decay"]) == (0.1, 0.1, 1.0, 5e-4)
    assert raw["schedule"] == {"kind": "multistep", "milestones": [30, 60, 90], "gamma": 0.1}
    raw = parse_toml((ROOT / "configs" / "cifar10-resnet18-koala++.toml").read_text())
    koala = next(o for o in raw["optimizers"] if o.get("preset") == "koala++")
    assert (koala["sigma"], koala["q"], koala["lr"]) == (0.2, 0.2, 2.0)


def test_grid_expands_to_runs_with_stable_distinct_ids():
    text = """
task = "quadratic"
seeds = [0, 1]
steps = 5
[[optimizers]]
preset = "koala++"
[optimizers.grid]
lr = [0.5, 1.0]
q = [0.1, 0.2, 0.3]
[[optimizers]]
torch = "sgd"
"""
    config = parse_config(parse_toml(text))
    config.check()
    runs = config.runs()
    assert len(runs) == (2 * 3 + 1) * 2
    assert len({r.run_id for r in runs}) == len(runs)
    again = parse_config(parse_toml(text))
    again.check()
    assert [r.run_id for r in again.runs()] == [r.run_id for r in runs]
    changed = parse_config(parse_toml(text.replace("steps = 5", "steps = 6")))
    changed.check()
    assert not {r.run_id for r in changed.runs()} & {r.run_id for r in runs}
    assert {tuple(sorted(r.hyperparameters.items())) for r in runs if r.optimizer.label == "koala++"} == {
        (("lr", lr), ("q", q)) for lr in (0.5, 1.0) for q in (0.1, 0.2, 0.3)}


def test_quick_overrides_and_command_line_overrides():
    config = load_config(quick=True, overrides={"seeds": [7]})
    assert config.epochs == 2 and config.seeds == [7]
    text = parse_toml('task = "text"\nsteps = 500\nseeds = [0, 1, 2]\noptimizers = ["adamw"]')
    quick = parse_config(text, quick=True)
    assert quick.steps == 40 and quick.seeds == [0, 1]
    assert quick.task_options["max_bytes"] == get_task("text").quick_options["max_bytes"]


def test_schedules():
    multistep = Schedule("multistep", milestones=(2, 4), gamma=0.1).factor(steps_per_unit=10, total_steps=60)
    assert [multistep(k) for k in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cosine = Schedule("cosine", min_factor=0.1).factor(1, 100)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    warm = Schedule("constant", warmup=4).factor(1, 100)
    assert [warm(k) for k in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_bad_values_raise_config_error_naming_them():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['hiddenn'\] for model 'mlp'; valid options: "
                                          r"activation, depth, hidden"):
        parse_config(parse_toml('steps = 1\noptimizers = ["sgd"]\n[model_options]\nhiddenn = 3')).check()
    with pytest.raises(ConfigError, match="seeds must not repeat"):
        parse_config(parse_toml('steps = 1\nseeds = [1, 1]\noptimizers = ["sgd"]')).check()
    with pytest.raises(ConfigError, match=r"label\(s\) \['sgd'\] appear twice"):
        parse_config(parse_toml('steps = 1\noptimizers = ["sgd", "sgd"]')).check()
    with pytest.raises(ConfigError, match="lr"):
        grid = 'steps = 1\n[[optimizers]]\ntorch = "sgd"\n[optimizers.grid]\nlr = [0.1, -1.0]'
        parse_config(parse_toml(grid)).check()
    with pytest.raises(ConfigError, match="estimators go with"):
        parse_config(parse_toml('steps = 1\n[[optimizers]]\ncompose = {surrogate = "diagonal", estimator = "vanilla"}'))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        parse_config(parse_toml('steps = 1\nbatch_size = 0\noptimizers = ["sgd"]')).check()


# ---------------------------------------------------------------------------------------- tasks
def test_digits_cnn_trains_with_progress_bars(tmp_path, capsys):
    outcome = run_toml(tmp_path, progress=True, text="""
task = "digits"
model = "cnn"
steps = 8
eval_every = 4
batch_size = 16
threads = 1
[task_options]
max_train = 128
[model_options]
channels = 4
[[optimizers]]
preset = "koala++"
""")
    err = capsys.readouterr().err
    assert "koala++ s0: 100%" in err  # one bar over the grid's steps, named after the run in progress
    bars = [segment for segment in err.replace("\r", "\n").split("\n") if "%|" in segment]
    assert bars and all(bar.endswith("step/s]") for bar in bars)  # one bar over steps, no nested bar per run
    (record,) = outcome.records
    # eight steps on 128 images: it may not beat chance yet, and its health says so
    assert record["status"] in ("finished", "stalled") and record["steps"] == 8
    assert 0 <= record["val_accuracy"] <= 1 and record["val_error"] == pytest.approx(1 - record["val_accuracy"])
    assert record["parameters"] == sum(p.numel() for p in get_task("digits").build_model(
        "cnn", get_task("digits").load(get_task("digits").check_options({})), {"channels": 4}).parameters())


def test_text_task_learns_a_generated_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["kalman ", "filter ", "gain ", "noise "]
    corpus.write_text("".join(words[i] for i in rng.integers(0, 4, 3000)))
    outcome = run_toml(tmp_path, f"""
task = "text"
steps = 40
eval_every = 20
batch_size = 16
threads = 1
seeds = [0]
[task_options]
data = "{corpus}"
block_size = 16
[model_options]
d_model = 32
n_layer = 1
n_head = 2
[[optimizers]]
torch = "adamw"
lr = 3e-3
[[optimizers]]
preset = "koala++"
""")
    assert get_task("text").loss_statistic == "variance"
    for record in outcome.records:
        assert record["status"] == "finished"
        assert math.isfinite(record["val_perplexity"]) and record["val_perplexity"] == pytest.approx(
            math.exp(record["val_loss"]))
        assert "val_accuracy" not in record
    evals = [m for m in MetricsLog.read(outcome.out / "metrics.jsonl") if m["kind"] == "eval"
             and m["optimizer"] == "adamw"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(256) + 0.5
    assert evals[-1]["val_perplexity"] < 20  # four words over a handful of letters, far below 256 bytes


def test_text_default_corpus_is_the_standard_library():
    corpus = stdlib_corpus(20_000)
    assert len(corpus) == 20_000 and b"def " in corpus and b"import" in corpus
    data = get_task("text").load(get_task("text").check_options({"max_bytes": 20_000, "block_size": 32}))
    assert data.val_inputs.shape[1] == 32 and torch.equal(data.val_inputs[:, 1:], data.val_targets[:, :-1])


@pytest.mark.parametrize("task, model", [("cifar10", "resnet18"), ("cifar100", "resnet50")])
def test_cifar_reads_the_python_archive(tmp_path, task, model):
    data_dir = write_fake_cifar(tmp_path / "data", 10 if task == "cifar10" else 100)
    outcome = run_toml(tmp_path, f"""
task = "{task}"
model = "{model}"
steps = 2
batch_size = 8
threads = 1
[model_options]
width = 4
[[optimizers]]
preset = "koala++"
weight_decay = 5e-4
[[optimizers]]
torch = "sgd"
""", data=data_dir)
    # random images and labels: nothing to learn, so the health check calls them stalled, not diverged
    assert {r["status"] for r in outcome.records} <= {"finished", "stalled"} and len(outcome.records) == 2
    cifar = get_task(task)
    data = cifar.load(cifar.check_options({"data": str(data_dir)}))
    assert data.train_inputs.shape == ((40 if task == "cifar10" else 8), 3, 32, 32)
    assert data.info["num_classes"] == (10 if task == "cifar10" else 100)
    batch = cifar.prepare(data.train_inputs[:4], data, torch.Generator().manual_seed(0), train=True)
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 32, 32)
    # the archive's folder itself is accepted as --data too
    assert cifar.check_options({"data": str(data_dir / cifar.folder)})["data"]


def test_quadratic_has_its_optimum_and_sgd_approaches_it(tmp_path):
    task = get_task("quadratic")
    data = task.load(task.check_options({"dim": 8, "samples": 300, "condition": 50.0}))
    A, b, theta = data.train_inputs.double(), data.train_targets.double(), data.info["optimum"].double()
    gradient = A.T @ (A @ theta - b) / len(b)
    assert float(gradient.norm()) < 1e-5
    eigenvalues = torch.linalg.eigvalsh(A.T @ A / len(b))
    assert 20 < float(eigenvalues[-1] / eigenvalues[0]) < 120  # ill-conditioned as asked (about 50)
    outcome = run_toml(tmp_path, """
task = "quadratic"
steps = 150
eval_every = 50
batch_size = 30
threads = 1
[task_options]
dim = 8
samples = 300
condition = 50.0
[[optimizers]]
torch = "sgd"
lr = 0.1
""")
    evals = [m for m in MetricsLog.read(outcome.out / "metrics.jsonl") if m["kind"] == "eval"]
    distances = [m["distance_to_optimum"] for m in evals]
    assert distances[-1] < 0.5 * distances[0]
    assert (outcome.out / "distance_to_optimum.png").is_file()


# ---------------------------------------------------------------------------------------- optimizers
def test_others_runs_a_second_group_and_keys_the_run(tmp_path):
    outcome = run_toml(tmp_path, """
task = "quadratic"
steps = 10
batch_size = 25
threads = 1
[task_options]
samples = 100
[[optimizers]]
torch = "adamw"
weight_decay = 0.1
[[optimizers]]
label = "adamw-no-decay-outside"
torch = "adamw"
weight_decay = 0.1
others = {weight_decay = 0.0}
""")
    plain, split = outcome.records
    assert plain["others"] == {} and split["others"] == {"weight_decay": 0.0}
    assert plain["run_id"].split("-")[-1] != split["run_id"].split("-")[-1]
    assert plain["val_loss"] != split["val_loss"]  # the bias was not decayed
    assert "others: weight_decay=0.0" in (outcome.out / "summary.md").read_text()


def test_compositions_of_named_parts_run_and_report_rows_kept(tmp_path):
    outcome = run_toml(tmp_path, """
task = "quadratic"
steps = 20
batch_size = 25
threads = 1
log_every = 5
[task_options]
samples = 200
[[optimizers]]
label = "lowrank-vanilla-3"
compose = { surrogate = "lowrank", estimator = "vanilla", memory = 3 }
q = 0.05
[[optimizers]]
compose = { surrogate = "scalar", direction = "measurement" }
""")
    labels = [r["optimizer"] for r in outcome.records]
    assert labels == ["lowrank-vanilla-3", "compose:scalar"]
    assert outcome.records[0]["method"] == "compose surrogate=lowrank estimator=vanilla memory=3"
    assert outcome.records[0]["hyperparameters"] == {"q": 0.05}
    diags = [m for m in MetricsLog.read(outcome.out / "metrics.jsonl")
             if m["kind"] == "diagnostics" and m["optimizer"] == "lowrank-vanilla-3"]
    assert len(diags) == 4
    assert 1 <= diags[-1]["layers"]["theta"]["rows_kept"] <= 3


def test_a_diverging_run_is_recorded_and_the_grid_goes_on(tmp_path):
    outcome = run_toml(tmp_path, """
task = "quadratic"
steps = 30
batch_size = 50
threads = 1
log_every = 5
[task_options]
samples = 200
condition = 10.0
[[optimizers]]
torch = "sgd"
lr = 1000.0
[[optimizers]]
label = "sgd-ok"
torch = "sgd"
lr = 0.05
""")
    bad, good = outcome.records
    assert bad["status"] == "diverged" and bad["steps"] < 30 and math.isnan(bad["val_loss"])
    assert good["status"] == "finished" and math.isfinite(good["val_loss"])
    stored = json.loads((outcome.out / "results.json").read_text())
    assert stored[0]["val_loss"] is None  # strict JSON: NaN is written as null
    assert "diverged" in (outcome.out / "summary.md").read_text()
    assert math.isnan(load_results(outcome.out)[0]["val_loss"])

    def no_nan(token):
        raise AssertionError(f"{token} in metrics.jsonl")

    lines = (outcome.out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_nan) for line in lines]
    assert any(r["train_loss"] is None for r in records if r["run_id"] == bad["run_id"])


def test_analysis_computes_exact_curvature_and_the_exact_ekf(tmp_path):
    outcome = run_toml(tmp_path, """
task = "quadratic"
steps = 12
batch_size = 25
threads = 1
seeds = [0]
[task_options]
dim = 6
samples = 200
[analysis]
enabled = true
every = 6
samples = 40
ekf_steps = 10
ekf_record_every = 5
[[optimizers]]
preset = "koala++"
q = 0.01
[[optimizers]]
torch = "sgd"
lr = 0.05
""")
    task = get_task("quadratic")
    data = task.load(task.check_options({"dim": 6, "samples": 200}))
    rows = data.train_inputs[:40].double()
    top = float(torch.linalg.eigvalsh(rows.T @ rows / 40)[-1])  # the Hessian of ½ mean (a·θ − b)²
    for record in outcome.records:
        assert record["hessian_top_eigenvalue"] == pytest.approx(top, rel=1e-3)
        assert record["gradient_noise_trace"] > 0
    analyses = [m for m in MetricsLog.read(outcome.out / "metrics.jsonl") if m["kind"] == "analysis"]
    assert sorted({m["step"] for m in analyses}) == [0, 6, 12]
    comparison = json.loads((outcome.out / "ekf-koala++.json").read_text())
    assert comparison["preset"] == "koala++" and comparison["spectrum_steps"] == [1, 6]
    assert len(comparison["exact_eigenvalues"]["theta"][0]) == 6
    for name in ("spectra-koala++.png", "curvature.png"):
        assert (outcome.out / name).is_file()
    (outcome.out / "spectra-koala++.png").unlink()
    from kalmanopt.cli import main

    assert main(["plot", str(outcome.out)]) == 0  # kalmanopt plot redraws the spectra too
    assert (outcome.out / "spectra-koala++.png").is_file()
    assert not (outcome.out / "ekf-sgd.json").exists()


# ---------------------------------------------------------------------------------------- tables
def _record(optimizer, seed, perplexity, **hp):
    return {"run_id": f"{optimizer}-{seed}-{hp}", "optimizer": optimizer, "seed": seed, "hyperparameters": hp,
            "task": "text", "model": "gpt", "status": "finished", "val_loss": math.log(perplexity),
            "val_perplexity": perplexity, "final_train_loss": 1.0, "seconds": 1.0, "seconds_per_step": 0.01}


def test_summary_ranks_lower_perplexity_first_and_splits_swept_settings(tmp_path):
    records = [_record("adamw", s, p) for s, p in ((0, 9.0), (1, 11.0))]
    records += [_record("koala++", s, p, lr=lr) for s, (p, lr) in enumerate([(5.0, 1.0), (7.0, 1.0)])]
    records += [_record("koala++", s, p, lr=lr) for s, (p, lr) in enumerate([(20.0, 2.0), (22.0, 2.0)])]
    table = summary_table(records, "t")
    rows = summary_rows(table)
    assert [r.split("`")[1] for r in rows] == ["koala++ lr=1.0", "adamw", "koala++ lr=2.0"]
    assert "6.000 ± 1.4" in rows[0]  # mean ± sample standard deviation over the two seeds
    assert "lower is better" in table
    save_results(tmp_path, records)
    assert load_results(tmp_path) == records
