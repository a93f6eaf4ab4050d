"""The compiled coefficient functions (what the fused engine runs on CUDA) equal the eager ones.

``torch.compile`` with the ``aot_eager`` backend traces every preset's batched coefficient functions
into one graph (``fullgraph=True``: no part falls back to Python between kernels) and must give the
eager values exactly; the inductor backend (the fused engine's) is checked on the GPU by
``tests/test_fast_gpu.py``, which compares whole fused steps with the reference path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import PRESETS

import kalmanopt
import kalmanopt.engines.torch_ops as torch_ops
from kalmanopt.contract import CoefficientStage
from kalmanopt.engines.compiled import CompiledCoefficients, static_hyperparameters

_FIELDS = ("coef", "new_layer", "new_group", "counters", "info")
_TENSORS = ("S", "L", "R", "code", "skip", "ok")


class _Graphs:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.count += 1
        return gm.forward


def _copy(b: CoefficientStage) -> CoefficientStage:
    return CoefficientStage(hp=b.hp, red=dict(b.red), layer=dict(b.layer), group=dict(b.group), numel=b.numel,
                            loss=b.loss,
                            statistic=b.statistic, ok=b.ok, skip=b.skip, diagnostics=b.diagnostics, lr=b.lr)


def _assert_same(eager: CoefficientStage, compiled: CoefficientStage) -> None:
    for name in _FIELDS:
        x, y = getattr(eager, name), getattr(compiled, name)
        assert x.keys() == y.keys(), name
        for key in x:
            torch.testing.assert_close(y[key], x[key].to(y[key]).expand_as(y[key]), rtol=0, atol=0,
                                       msg=f"{name}[{key!r}]")
    for name in _TENSORS:
        x, y = getattr(eager, name), getattr(compiled, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(y, x.to(y).expand_as(y), rtol=0, atol=0, msg=name)
    assert len(eager.gain) == len(compiled.gain)
    for x, y in zip(eager.gain, compiled.gain):
        torch.testing.assert_close(y, torch.as_tensor(x).to(y).expand_as(y), rtol=0, atol=0)


def _patch(monkeypatch: pytest.MonkeyPatch, compiled: CompiledCoefficients) -> dict[str, int]:
    """Every coefficient call of the foreach engine also runs compiled, and the two must agree."""
    calls = {"update": 0, "predict": 0}

    def checked(kind: str, eager):
        def run(self, composition, b: CoefficientStage) -> CoefficientStage:
            other = _copy(b)
            eager(self, composition, b)
            getattr(compiled, kind)(composition, other)
            _assert_same(b, other)
            calls[kind] += 1
            return b
        return run

    monkeypatch.setattr(torch_ops.TorchEngine, "update_coefficients",
                        checked("update", torch_ops.TorchEngine.update_coefficients))
    monkeypatch.setattr(torch_ops.TorchEngine, "predict_coefficients",
                        checked("predict", torch_ops.TorchEngine.predict_coefficients))
    return calls


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch):
    backend = _Graphs()
    return backend, _patch(monkeypatch, CompiledCoefficients(backend=backend, fullgraph=True))


def _run(preset: str, dtype: torch.dtype, steps: int = 4, **kw) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in ((7, 5), (5,), (3, 4, 2), (1,))]
    opt = kalmanopt.create(preset, params, implementation="foreach", **kw)
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p) * (0.0 if (k == 2 and i == 3) else 1.0)  # a vanishing gradient too
        opt.step(loss=torch.rand(8, dtype=dtype) + 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_coefficients_equal_eager(preset: str, dtype: torch.dtype, compare) -> None:
    backend, calls = compare
    _run(preset, dtype, weight_decay=1e-3)
    assert calls["update"] == 4
    assert backend.count >= 1  # it compiled (did not silently run eagerly)


@pytest.mark.parametrize("options", [{"track_diagnostics": True}, {"loss_statistic": "variance", "r": None},
                                     {"guard": False}, {"lr": torch.tensor(0.05)}])
def test_compiled_coefficients_equal_eager_with_options(options: dict, compare) -> None:
    _run("koala++", torch.float32, **options)
    _run("koala-m", torch.float32, **options)


@pytest.mark.parametrize("name,first,step", [("q", 0.1, 0.01), ("sigma", 0.1, 0.01), ("weight_decay", 1e-3, 1e-4),
                                              ("alpha_r", 0.9, -0.01)])
def test_a_schedule_over_a_hyperparameter_compiles_at_most_twice(name: str, first: float, step: float,
                                                                   compare) -> None:
    """A float hyper-parameter is compiled in at its first value; at a second one torch.compile compiles once
    more with the value as an input (its automatic dynamic floats): twelve values, at most two compilations of
    each phase, and every step equal to the eager functions."""
    backend, calls = compare
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (5,))]
    opt = kalmanopt.create("koala++", params, implementation="foreach", weight_decay=1e-3)
    for k in range(12):
        opt.param_groups[0][name] = first + k * step
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(loss=torch.rand(8) + 0.1)
    assert calls["update"] == 12
    assert 1 <= backend.count <= 4  # (the update's and the predict's coefficient functions, twice each at most)


def test_every_preset_compiles_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """One code object per kind of composition: many presets in one process never exhaust torch.compile's
    bound on variants (past it torch would run the functions eagerly, silently)."""
    backend = _Graphs()
    _patch(monkeypatch, CompiledCoefficients(backend=backend, fullgraph=True))
    for preset in PRESETS:
        before = backend.count
        _run(preset, torch.float32, steps=2)
        assert backend.count > before, preset


def test_a_compiler_failure_falls_back_to_the_eager_functions_with_one_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    compiled = CompiledCoefficients(backend=broken)
    calls = _patch(monkeypatch, compiled)  # (and the fallback's values equal the eager ones)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run("koala++", torch.float32)
    mine = [w for w in caught if "did not compile" in str(w.message)]
    assert len(mine) == 1 and mine[0].category is RuntimeWarning
    assert "run eagerly" in str(mine[0].message)
    assert compiled.failed is not None and "no compiler here" in compiled.failed
    assert calls["update"] == 4


def test_static_hyperparameters_keep_plain_values_only() -> None:
    group = {"params": [torch.zeros(1)], "lr": 0.1, "betas": (0.9, 0.99), "r": None, "name": "x",
             "weights": torch.ones(2), "nested": [1, 2]}
    assert static_hyperparameters(group) == {"betas": (0.9, 0.99), "r": None, "name": "x"}


def test_a_learning_rate_schedule_compiles_each_phase_once(compare) -> None:
    """η enters the compiled function as a tensor: a new learning rate at every step (a scheduler's, as
    ``LambdaLR`` writes it into ``lr`` with its ``initial_lr`` beside) never compiles a phase again, and every
    step equals the eager functions."""
    backend, calls = compare
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (5,))]
    opt = kalmanopt.create("koala++", params, implementation="foreach", weight_decay=1e-3)
    opt.param_groups[0]["initial_lr"] = 0.1
    for k in range(6):
        opt.param_groups[0]["lr"] = 0.1 / (k + 1)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(loss=torch.rand(8) + 0.1)
    assert calls["update"] == 6
    assert backend.count == 1  # (the update's; KOALA++'s predict is too small to compile)


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_environment_turns_compilation_off(value: str, enabled: bool) -> None:
    import os
    import subprocess
    import sys

    code = "from kalmanopt.engines.compiled import CONFIG; print(CONFIG['enabled'])"
    env = dict(os.environ, KALMANOPT_COMPILE_COEFFICIENTS=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(enabled)
