"""The benchmark scripts run end to end on a CPU (a tiny model, a few steps): their tables come out whole."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_options.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


def test_training_options_prints_a_row_per_label_with_adamw_as_the_baseline():
    labels = ["AdamW fused wd=0.1", "koala++ wd=8e-5 stat=variance clip=1.0 groups=2", "koala-adam-steady sched=none"]
    done = _run("--model", "tiny", "--device", "cpu", "--warmup", "2", "--blocks", "1", "--block-steps", "2",
                "--rounds", "2", "--labels", *labels)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == labels
    assert rows[1].split(" | ")[2] == "1.000"  # AdamW over itself
    assert "finite=False" not in done.stdout


@pytest.mark.parametrize("label, message", [
    ("koala+++ wd=0.1", "unknown optimizer 'koala+++'"),
    ("koala++ groups=3", "groups=3: valid choices 1, 2"),
    ("koala++ sched=linear", "sched=linear: valid choices cosine, none"),
])
def test_training_options_refuses_a_bad_label_naming_the_choices(label, message):
    done = _run("--model", "tiny", "--device", "cpu", "--labels", label)
    assert done.returncode != 0
    assert message in done.stderr


def _step_kernels(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_kernels.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=False, env=dict(os.environ, TRITON_INTERPRET="1"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
def test_step_kernels_counts_the_operations_of_a_captured_step_per_row():
    labels = ["koala++", "koala-adam-steady wd=0.1 groups=2"]
    done = _step_kernels("--labels", *labels, "--by-site")
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].removeprefix("| ") for row in rows[1:]] == labels
    counts = [(int(row[1]), int(row[2].removesuffix(" |"))) for row in rows[1:]]
    assert all(outside > 0 and inside > 0 for outside, inside in counts)
    assert counts[1][0] > counts[0][0]  # (two groups: a second group's bookkeeping)
    assert "driver.py:" in done.stdout  # (by site)


def test_step_kernels_refuses_an_unknown_row_naming_the_choices():
    done = _step_kernels("--labels", "koala+++")
    assert done.returncode != 0
    assert "unknown row 'koala+++'; valid choices: 'koala++'" in done.stderr
