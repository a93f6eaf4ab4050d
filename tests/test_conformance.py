"""Every preset reproduces the authors' released code (float64 goldens) to 1e-10, both APIs."""

from __future__ import annotations

import pytest
import torch
from conformance import GOLDEN_FILES, batches, build_model, flat, load, per_sample_losses, relative_error

import kalmanopt

TOLERANCE = 1e-10


def _optimizer(golden: dict, model: torch.nn.Module, **extra) -> kalmanopt.KalmanOptimizer:
    return kalmanopt.create(golden["preset"], model.parameters(), loss_statistic=golden["loss_statistic"],
                            **golden["hyperparameters"], **extra)


def _velocities(opt: kalmanopt.KalmanOptimizer) -> torch.Tensor:
    return torch.cat([opt.state[p]["u"] for p in opt.param_groups[0]["params"]])


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("implementation", ["reference"])
def test_two_phase_api_reproduces_golden(path, implementation):
    golden = load(path)
    model = build_model(golden)
    opt = _optimizer(golden, model, implementation=implementation)
    for k, (x, y) in enumerate(batches(golden)):
        opt.predict()
        losses = per_sample_losses(model, x, y)
        loss_mean = losses.mean()
        opt.zero_grad()
        loss_mean.backward()
        assert opt.update(loss_mean, kalmanopt.loss_statistic(losses, golden["loss_statistic"]))
        assert abs(loss_mean.item() - golden["mean_losses"][k]) <= TOLERANCE * abs(golden["mean_losses"][k])
        want = torch.tensor(golden["parameters_after_step"][k], dtype=torch.float64)
        assert relative_error(flat(model), want) <= TOLERANCE, f"step {k}"


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("implementation", ["reference"])
def test_step_api_reproduces_golden(path, implementation):
    golden = load(path)
    model = build_model(golden)
    opt = _optimizer(golden, model, implementation=implementation)
    momentum = golden["preset"] == "koala-m"
    a = golden["hyperparameters"].get("a", 0.9)
    for k, (x, y) in enumerate(batches(golden)):
        losses = per_sample_losses(model, x, y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
        assert abs(losses.mean().item() - golden["mean_losses"][k]) <= TOLERANCE * abs(golden["mean_losses"][k])
        got = flat(model)
        if momentum:  # the step API leaves θ̂_{k+1} = θ_k + u_k, then u ← a u_k
            got = got - _velocities(opt) / a
        want = torch.tensor(golden["parameters_after_step"][k], dtype=torch.float64)
        assert relative_error(got, want) <= TOLERANCE, f"step {k}"


@pytest.mark.parametrize("path", [p for p in GOLDEN_FILES if load(p)["preset"] == "koala++"], ids=lambda p: p.stem)
def test_lowrank_memory_one_equals_koala_pp(path):
    golden = load(path)
    runs = {}
    for preset, extra in (("koala++", {}), ("koala++-lr", {"memory": 1})):
        model = build_model(golden)
        opt = kalmanopt.create(preset, model.parameters(), **golden["hyperparameters"], **extra)
        for x, y in batches(golden):
            losses = per_sample_losses(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
        runs[preset] = flat(model)
    assert relative_error(runs["koala++-lr"], runs["koala++"]) <= 1e-12


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_guard_does_not_fire_on_golden_runs(path):
    golden = load(path)
    model = build_model(golden)
    opt = _optimizer(golden, model, guard=True)
    for x, y in batches(golden):
        losses = per_sample_losses(model, x, y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    assert opt.diagnostics()["counters"]["guard_restarts"] == 0
