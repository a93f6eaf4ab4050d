"""Hypothesis fuzzing of the optimizer: random shapes, hyper-parameters in range, odd gradients.

Every preset and every implementation usable here is driven for a few steps with gradients that
contain zeros and huge and tiny magnitudes, losses that may be negative, and NaN or infinities
injected into the loss, the statistic or a gradient at random steps. Two invariants:

- finite input never produces a non-finite parameter or filter state;
- non-finite input changes nothing: parameters and state stay bit for bit, one counter moves.

``FUZZ_EXAMPLES`` counts the examples tried in this process (reported by the last test).

A second fuzz test hunts at the floors (:func:`test_fuzz_at_the_floors_finite_in_finite_out`): an R
driven to its smallest normal value, no process noise, gradients up to 1e18, weights of 0 or 1e19,
KOALA-M's P_0 singular — where products of a huge factor and a small one give ∞ · 0 = NaN.

Volume: 60 examples per (preset, implementation) in the default, derandomised "ci" profile
(``tests/conftest.py``), and a fifth of that at the floors; ``HYPOTHESIS_PROFILE=deep`` draws 2000
(400 at the floors) with random seeds, and ``KALMANOPT_FUZZ_EXAMPLES=N`` sets the number in either.
Failing examples found are kept below as explicit ``@example`` cases
(:func:`test_fuzz_examples_found_earlier`), replayed on every engine of their preset on every run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter

import pytest
import torch
from cases import CASES, PRESETS
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import kalmanopt

#: examples per (preset, implementation): KALMANOPT_FUZZ_EXAMPLES, else 60 in the "ci" profile and the
#: profile's max_examples in any other ("deep": 2000)
EXAMPLES = int(os.environ.get("KALMANOPT_FUZZ_EXAMPLES", "0")) or (
    60 if settings.get_current_profile_name() == "ci" else settings().max_examples)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_EXAMPLES: Counter = Counter()

MAGNITUDES = [0.0, 1e-30, 1e-10, 1e-4, 1.0, 1e4, 1e10, 1e20]
LOSS_SCALES = [0.0, 1e-8, 1.0, 1e3, 1e8]
NON_FINITE = [math.nan, math.inf, -math.inf]




@st.composite
def hyperparameters(draw: st.DrawFn, preset: str) -> dict:
    """Values inside every declared range, spread over orders of magnitude."""
    keywords = kalmanopt.preset_keywords(preset)
    hp: dict = {}
    choices = {
        "lr": [0.0, 1e-3, 0.1, 1.0, 10.0],
        "sigma": [1e-6, 1e-2, 0.1, 1.0, 10.0],
        "q": [0.0, 1e-6, 0.01, 0.1, 10.0],
        "r": [None, None, 1e-8, 1e-2, 1.0, 1e3],
        "alpha_r": [0.0, 0.5, 0.9, 0.999],
        "weight_decay": [0.0, 1e-4, 0.1],
        "sw": [1e-6, 0.1, 10.0],
        "sv": [1e-6, 0.1, 10.0],
        "qw": [0.0, 0.01, 1.0],
        "qv": [0.0, 0.01, 1.0],
        "a": [0.0, 0.5, 0.9, 0.99],
    }
    for name in keywords:
        if name in choices:
            hp[name] = draw(st.sampled_from(choices[name]))
    if "sc" in keywords:  # |sc| <= sqrt(sw sv): P_0 a covariance
        hp["sc"] = draw(st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])) * math.sqrt(hp["sw"] * hp["sv"])
    if "memory" in keywords:
        hp["memory"] = draw(st.integers(1, 3))
    hp["granularity"] = draw(st.sampled_from(["layer", "layer", "global"]))
    hp["loss_statistic"] = draw(st.sampled_from(["second_moment", "variance"]))
    hp["track_diagnostics"] = draw(st.booleans())  # (runs the reference path, whatever the implementation)
    return hp


shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3)


@st.composite
def schedule(draw: st.DrawFn, n_params: int) -> list[dict]:
    """Per step: gradient magnitudes per parameter, a zero mask, the loss scale and sign, and an
    optional injection of a non-finite value into the loss, a per-sample loss or a gradient."""
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        inject = draw(st.sampled_from([None, None, None, "loss", "sample", "gradient"]))
        steps.append({
            "magnitudes": draw(st.lists(st.sampled_from(MAGNITUDES), min_size=n_params, max_size=n_params)),
            "zero_fraction": draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
            "missing_grad": draw(st.lists(st.booleans(), min_size=n_params, max_size=n_params)),
            "loss_scale": draw(st.sampled_from(LOSS_SCALES)),
            "negative": draw(st.booleans()) and draw(st.booleans()),
            "inject": inject,
            "value": draw(st.sampled_from(NON_FINITE)),
            "where": draw(st.integers(0, n_params - 1)),
            "seed": draw(st.integers(0, 2**31 - 1)),
        })
    return steps


def _snapshot(opt: kalmanopt.KalmanOptimizer, params: list[torch.Tensor]) -> tuple[list, dict]:
    return [p.detach().clone() for p in params], _clone(opt.state_dict()["state"])


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _equal(a, b, skip=("nonfinite_steps",)) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))) and \
            bool(torch.equal(torch.isnan(a), torch.isnan(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a if k not in skip)
    return a == b


def _unchanged(after: dict, before: dict) -> bool:
    """Bit-for-bit equal, except for the event counters and a group's state created by this call
    (a first skipped step creates the counters that record it)."""
    created = set(after) - set(before)
    return all((isinstance(k, str) and k.startswith("group")) or after[k] == {} for k in created) and \
        set(before) <= set(after) and all(_equal(after[k], before[k]) for k in before)


def _finite_state(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite_state(v) for v in value.values())
    return True


def _fuzz_run(preset: str, implementation: str, dtype: torch.dtype, param_shapes: list, hp: dict,
              steps: list[dict], api: str, init_scale: float = 1.0, tally: str = "") -> None:
    FUZZ_EXAMPLES[preset + tally] += 1
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype) * init_scale) for shape in param_shapes]
    hp = dict(hp)
    memory = hp.pop("memory", None)
    extra = {} if memory is None else {"memory": memory}
    opt = kalmanopt.create(preset, params, implementation=implementation, **hp, **extra)
    for k, step in enumerate(steps):
        g = torch.Generator().manual_seed(step["seed"])
        for i, p in enumerate(params):
            if step["missing_grad"][i]:
                p.grad = None
                continue
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * step["magnitudes"][i]
            grad[torch.rand(p.shape, generator=g) < step["zero_fraction"]] = 0.0
            p.grad = grad.to(dtype)
        sign = -1.0 if step["negative"] else 1.0
        losses = (sign * step["loss_scale"] * torch.rand(8, generator=g, dtype=torch.float64)).to(dtype)
        bad = step["inject"]
        if bad == "loss":
            losses = torch.full_like(losses, step["value"])
        elif bad == "sample":
            losses[0] = step["value"]
        elif bad == "gradient":
            target = params[step["where"]]
            if target.grad is None:
                target.grad = torch.zeros_like(target)
            target.grad.view(-1)[0] = step["value"]
        before = _snapshot(opt, params)
        counters_before = opt.diagnostics()["counters"]
        # no gradient at all (backward forgotten): the call changes nothing, no counter included
        no_gradient = all(p.grad is None for p in params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if api == "step":
                opt.step(loss=losses)
                applied = bad is None
            else:
                opt.predict()
                predicted = _snapshot(opt, params)
                mean = losses.mean()
                statistic = kalmanopt.loss_statistic(losses, hp["loss_statistic"])
                applied = opt.update(mean, statistic)
                assert applied == (bad is None and not no_gradient)
        counters = opt.diagnostics()["counters"]
        if no_gradient:
            if api == "step":
                assert all(torch.equal(p, q) for p, q in zip(params, before[0])), "a step without gradient moved θ"
                assert _equal(opt.state_dict()["state"], before[1], skip=()), "a step without gradient changed state"
            else:  # (the predict above ran; the update changed nothing after it)
                assert all(torch.equal(p, q) for p, q in zip(params, predicted[0]))
                assert _equal(opt.state_dict()["state"], predicted[1], skip=())
        elif bad is None:
            assert all(bool(torch.isfinite(p).all()) for p in params), f"non-finite parameter after step {k}"
            assert _finite_state(opt.state_dict()["state"]), f"non-finite filter state after step {k}"
            assert counters["nonfinite_steps"] == counters_before["nonfinite_steps"]
            for name, layer in opt.diagnostics()["layers"].items():
                # the step size η L_ℓ × gain coefficient is never negative; S_k > 0 where the layer moved
                assert layer["gain_scale"] >= 0.0, (k, name, layer)
                assert layer["S"] > 0.0 or layer["gain_scale"] == 0.0, (k, name, layer)
        else:
            assert not applied
            reference = before if api == "step" else predicted
            assert all(torch.equal(p, q) for p, q in zip(params, reference[0])), "a skipped step moved θ"
            assert _unchanged(opt.state_dict()["state"], reference[1]), "a skipped step changed the filter state"
            assert counters["nonfinite_steps"] == counters_before["nonfinite_steps"] + 1
            assert counters["steps"] == counters_before["steps"]


@pytest.mark.parametrize("preset,implementation", CASES)
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]), param_shapes=shapes,
       api=st.sampled_from(["step", "two-phase"]))
def test_fuzz_finite_in_finite_out_and_bad_input_changes_nothing(preset, implementation, data, dtype,
                                                                  param_shapes, api):
    hp = data.draw(hyperparameters(preset), label="hyperparameters")
    steps = data.draw(schedule(len(param_shapes)), label="steps")
    _fuzz_run(preset, implementation, dtype, param_shapes, hp, steps, api)


# ----------------------------------------------------------------------------- at the floors
#: examples per (preset, implementation) of the hunt at the floors: a fifth of the main fuzz's
FLOOR_EXAMPLES = max(EXAMPLES // 5, 10)


@st.composite
def floor_hyperparameters(draw: st.DrawFn, preset: str) -> dict:
    """Hyper-parameters that drive the filter to its floors together: R on its floor (an online R with
    alpha_r 0 and zero losses, or r = 1e-30), no process noise, extreme sigma, KOALA-M's P_0 singular."""
    keywords = kalmanopt.preset_keywords(preset)
    choices = {
        "lr": [1.0, 10.0],
        "sigma": [1e-6, 1.0, 10.0],
        "q": [0.0, 0.0, 1e-6],
        "r": [None, None, None, 1e-30],
        "alpha_r": [0.0, 0.5],
        "weight_decay": [0.0, 0.1, 1.0],
        "sw": [1e-6, 0.1, 10.0],
        "sv": [1e-6, 0.1, 10.0],
        "qw": [0.0, 0.01],
        "qv": [0.0, 0.01],
        "a": [0.0, 0.9],
    }
    hp = {name: draw(st.sampled_from(choices[name])) for name in keywords if name in choices}
    if "sc" in keywords:
        hp["sc"] = draw(st.sampled_from([-1.0, 0.0, 1.0])) * math.sqrt(hp["sw"] * hp["sv"])
    if "memory" in keywords:
        hp["memory"] = draw(st.integers(1, 3))
    hp["granularity"] = draw(st.sampled_from(["layer", "global"]))
    hp["loss_statistic"] = draw(st.sampled_from(["second_moment", "variance"]))
    hp["track_diagnostics"] = draw(st.booleans())
    return hp


