"""The fused engine's generated Triton kernels, run on the CPU by Triton's interpreter.

With ``TRITON_INTERPRET=1`` Triton executes a kernel on the host instead of compiling it for a GPU; the
fused engine then accepts CPU tensors where ``implementation="fused"`` is asked for. The kernels are the
ones a GPU runs (the same generated source), so these tests check the fused engine without a GPU: equal
to the reference path for every fast preset, and on FSDP2's DTensor shards over gloo (uneven and empty
shards) equal to one process. They run in subprocesses (Triton decides when a kernel is defined whether to
interpret it) and are skipped where Triton is not installed. What the interpreter cannot check: speed,
the absence of host synchronisation, CUDA-graph capture (``tests/test_fast_gpu.py`` does, on a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import distributed_worker as w
import interpreted_worker
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
INTERPRET = {"TRITON_INTERPRET": "1"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("interpreted") / "results.pt"
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                              if os.environ.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "interpreted_worker.py"), str(out)],
                          env=dict(os.environ, PYTHONPATH=path, **INTERPRET), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


CASES = [(p, str(d), wd, api) for p, d, wd, api in interpreted_worker.CASES]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)).replace("torch.", "") for c in CASES])
def test_the_interpreted_fused_kernels_equal_the_reference_path(single_process, case):
    result = single_process[case]
    assert result["kernels"], "the fused engine fell back to torch operations"
    assert result["error"] <= result["tolerance"], result["error"]
    assert not result["states"], result["states"]
    assert result["counters"][0] == result["counters"][1]


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
    for mode in ("ddp", "fsdp"):
        for rank in range(w.WORLD):
            params, counters = two_ranks[rank][("nan", mode)]
            assert counters["nonfinite_steps"] == 1 and counters["steps"] == w.STEPS - 1, (mode, rank)
            assert w.relative_difference(params, ref) <= 1e-10, (mode, rank)
