"""Low precision: bf16/fp16 parameters keep fp32 filter state; torch.amp.GradScaler drives the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, PRESETS

import kalmanopt


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, :4].argmax(dim=1))  # a learnable rule
    return x.to(dtype), y


def _float_state(opt) -> list[torch.Tensor]:
    out = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(opt.state_dict()["state"])
    return out


@pytest.mark.parametrize("preset,implementation", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_fp32_filter_state_and_learn(preset, implementation, dtype):
    model = _model(dtype)
    x, y = _data(dtype)
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    first = None
    for _ in range(30):
        losses = F.cross_entropy(model(x).float(), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
        first = float(losses.mean().detach()) if first is None else first
    assert all(p.dtype == dtype for p in model.parameters())
    state = _float_state(opt)
    assert state and all(t.dtype == torch.float32 for t in state)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    final = float(F.cross_entropy(model(x).float(), y).detach())
    assert final < first
    counters = opt.diagnostics()["counters"]
    assert counters["nonfinite_steps"] == 0 and counters["guard_restarts"] == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_run_follows_the_fp32_run(preset):
    """Same data, same start: the bf16 run's loss stays near the fp32 run's (fp32 state in both)."""
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype)
        x, y = _data(dtype)
        opt = kalmanopt.create(preset, model.parameters())
        for _ in range(20):
            losses = F.cross_entropy(model(x).float(), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
        finals[dtype] = float(F.cross_entropy(model(x).float(), y).detach())
    assert finals[torch.bfloat16] == pytest.approx(finals[torch.float32], rel=0.1)


def _scaled_run(preset: str, scaler: torch.amp.GradScaler | None, steps: int = 6,
                overflow_at: tuple[int, ...] = ()) -> tuple[torch.nn.Module, kalmanopt.KalmanOptimizer, list[bool]]:
    """fp32 parameters under bf16 autocast, the loss scaled by the scaler, per-sample losses to step."""
    model = _model()
    x, y = _data()
    opt = kalmanopt.create(preset, model.parameters())
    applied = []
    for k in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = F.cross_entropy(model(x).float(), y, reduction="none")
        opt.zero_grad()
        if scaler is None:
            losses.mean().backward()
            opt.step(loss=losses.detach())
            applied.append(True)
            continue
        scaled = scaler.scale(losses.mean())
        if k in overflow_at:  # a gradient overflow, as a too-large scale would give
            scaled = scaled * math.inf
        scaled.backward()
        before = opt.diagnostics()["counters"]["steps"]
        scaler.step(opt, loss=losses.detach())
        scaler.update()
        applied.append(opt.diagnostics()["counters"]["steps"] == before + 1)
    return model, opt, applied


@pytest.mark.parametrize("preset", PRESETS)
def test_grad_scaler_with_exact_scale_equals_the_unscaled_run(preset):
    """Scaling by a power of two and unscaling is exact: the trajectory is the same bit for bit."""
    plain, _, _ = _scaled_run(preset, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scaled, opt, applied = _scaled_run(preset, scaler)
    assert all(applied)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("preset", PRESETS)
def test_grad_scaler_skips_steps_with_infinite_gradients_as_for_adamw(preset):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    model, opt, applied = _scaled_run(preset, scaler, steps=6, overflow_at=(2, 3))
    assert applied == [True, True, False, False, True, True]
    assert scaler.get_scale() == 2.0**8  # halved at each skipped step, as for any optimizer
    counters = opt.diagnostics()["counters"]
    # the scaler skips before calling step: the optimizer sees four steps and no non-finite input
    assert counters["steps"] == 4 and counters["nonfinite_steps"] == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the same skip pattern as AdamW under the same scaler
    adam_model = _model()
    adam = torch.optim.AdamW(adam_model.parameters())
    adam_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = _data()
    adam_applied = []
    for k in range(6):
        adam.zero_grad()
        loss = adam_scaler.scale(F.cross_entropy(adam_model(x), y))
        (loss * math.inf if k in (2, 3) else loss).backward()
        before = [p.detach().clone() for p in adam_model.parameters()]
        adam_scaler.step(adam)
        adam_scaler.update()
        adam_applied.append(any(not torch.equal(p, b) for p, b in zip(adam_model.parameters(), before)))
    assert adam_applied == applied


def test_grad_scaler_skip_equals_a_run_without_the_overflowing_batches():
    """Skipped by the scaler, a batch leaves no trace: same as never seeing it (koala-m, which moves θ in predict)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    skipped, _, _ = _scaled_run("koala-m", scaler, steps=5, overflow_at=(2,))
    # same data every step, so dropping batch 2 equals one step fewer
    plain, _, _ = _scaled_run("koala-m", None, steps=4)
    for p, q in zip(skipped.parameters(), plain.parameters()):
        assert torch.equal(p, q)