@st.composite
def floor_schedule(draw: st.DrawFn, n_params: int) -> list[dict]:
    """Finite steps with mostly zero losses and gradients from 1e-4 to 1e18."""
    return [{"magnitudes": draw(st.lists(st.sampled_from([1e-4, 1.0, 1e4, 1e10, 1e18]), min_size=n_params,
                                         max_size=n_params)),
             "zero_fraction": draw(st.sampled_from([0.0, 0.0, 0.5, 0.9])), "missing_grad": [False] * n_params,
             "loss_scale": draw(st.sampled_from([0.0, 0.0, 0.0, 1e-8, 1.0, 1e8])), "negative": False,
             "inject": None, "value": math.nan, "where": 0, "seed": draw(st.integers(0, 2**31 - 1))}
            for _ in range(draw(st.integers(2, 8)))]


@pytest.mark.parametrize("preset,implementation", CASES)
@settings(SETTINGS, max_examples=FLOOR_EXAMPLES)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float64]),
       param_shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=2).map(tuple), min_size=1,
                             max_size=3),
       api=st.sampled_from(["step", "two-phase"]), init_scale=st.sampled_from([1.0, 1.0, 0.0, 1e19]))
def test_fuzz_at_the_floors_finite_in_finite_out(preset, implementation, data, dtype, param_shapes, api,
                                                 init_scale):
    """The hunt at the floors (docs/reliability.md §7): every floor at once, finite input only."""
    hp = data.draw(floor_hyperparameters(preset), label="hyperparameters")
    steps = data.draw(floor_schedule(len(param_shapes)), label="steps")
    _fuzz_run(preset, implementation, dtype, param_shapes, hp, steps, api, init_scale, tally=" floors")


