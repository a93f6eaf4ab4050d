"""The measurement's target L* (issue 27, item 3): the loss is measured against ``target`` (default 0).

A loss whose minimum is negative — a Gaussian negative log-likelihood with a learned variance — stops
the filter on the level set L = 0 when L* = 0 (the innovation L* − L is 0 there, and the guard clamps it
at 0 below); with a target at its minimum the filter goes on to it. A loss below the target warns once
per optimizer. Every engine gets the target through the measurement's declarations.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, PRESETS
from hypothesis import given
from hypothesis import strategies as st

import kalmanopt

ROOT = Path(__file__).resolve().parent.parent
#: the presets whose measurement is the loss itself (the gradient measurement's step reads only the sign of
#: the loss's excess over the target)
LOSS_PRESETS = [p for p in PRESETS if type(kalmanopt.create(p, [torch.nn.Parameter(torch.ones(1))]).filter
                                             .measurement) is kalmanopt.LossMeasurement]
LOSS_CASES = [(p, i) for p, i in CASES if p in LOSS_PRESETS]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = x @ torch.tensor([1.5, -0.5]) + 0.05 * torch.randn(256, generator=g)
    return x, y


def gaussian_nll_run(preset: str, steps: int, implementation: str | None = None,
                     dtype: torch.dtype = torch.float32, **kw) -> float:
    """Fit y ~ N(μ(x), σ(x)²) by its negative log-likelihood (minimum ≈ −1.58: σ ≈ 0.05); the final full NLL."""
    torch.manual_seed(0)
    x, y = (t.to(dtype) for t in _data())
    model = torch.nn.Linear(2, 2).to(dtype)  # μ and log σ
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, **kw)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            idx = torch.randint(0, 256, (32,), generator=g)
            out = model(x[idx])
            nll = F.gaussian_nll_loss(out[:, 0], y[idx], out[:, 1].exp() ** 2, reduction="none", full=True)
            opt.zero_grad()
            nll.mean().backward()
            opt.step(loss=nll)
    with torch.no_grad():
        out = model(x)
        return float(F.gaussian_nll_loss(out[:, 0], y, out[:, 1].exp() ** 2, full=True))


def test_every_preset_takes_a_target_defaulting_to_0():
    for preset in PRESETS:
        opt = kalmanopt.create(preset, [torch.nn.Parameter(torch.ones(2))], target=-1.5)
        assert opt.param_groups[0]["target"] == -1.5
        assert kalmanopt.create(preset, [torch.nn.Parameter(torch.ones(2))]).param_groups[0]["target"] == 0.0
    with pytest.raises(ValueError, match="'target' = nan"):
        kalmanopt.create("koala++", [torch.nn.Parameter(torch.ones(2))], target=float("nan"))
    with pytest.raises(TypeError):
        kalmanopt.create("koala++", [torch.nn.Parameter(torch.ones(2))], target="low")


def test_a_gaussian_nll_stops_at_zero_with_target_0_and_reaches_its_minimum_with_its_target():
    """The issue's example: koala++ with L* = 0 settles where the NLL is about 0; with target=-1.6 (its
    minimum is about -1.58) it gets within reach of the minimum."""
    at_zero = gaussian_nll_run("koala++", 400)
    with_target = gaussian_nll_run("koala++", 400, target=-1.6)
    assert -0.3 < at_zero < 0.3, at_zero
    assert with_target < -1.0, with_target  # (about 2.0 below the NLL at 0, see docs/reliability.md)


@pytest.mark.parametrize("preset,implementation", LOSS_CASES)
def test_the_target_shifts_the_innovation_on_every_engine(preset, implementation):
    """target = t with losses ℓ equals target = 0 with losses ℓ − t (the same L_ℓ − L*, the same R: the
    variance statistic of the shifted losses is the same), on every engine, bit for bit."""
    runs = []
    for target, shift in ((-0.75, 0.0), (0.0, 0.75)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, target=target,
                               loss_statistic="variance")
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(6, 3, generator=g)
            losses = model(x).pow(2).mean(dim=1) - 0.5
            opt.zero_grad()
            losses.mean().backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(loss=losses.detach() + shift)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = any(not torch.equal(a, b) for a, b in zip(runs[0], _initial()))
    assert moved


def _initial() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_loss_below_the_target_warns_once_per_optimizer(preset, implementation):
    def stepped(target: float, losses: list[float]) -> list[str]:
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        opt = kalmanopt.create(preset, [p], implementation=implementation, target=target)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for value in losses:
                p.grad = torch.linspace(0.5, 1.0, 4)
                opt.step(loss=torch.tensor([value, value]))
        return [str(w.message) for w in caught if "target" in str(w.message)]

    assert len(stepped(0.0, [-1.0, -2.0, 1.0, -1.0])) == 1  # negative against L* = 0: once
    assert stepped(0.0, [1.0, 2.0]) == []
    assert stepped(-5.0, [-1.0, -2.0]) == []  # above its target: no warning
    assert len(stepped(-5.0, [-6.0, -7.0])) == 1  # below it


@given(target=st.floats(-100.0, 100.0, allow_nan=False), shift=st.floats(-10.0, 10.0, allow_nan=False),
       preset=st.sampled_from(LOSS_PRESETS))
def test_the_step_depends_on_the_loss_only_through_its_excess_over_the_target(target, shift, preset):
    """Hypothesis: (loss ℓ, target t) and (ℓ + s, t + s) give the same step up to rounding (fixed R, so the
    statistic plays no part)."""
    out = []
    for t, extra in ((target, 0.0), (target + shift, shift)):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))
        opt = kalmanopt.create(preset, [p], target=t, r=0.5)
        p.grad = torch.linspace(0.5, 1.0, 4, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(loss=torch.tensor([target + 0.3, target + 1.1], dtype=torch.float64) + extra)
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-9 * (1.0 + abs(target) + abs(shift)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
def test_the_fused_kernels_take_the_target_from_the_declarations():
    """The fused engine (its generated kernels run by Triton's interpreter on the CPU) equals the reference
    engine with a target, on the Gaussian NLL (in float64: over 30 steps of this fit float32's roundings, which
    differ between numpy and torch, grow to 3e-3)."""
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); import test_target as t\n"
        "d = torch.float64\n"
        "print(t.gaussian_nll_run('koala++', 30, 'fused', d, target=-1.6), "
        "t.gaussian_nll_run('koala++', 30, 'reference', d, target=-1.6), "
        "t.gaussian_nll_run('koala++', 30, 'fused', d))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    fused, reference, at_zero = map(float, done.stdout.split()[-3:])
    assert abs(fused - reference) <= 1e-4 * (1 + abs(reference)), (fused, reference)
    assert fused < at_zero - 0.05, (fused, at_zero)  # the target reached the kernels
