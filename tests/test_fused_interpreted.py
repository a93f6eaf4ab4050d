"""The fused engine's generated Triton kernels, run on the CPU by Triton's interpreter.

With ``TRITON_INTERPRET=1`` Triton executes a kernel on the host instead of compiling it for a GPU; the fused
engine then accepts CPU tensors where ``implementation="fused"`` is asked for. The kernels are the ones a GPU
runs (the same generated source), so these tests check the fused engine without a GPU: the GPU suite of the
engines (``tests/test_fast_gpu.py``) on the CPU, and FSDP2's DTensor shards over gloo (uneven and empty
shards) equal to one process. They run in subprocesses (Triton decides when a kernel is defined whether to
interpret it) and are skipped where Triton is not installed. What the interpreter cannot check: speed, the
absence of host synchronisation, CUDA-graph capture (``tests/test_fast_gpu.py`` does, on a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from xml.etree import ElementTree

import distributed_worker as w
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
INTERPRET = {"TRITON_INTERPRET": "1"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")


def test_the_gpu_suite_passes_on_the_cpu_with_the_kernels_interpreted(tmp_path):
    """``tests/test_fast_gpu.py`` on the CPU (``KALMANOPT_FUSED_TEST_DEVICE=cpu``): the fused engine equal to
    the reference path for every fast preset, dtype, weight decay and API, on drawn shapes and chunk sizes,
    global granularity, non-contiguous parameters, non-finite input and checkpoints across engines. Only
    its GPU-only tests are skipped; every other one must pass."""
    report = tmp_path / "report.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           str(ROOT / "tests" / "test_fast_gpu.py")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, KALMANOPT_FUSED_TEST_DEVICE="cpu", **INTERPRET), timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    skipped = [case for case in suite.iter("testcase") if case.find("skipped") is not None]
    reasons = {case.find("skipped").get("message", "") for case in skipped}
    assert all("GPU-only" in r or "bfloat16" in r for r in reasons), reasons
    assert int(suite.get("tests")) - len(skipped) >= 150, suite.attrib


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, ...]:
    return w.launch("interpreted", tmp_path_factory.mktemp("interpreted-ranks"), env=INTERPRET)


DISTRIBUTED = [(str(dtype), mode, preset) for dtype in w.DTYPES for mode in ("ddp", "fsdp") for preset in w.PRESETS]


@pytest.mark.parametrize("case", DISTRIBUTED, ids=["-".join(c).replace("torch.", "") for c in DISTRIBUTED])
def test_the_interpreted_fused_kernels_on_two_ranks_equal_one_process(two_ranks, case):
    """DDP and FSDP2 (DTensor shards, the one-row layer's empty on rank 1) with the fused engine's kernels:
    equal to one process on the same global batch, one collective per step, the kernels run."""
    dtype_name, mode, preset = case
    dtype = torch.float32 if dtype_name == str(torch.float32) else torch.float64
    ref = w.reference_run(preset, "foreach", dtype)
    for rank in range(w.WORLD):
        params, counts = two_ranks[rank][(dtype_name, mode, preset, "fused")]
        assert w.relative_difference(params, ref) <= w.TOLERANCE[dtype_name], (case, rank)
        assert two_ranks[rank][("kernels", dtype_name, mode, preset)], (case, rank)
        k = w.predict_collectives(preset) if mode == "fsdp" else 0
        assert counts == [1 + 2 * k] + [1 + k] * (w.STEPS - 1), (case, rank, counts)


def test_a_nan_loss_on_one_rank_skips_the_interpreted_step_on_both(two_ranks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = w.reference_run("koala++", "foreach", torch.float64, nan_step=1)
    w.assert_the_nan_step_was_skipped_on_every_rank(two_ranks, ref)