def _zero_losses(n_steps: int, magnitudes: tuple[list[float], ...] = ([1.0],)) -> list[dict]:
    """A schedule of ``n_steps`` steps with all losses 0 and gradients of the given magnitudes (cycled)."""
    return [{"magnitudes": magnitudes[k % len(magnitudes)], "zero_fraction": 0.0,
             "missing_grad": [False] * len(magnitudes[0]), "loss_scale": 0.0, "negative": False, "inject": None,
             "value": math.nan, "where": 0, "seed": k} for k in range(n_steps)]


#: found by hypothesis on CI (issue 9): koala++, float32, one (2, 3) parameter, sigma 1e-6, q 0, weight
#: decay 0.1, alpha_r 0, lr 10, zero losses: S lands on the R floor, v + QH = 0, the guard S ≤ 1e-6·R
#: does not fire, the gain is inf and inf·0 = NaN. It failed on the reference path too.
ZERO_LOSSES_AT_THE_R_FLOOR = {
    "preset": "koala++", "dtype": torch.float32, "param_shapes": [(2, 3)], "api": "step", "steps": _zero_losses(2),
    "hp": {"lr": 10.0, "sigma": 1e-6, "q": 0.0, "r": None, "alpha_r": 0.0, "weight_decay": 0.1,
           "granularity": "layer", "loss_statistic": "second_moment", "track_diagnostics": False},
}

