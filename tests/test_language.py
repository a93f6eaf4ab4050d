"""The element-wise language's operations: abs, sign, exp, log, pow, minimum, maximum and where.

- each, in every form an engine evaluates differently (tests/language_cases.py), through an optimizer's step
  on the reference engine and the foreach engine (its CPU path, and its device path forced on the CPU: masked
  per layer and in buckets), equals the formula computed by torch, on entries with zeros, negatives, ±inf and
  NaN (the fused engine: tests/test_fast_gpu.py, on a GPU or in Triton's interpreter);
- scalar expressions (per-layer coefficients as floats or 0-d tensors) have torch's semantics where Python's
  math raises or differs (log(0), a negative base to a fractional power, an overflow, a division by zero);
- the expressions are walked by the analyses (the vectors and coefficients a program reads), are refused
  where a condition is used as a value, print readably, and keep ``==`` as structural equality;
- the Triton source of each operation calls the accurate helper and compiles (checked as text: no GPU and no
  Triton needed);
- a part written with them (a clipped gain direction) composes and trains, equal on the engines.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from language_cases import ALL_FORMS, FORMS, PROGRAM, SCALARS, SPECIAL, expected, probe_composition, run_probe

import kalmanopt
from kalmanopt.program import (
    Assign,
    Coef,
    Compare,
    Const,
    Reduction,
    State,
    Vec,
    coefficients_read,
    evaluate_vector,
    is_vector,
    maximum,
    minimum,
    prepare_program,
    vectors_read,
    where,
)

INF, NAN = math.inf, math.nan
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
ENGINES = ("reference", "foreach", "foreach-masked", "foreach-buckets")

_COMPOSITIONS: dict[str, kalmanopt.Composition] = {}


def _composition(name: str, form) -> kalmanopt.Composition:
    if name not in _COMPOSITIONS:
        _COMPOSITIONS[name] = probe_composition(form)
    return _COMPOSITIONS[name]


@contextlib.contextmanager
def _engine(engine: str) -> Iterator[str]:
    """The implementation to ask for; the foreach engine's device path (masked, or in buckets of small layers)
    forced on the CPU."""
    if not engine.startswith("foreach-"):
        yield engine
        return
    from kalmanopt.engines import buckets, torch_ops

    original = torch_ops.TorchEngine._host, buckets.CONFIG["elements"]
    torch_ops.TorchEngine._host = lambda self, like: self.host_branches
    buckets.CONFIG["elements"] = 1000 if engine == "foreach-buckets" else 0
    try:
        yield "foreach"
    finally:
        torch_ops.TorchEngine._host, buckets.CONFIG["elements"] = original


entries = st.one_of(st.sampled_from(SPECIAL), st.floats(-5.0, 5.0, allow_nan=False))


@pytest.mark.parametrize("op, name, form", ALL_FORMS, ids=[name for _, name, _ in ALL_FORMS])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_each_operation_on_the_torch_engines_equals_torch(op, name, form, data):
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=2, max_size=3), label="sizes")
    xs = [torch.tensor(data.draw(st.lists(entries, min_size=n, max_size=n)), dtype=dtype) for n in sizes]
    ys = [torch.tensor(data.draw(st.lists(entries, min_size=n, max_size=n)), dtype=dtype) for n in sizes]
    # and a layer of every pair of special values (zeros of both signs, ±1, ±inf, NaN, ...)
    xs.insert(0, torch.tensor(SPECIAL, dtype=dtype).repeat_interleave(len(SPECIAL)))
    ys.insert(0, torch.tensor(SPECIAL, dtype=dtype).repeat(len(SPECIAL)))
    k, c = data.draw(st.sampled_from(SCALARS), label="k"), data.draw(st.sampled_from(SCALARS), label="c")
    composition = _composition(name, form)
    for engine in ENGINES:
        with _engine(engine) as implementation:
            got = run_probe(composition, implementation, xs, ys, k, c)
        for out, x, y in zip(got, xs, ys):
            where_ = f"{name} on {engine}: x={x}, y={y}, k={k}, c={c}"
            torch.testing.assert_close(out, expected(form, x, y, k, c), equal_nan=True, **TOL[dtype],
                                       msg=lambda m, where_=where_: f"{where_}\n{m}")


def test_every_operation_has_forms() -> None:
    assert set(FORMS) == {"abs", "sign", "exp", "log", "pow", "minimum", "maximum", "where", "clamp_min", "sqrt"}


# ------------------------------------------------------------------------------------------------ scalars
scalars = st.one_of(st.sampled_from(SPECIAL + (800.0, -800.0, 1e300, 3.0, -3.0)), st.floats(-50.0, 50.0))

UNARY = {"abs": (lambda a: abs(a), torch.abs), "exp": (lambda a: a.exp(), torch.exp),
         "log": (lambda a: a.log(), torch.log),
         "sign": (lambda a: a.sign(), lambda t: torch.where(torch.isnan(t), t, torch.sign(t)))}
BINARY = {"pow": (lambda a, b: a ** b, torch.pow), "minimum": (minimum, torch.minimum),
          "maximum": (maximum, torch.maximum),
          "where <": (lambda a, b: where(a < b, a - b, b * 2.0), lambda s, t: torch.where(s < t, s - t, t * 2.0)),
          "where >=": (lambda a, b: where(a >= b, 1.0, b), lambda s, t: torch.where(s >= t, 1.0, t))}


def _same(got, want: torch.Tensor) -> None:
    got = torch.as_tensor(got, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("op", sorted(UNARY))
@settings(max_examples=30, deadline=None)
@given(a=scalars)
def test_scalar_expressions_of_one_argument_have_torchs_semantics(op, a):
    """A coefficient expression, its coefficient a float (the CPU path) or a 0-d tensor (per layer)."""
    build, function = UNARY[op]
    want = function(torch.tensor(a, dtype=torch.float64))
    for value in (a, torch.tensor(a, dtype=torch.float64)):
        _same(evaluate_vector(build(Coef("a")), {}, {"a": value}), want)
    _same(evaluate_vector(build(Const(a)), {}, {}), want)


@pytest.mark.parametrize("op", sorted(BINARY))
@settings(max_examples=40, deadline=None)
@given(a=scalars, b=scalars)
def test_scalar_expressions_of_two_arguments_have_torchs_semantics(op, a, b):
    build, function = BINARY[op]
    want = function(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    for va in (a, torch.tensor(a, dtype=torch.float64)):
        for vb in (b, torch.tensor(b, dtype=torch.float64)):
            _same(evaluate_vector(build(Coef("a"), Coef("b")), {}, {"a": va, "b": vb}), want)


@pytest.mark.parametrize("a, b, want", [(0.0, -1.0, INF), (-0.0, -1.0, -INF), (-8.0, 1 / 3, NAN), (-2.0, 3.0, -8.0),
                                        (NAN, 0.0, 1.0), (1.0, NAN, 1.0), (-1.0, INF, 1.0), (1e300, 2.0, INF),
                                        (-INF, 0.5, INF), (-0.0, 0.5, 0.0), (-INF, -0.5, 0.0)])
def test_pow_is_cs_pow_on_every_path(a, b, want):
    """Where Python raises (or torch takes a square root for the number 0.5) the language has C's pow: on
    floats, on 0-d tensors and on vectors, with the exponent a number or an expression."""
    x = Vec("x")
    env = {"x": torch.tensor([a, a], dtype=torch.float64), "e": torch.tensor([b, b], dtype=torch.float64)}
    got = [evaluate_vector(Coef("a") ** Coef("b"), {}, {"a": a, "b": b}),
           evaluate_vector(Coef("a") ** b, {}, {"a": torch.tensor(a, dtype=torch.float64)}),
           evaluate_vector(x ** b, env, {}), evaluate_vector((x * 1.0) ** b, env, {}),
           evaluate_vector(x ** Vec("e"), env, {}), evaluate_vector(x ** Coef("b"), env, {"b": b})]
    for value in got:
        value = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        assert torch.equal(value.isnan(), torch.full_like(value, want).isnan()), (value, want)
        if not math.isnan(want):
            assert value.tolist() == [want] * value.numel()
            assert all(math.copysign(1, v) == math.copysign(1, want) for v in value.tolist())


def test_a_float_coefficient_divided_by_zero_is_ieees_not_pythons():
    """(Python raises ZeroDivisionError; torch and every engine's tensors give ±inf or NaN)."""
    quotient = Coef("a") / Coef("b")
    assert evaluate_vector(quotient, {}, {"a": 1.0, "b": 0.0}) == INF
    assert evaluate_vector(quotient, {}, {"a": -1.0, "b": 0.0}) == -INF
    assert evaluate_vector(quotient, {}, {"a": 1.0, "b": -0.0}) == -INF
    assert math.isnan(evaluate_vector(quotient, {}, {"a": 0.0, "b": 0.0}))


def test_where_of_two_numbers_over_a_vector_condition_keeps_the_vectors_dtype():
    x = Vec("x")
    for dtype in (torch.float64, torch.float32):
        v = torch.tensor([1.0, -1.0, NAN], dtype=dtype)
        value = evaluate_vector(where(x > 0.0, 0.1, -0.1), {"x": v}, {})
        assert value.dtype == dtype
        torch.testing.assert_close(value, torch.tensor([0.1, -0.1, -0.1], dtype=dtype))


def test_in_place_evaluation_leaves_the_programs_inputs_as_they_were():
    """Temporaries are overwritten in place; the vectors a program reads are not."""
    x, y = State("x"), State("y")
    program = [Assign(Vec("t"), (x * 2.0).exp()),
               Assign(State("out"), where(x < y, minimum(Vec("t"), y), (y - x) ** 2.0) + abs(x * y).log()
                      + (x + y).sign())]
    env = {"state.x": torch.tensor([1.0, -2.0, 0.0, NAN]), "state.y": torch.tensor([3.0, -4.0, 0.5, 1.0]),
           "state.out": torch.zeros(4)}
    before = {k: v.clone() for k, v in env.items()}
    prepare_program(program, ["state.out"]).run(env, {})
    xv, yv = before["state.x"], before["state.y"]
    want = (torch.where(xv < yv, torch.minimum((xv * 2).exp(), yv), (yv - xv) ** 2) + (xv * yv).abs().log()
            + torch.where((xv + yv).isnan(), xv + yv, (xv + yv).sign()))
    torch.testing.assert_close(env["state.out"], want, equal_nan=True)
    for key in ("state.x", "state.y"):
        torch.testing.assert_close(env[key], before[key], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------ structure
def test_the_analyses_see_through_every_operation():
    x, y, k = State("x"), Vec("H"), Coef("k")
    for _, name, form in ALL_FORMS:
        e = form(PROGRAM, x, y, k, Coef("c"))
        reads = {v.key for v in vectors_read([e])}
        assert reads <= {"state.x", "H"} and reads, name
        assert set(coefficients_read([e])) <= {"k", "c"}, name
        assert is_vector(e), name
    assert vectors_read([where(k < 0.0, 1.0, 2.0) * y]) == [y]
    assert vectors_read([where(x > y, 1.0, 2.0)]) == [x, y]  # (the condition alone reads the vectors)
    assert coefficients_read([where(x > k, Coef("a"), minimum(Coef("b"), 2.0) ** Coef("p"))]) == ["k", "a", "b", "p"]
    assert not is_vector(abs(k).exp().log().sign() ** 2.0)


def test_expressions_print_readably():
    x, k = Vec("x"), Coef("k")
    assert repr(abs(x)) == "abs(x)" and repr(x.sign()) == "sign(x)"
    assert repr(x.exp().log()) == "log(exp(x))"
    assert repr(x ** 2) == "(x ** 2.0)" and repr(2 ** x) == "(2.0 ** x)" and repr(x.pow(k)) == "(x ** k)"
    assert repr(minimum(x, k)) == "minimum(x, k)" and repr(maximum(0, x)) == "maximum(0.0, x)"
    assert repr(where(x >= k, x, 0.0)) == "where(x >= k, x, 0.0)"
    assert repr(State("p") < 1) == "(state['p'] < 1.0)"


def test_comparisons_make_conditions_and_equality_stays_structural():
    x, y = Vec("x"), Vec("y")
    assert isinstance(x < y, Compare) and isinstance(x <= 1.0, Compare) and isinstance(0.0 < x, Compare)
    assert (0.0 < x) == (x > 0.0)  # (reflected)
    assert x == Vec("x") and x != y and (x == y) is False  # == is not an element-wise comparison
    assert where(x < y, x, y) == where(x < y, x, y) and where(x < y, x, y) != where(x <= y, x, y)
    program = (Assign(State("p"), where(x < y, abs(x), y ** 2) + minimum(x, y).exp()),)
    assert program == (Assign(State("p"), where(x < y, abs(x), y ** 2) + minimum(x, y).exp()),)
    assert len({program, (Assign(State("p"), where(x < y, abs(x), y ** 2) + minimum(x, y).exp()),)}) == 1


def test_a_condition_is_not_a_value():
    x, y = Vec("x"), Vec("y")
    with pytest.raises(TypeError, match="condition"):
        Assign(State("p"), x < y)
    with pytest.raises(TypeError, match="condition"):
        (x < y) * 2.0
    with pytest.raises(TypeError, match="condition"):
        minimum(x < y, x)
    with pytest.raises(TypeError, match="condition"):
        Reduction("count", x > 0.0)
    with pytest.raises(TypeError, match="truth value"):
        bool(x < y)
    with pytest.raises(TypeError, match="truth value"):
        max(x, y)  # (Python's max compares: refused, not silently the first)
    with pytest.raises(TypeError, match="comparison"):
        where(x, x, y)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="combines expressions and numbers"):
        x ** "2"  # type: ignore[operator]


def test_assignments_and_reductions_take_the_new_operations():
    x = State("x")
    for _, name, form in ALL_FORMS:
        value = form(PROGRAM, x, Vec("H"), Coef("k"), Coef("c"))
        assert Assign(x, value).expr is value, name
        assert Reduction("r", value).expr is value, name
    Assign(Vec("t"), Coef("k").exp())  # a scalar value is an expression too


# ------------------------------------------------------------------------------------------------ Triton source
SLOTS = ["theta", "g", "state.x", "state.y", "state.out"]

#: what the source of each operation calls
CALLS = {"abs": ["tl.abs("], "sign": ["nan_sign("], "exp": ["precise_exp("], "log": ["precise_log("],
         "pow": ["precise_pow("], "minimum": ["tl.minimum(", "propagate_nan=tl.PropagateNan.ALL"],
         "maximum": ["tl.maximum(", "propagate_nan=tl.PropagateNan.ALL"], "where": ["tl.where("],
         "clamp_min": ["tl.maximum(", "propagate_nan=tl.PropagateNan.ALL"], "sqrt": ["precise_sqrt("]}


def _source(program, reductions=()):
    from kalmanopt.engines.triton_source import source_for

    return source_for((), tuple(reductions), tuple(program), ["state.out"], SLOTS)


def _kernels(source: str) -> str:
    """The generated kernels, without the module's header of helpers."""
    return source[source.index("def reduce_kernel" if "def reduce_kernel" in source else "def apply_kernel"):]


@pytest.mark.parametrize("op, name, form", ALL_FORMS, ids=[name for _, name, _ in ALL_FORMS])
def test_the_triton_source_of_each_operation_calls_its_helper_and_compiles(op, name, form):
    x, y = State("x"), State("y")
    value = form(PROGRAM, x, y, Coef("k"), Coef("c"))
    source, reduce_coefs, reduce_slots, apply_coefs, apply_slots = _source(
        [Assign(State("out"), value)], [Reduction("r", form(PROGRAM, x, y, Coef("k"), Coef("c")))])
    compile(source, f"<kernels of {name}>", "exec")
    kernels = _kernels(source)
    for call in CALLS[op]:
        assert call in kernels, (name, call)
    assert set(coefficients_read([value])) <= set(apply_coefs) and set(coefficients_read([value])) <= set(reduce_coefs)
    assert {v.key for v in vectors_read([value])} <= set(reduce_slots) & set(apply_slots)
    assert not re.search(r"(?<![\w\"'])(inf|nan)\b", kernels), name  # (no bare name: those travel in the table)


def test_the_header_takes_libdevice_on_a_gpu_and_tls_functions_in_the_interpreter():
    """The accurate functions: libdevice's exp, log and pow (tl.exp is an approximation in float32), Triton's own
    in the interpreter, which has no libdevice; the helpers compile."""
    from kalmanopt.engines.triton_source import _HEADER

    compile(_HEADER, "<header>", "exec")
    for call in ("libdevice.exp(x)", "libdevice.log(x)", "libdevice.pow(x, y)", "tl.exp(x)", "tl.log(x)",
                 "interpreted_pow(x, y)", "INTERPRETED = tl.constexpr("):
        assert call in _HEADER, call
    for helper in ("precise_exp", "precise_log", "precise_pow", "nan_sign", "precise_sqrt"):
        assert f"@triton.jit\ndef {helper}(" in _HEADER, helper


def test_the_triton_source_folds_constants_and_passes_inexact_ones_in_the_table():
    x = State("x")
    source, _, _, coefs, _ = _source([Assign(State("out"), x * Const(2.0).exp() + minimum(x, NAN) + maximum(x, -INF)
                                             + x ** (Const(1.0) + 1.0))])
    kernels = _kernels(source)
    assert "precise_exp" not in kernels  # e**2, evaluated once, in double precision
    assert f"__const:{math.exp(2.0)!r}" in coefs and "__const:nan" in coefs and "__const:-inf" in coefs
    assert "precise_pow(" in kernels and "tl.full([], 2.0, S_DT)" in kernels  # (the exponent, in the state dtype)
    compile(source, "<kernels>", "exec")


def test_memory_traffic_sees_a_vector_read_only_by_a_condition():
    from kalmanopt.engines.triton_source import slot_traffic

    program = [Assign(State("out"), where(State("x") > State("y"), 1.0, Coef("k")))]
    _, reads, writes = slot_traffic((), (), program, ["state.out"], SLOTS)
    assert set(reads) == {"state.x", "state.y"} and writes == ["state.out"]


# ------------------------------------------------------------------------------------------------ a part
class ClippedDiagonal(kalmanopt.DiagonalSurrogate):
    """koala-diag with its gain direction p̂ ∘ H clipped element-wise at ± clip (spelled three ways)."""

    hyperparameters = kalmanopt.DiagonalSurrogate.hyperparameters + (
        kalmanopt.HyperParameter("clip", 0.01, kalmanopt.Range(0.0, low_open=True), "the largest |p̂ H_i|"),)

    def __init__(self, spelling: str = "where") -> None:
        self.spelling = spelling

    def options(self) -> dict[str, object]:
        return {"spelling": self.spelling}

    def direction(self, hp):
        PH, clip = Vec("PH"), Coef("clip")
        if self.spelling == "where":
            return where(abs(PH) > clip, clip * PH.sign(), PH)
        if self.spelling == "minmax":
            return minimum(maximum(PH, -clip), clip)
        return PH.sign() * minimum(abs(PH), clip)


def _train(composition, implementation, steps=25, **hp):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    X, y = torch.randn(48, 5, dtype=torch.float64), torch.randn(48, 1, dtype=torch.float64)
    opt = kalmanopt.KalmanOptimizer(model.parameters(), composition, implementation=implementation, **hp)
    with torch.no_grad():
        first = float((model(X) - y).pow(2).mean())
    for _ in range(steps):
        losses = (model(X) - y).pow(2).squeeze(1)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    with torch.no_grad():
        last = float((model(X) - y).pow(2).mean())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), first, last


def test_a_part_written_with_the_language_composes_and_trains_equal_on_the_engines():
    hp = dict(sigma=0.1, q=0.01, lr=0.5)
    runs = {}
    for spelling in ("where", "minmax", "sign"):
        composition = kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(),
                                            ClippedDiagonal(spelling), name=f"clipped-{spelling}")
        assert kalmanopt.plan.contract_gap(composition) is None
        for implementation in ("reference", "foreach"):
            runs[spelling, implementation] = _train(composition, implementation, clip=0.01, **hp)
    theta, first, last = runs["where", "reference"]
    assert last < 0.9 * first  # it trains
    for key, (other, _, _) in runs.items():
        torch.testing.assert_close(other, theta, rtol=1e-12, atol=0.0, msg=str(key))
    diag, _, _ = _train(kalmanopt.compose(surrogate="diagonal"), "foreach", **hp)
    assert not torch.allclose(diag, theta)  # the clip bites
    unclipped, _, _ = _train(kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(),
                                                   ClippedDiagonal(), name="clipped"), "foreach", clip=1e9, **hp)
    torch.testing.assert_close(unclipped, diag, rtol=1e-12, atol=0.0)  # a clip never reached: koala-diag
