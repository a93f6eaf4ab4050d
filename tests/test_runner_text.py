"""The shakespeare-char benchmark config: nanoGPT's model and settings, and a --quick variant that runs
on a CPU in under a minute on a small self-made text."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kalmanopt.cli import main
from kalmanopt.runner import ConfigError, load_config
from kalmanopt.runner.tasks import get_task

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char.toml"


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to be ", "or not ", "that is ", "the question.\n", "WHETHER ", "'tis nobler; "]
    path = tmp_path / "play.txt"
    path.write_text("".join(words[i] for i in rng.integers(0, len(words), 4000)))
    return path


def test_full_config_is_nanogpts_shakespeare_char(corpus):
    config = load_config(CONFIG, overrides={"data": str(corpus), "device": "cpu"})
    assert (config.steps, config.batch_size, config.eval_every, config.autocast) == (1500, 64, 250, "bf16")
    assert config.model_options == {"d_model": 384, "n_layer": 6, "n_head": 6, "dropout": 0.2, "bias": False}
    assert config.task_options["block_size"] == 256 and config.task_options["vocab"] == "chars"
    assert (config.schedule.kind, config.schedule.warmup, config.schedule.min_factor) == ("cosine", 100.0, 0.1)
    by_label = {s.label: s for s in config.optimizers}
    assert list(by_label) == ["adamw", "sgd", "koala++", "koala-v", "koala-m", "koala-diag"]
    assert by_label["adamw"].keywords == {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}
    assert by_label["adamw"].clip_grad_norm == 1.0 and by_label["sgd"].keywords == {"lr": 0.5, "momentum": 0.9}
    assert by_label["koala++"].keywords == {"lr": 0.2, "sigma": 0.1, "q": 0.1, "weight_decay": 8e-5,
                                            "loss_statistic": "variance"}
    assert [by_label[k].keywords["lr"] for k in ("koala-v", "koala-m", "koala-diag")] == [0.2, 0.2, 0.1]
    assert all("implementation" not in s.keywords for s in config.optimizers)  # the default (fast) engine
    task = get_task("text")
    data = task.load(config.task_options)
    model = task.build_model("gpt", data, config.model_options)
    assert data.info["vocab_size"] == len(set(corpus.read_text()))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    # nanoGPT's 10.65 M parameters for its 65 characters (tied embedding; position embedding included)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    assert blocks == 6 * 12 * 384 * 384 + 6 * 2 * 384


def test_it_needs_the_data(tmp_path):
    with pytest.raises(ConfigError, match="pass --data FILE"):
        load_config(CONFIG, overrides={"device": "cpu"})


def test_quick_variant_runs_on_a_cpu_in_under_a_minute(corpus, tmp_path, capsys):
    started = time.perf_counter()
    out = tmp_path / "out"
    status = main(["run", str(CONFIG), "--quick", "--data", str(corpus), "--out", str(out), "--no-progress"])
    seconds = time.perf_counter() - started
    assert status == 0, capsys.readouterr().err
    assert seconds < 60
    records = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in records] == ["adamw", "sgd", "koala++", "koala-v", "koala-m", "koala-diag"]
    for r in records:
        assert r["status"] == "finished", (r["optimizer"], r["status_reason"])
        assert r["steps"] == 20 and r["val_loss"] < r["initial_train_loss"]
    adamw = records[0]
    assert adamw["resolved_hyperparameters"]["betas"] == [0.9, 0.99] and adamw["clip_grad_norm"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "**Mode**: quick" in summary and "**Schedule**: cosine, min_factor 0.1, warmup 4" in summary


def test_dropout_is_off_in_evaluation():
    from kalmanopt.runner.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, d_model=16, n_layer=1, n_head=2, dropout=0.5, bias=False).eval()
    x = torch.randint(0, 11, (2, 8))
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