#: found by a hunt at the floors (docs/reliability.md §7): koala++ and koala++-ns in float32, gradients of 1e10,
#: sigma 10, zero losses: R on its floor, R_k / S_{k-1} underflows in the first update's 1 − λ_k, v_k = 0,
#: S_k = R_k, and the step η L / S_k overflows against a direction of 0 — NaN in every weight at the first step.
BIG_GRADIENTS_AT_THE_R_FLOOR = {
    "dtype": torch.float32, "param_shapes": [(5,), (5,), ()], "api": "two-phase",
    "steps": _zero_losses(1, ([1.0, 1e10, 1e10],)),
    "hp": {"lr": 1.0, "sigma": 10.0, "q": 0.0, "r": None, "alpha_r": 0.0, "weight_decay": 1.0,
           "granularity": "global", "loss_statistic": "second_moment", "track_diagnostics": True},
}

#: found by the same hunt: koala-diag in float64 (!), two scalar parameters, zero losses, q 0: the diagonal
#: posterior collapses p to 0 against an R on its floor, then 1/S ≈ 4e307 and η L / S overflows against p̂ ∘ H = 0.
DIAGONAL_COLLAPSED_AT_THE_R_FLOOR = {
    "preset": "koala-diag", "dtype": torch.float64, "param_shapes": [(), ()], "api": "two-phase",
    "steps": _zero_losses(2, ([1e-4, 1e18], [1e-4, 1e10])),
    "hp": {"lr": 10.0, "sigma": 1.0, "q": 0.0, "r": None, "alpha_r": 0.0, "weight_decay": 1.0,
           "granularity": "layer", "loss_statistic": "second_moment", "track_diagnostics": True},
}


