"""The benchmark scripts run end to end on a CPU (a tiny model, a few steps): their tables come out whole."""

from __future__ import annotations

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