#: found by the hunt at the floors: koala++-lr in float32 with gradients of 1e18 — the per-layer low-rank
#: surrogate carried its older products forward as W − (A u) uᵀ / S, and (A u) uᵀ overflowed before the
#: division; its two-pass contract (carried products as a linear combination with coefficients from the dots)
#: passes it
LOW_RANK_PRODUCTS_OVERFLOW = {
    "preset": "koala++-lr", "dtype": torch.float32, "param_shapes": [(5, 5), (4, 6)], "api": "step",
    "steps": _zero_losses(2, ([1.0, 1e18], [1e18, 1e18])),
    "hp": {"lr": 1.0, "sigma": 1.0, "q": 1e-6, "r": 1e-8, "alpha_r": 0.0, "weight_decay": 0.0, "memory": 2,
           "granularity": "global", "loss_statistic": "second_moment", "track_diagnostics": True},
}


def _found(run: dict, preset: str | None = None) -> dict:
    return {**run, "preset": preset or run["preset"]}


@settings(phases=[Phase.explicit], deadline=None)
@example(run=LOW_RANK_PRODUCTS_OVERFLOW)
@example(run=ZERO_LOSSES_AT_THE_R_FLOOR)
@example(run=_found(BIG_GRADIENTS_AT_THE_R_FLOOR, "koala++"))
@example(run=_found(BIG_GRADIENTS_AT_THE_R_FLOOR, "koala++-ns"))
@example(run=DIAGONAL_COLLAPSED_AT_THE_R_FLOOR)
@given(run=st.just(None))  # (only the explicit examples run: Phase.explicit)
def test_fuzz_examples_found_earlier(run):
    """The failing examples fuzzing found, replayed on every engine of their preset on every run."""
    run = dict(run)
    preset = run.pop("preset")
    implementations = [i for p, i in CASES if p == preset]
    assert implementations
    for implementation in implementations:
        _fuzz_run(preset, implementation, **run)


@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["loss", "statistic", "gradient"]), value=st.sampled_from(NON_FINITE),
       warmup=st.integers(0, 3))
def test_fuzz_strict_raises_and_changes_nothing(preset, kind, value, warmup):
    FUZZ_EXAMPLES[preset + " strict"] += 1
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    opt = kalmanopt.create(preset, model.parameters(), strict=True)
    x = torch.randn(6, 3)
    for _ in range(warmup):
        losses = model(x).pow(2).mean(dim=1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    losses = model(x).pow(2).mean(dim=1)
    opt.zero_grad()
    losses.mean().backward()
    losses = losses.detach().clone()
    if kind == "loss":
        losses[:] = value
    elif kind == "statistic":  # a finite mean whose second moment overflows
        losses[0] = torch.finfo(losses.dtype).max / 4
    else:
        model.weight.grad[0, 0] = value
    before = _snapshot(opt, list(model.parameters()))
    with pytest.raises(kalmanopt.NonFiniteError, match="non-finite"):
        opt.step(loss=losses)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))
    assert _equal(opt.state_dict()["state"], before[1], skip=())


def test_fuzz_volume_report():
    """Prints how many examples the fuzz tests above tried in this process (run with -s)."""
    total = sum(FUZZ_EXAMPLES.values())
    print(f"\nfuzz examples tried: {total} " + ", ".join(f"{k}: {v}" for k, v in sorted(FUZZ_EXAMPLES.items())))
    if FUZZ_EXAMPLES:
        assert total >= len(CASES)
