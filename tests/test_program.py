"""The element-wise programs every engine executes: the torch evaluation equals the plain formulas.

The engines run each part's declared reductions and programs; these properties pin the executor
(kalmanopt.program) against a naive, out-of-place evaluation, for every preset's declaration, over
random vectors and random coefficients.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.plan import predict_plan, update_plan
from kalmanopt.program import (
    Assign,
    BinOp,
    ClampMin,
    Coef,
    Const,
    Reduction,
    Sqrt,
    State,
    Vec,
    coefficients_read,
    prepare_program,
    reduce_layer,
    vectors_read,
)
from kalmanopt.scratch import Scratch

DT = torch.float64
CONTRACT_PRESETS = [p for p in kalmanopt.presets()
                    if kalmanopt.plan.contract_gap(kalmanopt.get_preset(p).build()) is None]


def _naive(e, env, coefs):
    """Out-of-place evaluation of an expression, the plain way."""
    if isinstance(e, Vec):
        return env[e.key]
    if isinstance(e, Coef):
        return coefs[e.name]
    if isinstance(e, Const):
        return e.value
    if isinstance(e, ClampMin):
        value = _naive(e.a, env, coefs)
        return value.clamp_min(e.low) if isinstance(value, torch.Tensor) else max(value, e.low)
    if isinstance(e, Sqrt):
        value = _naive(e.a, env, coefs)
        return torch.sqrt(value) if isinstance(value, torch.Tensor) else math.sqrt(value) if value >= 0 else math.nan
    if isinstance(e, BinOp):
        a, b = _naive(e.a, env, coefs), _naive(e.b, env, coefs)
        if e.op == "+":
            return a + b
        if e.op == "-":
            return a - b
        return a * b if e.op == "*" else a / b
    raise TypeError(e)


#: one pool for every example: what a run gave back, the next one borrows
SCRATCH = Scratch()


def _declarations(preset: str, wd: float):
    composition = kalmanopt.get_preset(preset).build()
    hp = {name: spec.default for name, spec in composition.hyperparameters().items()}
    hp.update(weight_decay=wd, guard=True)
    plan = update_plan(composition, hp)
    return plan, predict_plan(composition, hp)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "out-of-place"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("preset", CONTRACT_PRESETS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40))
def test_program_equals_the_plain_formulas_for_every_preset_and_out_of_place_leaves_its_inputs(preset, wd,
                                                                                              in_place, seed, n):
    plan, pred = _declarations(preset, wd)
    gen = torch.Generator().manual_seed(seed)
    for program, outputs, extra in ((plan.full_program, plan.outputs, plan.reductions),
                                    (pred.program, pred.outputs, pred.reductions)):
        exprs = [a.expr for a in program] + [r.expr for r in extra]
        env = {v.key: torch.randn(n, generator=gen, dtype=DT) for v in vectors_read(exprs) if v.key != "H"}
        env.setdefault("theta", torch.randn(n, generator=gen, dtype=DT))
        env.setdefault("g", torch.randn(n, generator=gen, dtype=DT))
        coefs = {name: float(torch.randn((), generator=gen, dtype=DT)) for name in coefficients_read(exprs)}
        coefs["weight_decay"] = wd
        # the plain way: sequential, out of place
        want = {k: v.clone() for k, v in env.items()}
        for a in program:
            want[a.target.key] = _naive(a.expr, want, coefs)
        got = {k: v.clone() for k, v in env.items()}
        before = dict(got)
        prepare_program(program, outputs).run(got, coefs, in_place=in_place)
        for key in outputs:  # (random coefficients can make a square root NaN: NaN on both sides)
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, equal_nan=True)
        if in_place:  # and with borrowed temporaries, from a pool that served a longer layer before
            prepared = prepare_program(program, outputs)
            for length in (n + 7, n):
                borrowed = {k: torch.randn(length, generator=gen, dtype=DT) for k in env} if length != n else \
                    {k: v.clone() for k, v in env.items()}
                prepared.run(borrowed, coefs, scratch=SCRATCH)
                prepared.release(borrowed, SCRATCH)
            assert not {a.target.key for a in program} - set(outputs) & set(borrowed)  # (temporaries unbound)
            for key in outputs:
                torch.testing.assert_close(borrowed[key], want[key], rtol=1e-12, atol=1e-12, equal_nan=True)
        if not in_place:  # every tensor the program was given still holds what it held
            for key, tensor in before.items():
                torch.testing.assert_close(tensor, env[key], rtol=0, atol=0, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 30))
def test_reductions_equal_the_plain_sums(seed, n):
    gen = torch.Generator().manual_seed(seed)
    env = {k: torch.randn(n, generator=gen, dtype=DT) for k in ("a", "b", "c")}
    a, b, c = Vec("a"), Vec("b"), Vec("c")
    reductions = (Reduction("ab", a * b), Reduction("abc", a * b * c), Reduction("d", (a - b) * (a - b)),
                  Reduction("bad", a * 0.0), Reduction("clamped", (a * 2.0).clamp_min(0.0)),
                  Reduction("root", (a * a + 1.0).sqrt() * b))
    got = reduce_layer(reductions, env, {}, torch.zeros((), dtype=DT))
    borrowing = reduce_layer(reductions, env, {}, torch.zeros((), dtype=DT), SCRATCH)
    x, y, z = env["a"], env["b"], env["c"]
    want = [(x * y).sum(), (x * y * z).sum(), ((x - y) ** 2).sum(), (x * 0.0).sum(), (2 * x).clamp_min(0).sum(),
            (torch.sqrt(x * x + 1) * y).sum()]
    for g, b, w in zip(got, borrowing, want):
        torch.testing.assert_close(g, w.to(g), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, w.to(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_gradient_check_is_nan_exactly_when_an_entry_is_not_finite(bad):
    x = torch.tensor([1e30, -2.0, 3.0], dtype=torch.float32)
    check = (Reduction("bad", Vec("x") * 0.0),)
    assert float(reduce_layer(check, {"x": x}, {}, x)[0]) == 0.0  # large but finite: no false alarm
    x[1] = bad
    assert math.isnan(float(reduce_layer(check, {"x": x}, {}, x)[0]))


def test_an_aliased_right_hand_side_is_read_before_it_is_written():
    x = torch.tensor([1.0, 2.0], dtype=DT)
    env = {"state.x": x, "state.y": x}  # two names, one tensor
    prepare_program([Assign(State("x"), 2.0 * State("x") + 3.0 * State("y"))], ["state.x"]).run(env, {})
    torch.testing.assert_close(x, torch.tensor([5.0, 10.0], dtype=DT))


@pytest.mark.parametrize("borrow", [False, True], ids=["allocating", "borrowing"])
def test_an_output_written_in_place_may_read_itself_anywhere_in_its_expression(borrow):
    # (a sum of scaled terms is updated term by term, any other output written straight into its tensor:
    # both must read the old values of the output, and of any other name for the same tensor)
    x0, y0 = torch.tensor([1.0, -2.0, 0.5], dtype=DT), torch.tensor([3.0, 0.25, -1.0], dtype=DT)
    scratch = Scratch() if borrow else None
    X, Y, Z = State("x"), State("y"), State("z")
    cases = [(2.0 * X + 3.0 * (Y * X), 2 * x0 + 3 * y0 * x0), (X - 0.5 * (X / Y), x0 - 0.5 * x0 / y0),
             (Y * (X * Y) + X * X, y0 * x0 * y0 + x0 * x0), ((X * Y).sqrt() * X, (x0 * y0).sqrt() * x0),
             (3.0 * (Y * Z) - 1.0 * (Z * Y), 2 * y0 * x0), (Const(1.0) - X / Y, 1.0 - x0 / y0),
             (Const(2.0) / X, 2.0 / x0),
             (0.5 * Y + 2.0 * (Z * Y), 0.5 * y0 + 2.0 * x0 * y0)]
    for expr, want in cases:
        x = x0.clone()
        env = {"state.x": x, "state.y": y0.clone(), "state.z": x}  # z: another name for x
        program = prepare_program([Assign(State("x"), expr)], ["state.x"])
        program.run(env, {}, scratch=scratch)
        torch.testing.assert_close(x, want, rtol=1e-15, atol=1e-15, equal_nan=True, msg=str(expr))


def test_a_scratch_pool_lends_each_buffer_once_and_keeps_no_more_than_it_lent_at_once():
    pool = Scratch()
    a, b = pool.take((4,), DT, torch.device("cpu")), pool.take((2, 3), DT, torch.device("cpu"))
    assert a.shape == (4,) and b.shape == (2, 3) and a.data_ptr() != b.data_ptr()
    a.fill_(1.0), b.fill_(2.0)
    assert torch.all(a == 1.0) and pool.lent(a) and not pool.lent(torch.zeros(4))
    pool.give(a), pool.give(b)
    held = pool.nbytes
    for _ in range(3):  # the same sizes again: the same memory, nothing new
        c, d = pool.take((5,), DT, torch.device("cpu")), pool.take((3,), DT, torch.device("cpu"))
        pool.give(c), pool.give(d)
    assert pool.nbytes == held
    big = pool.take((100,), DT, torch.device("cpu"))  # larger than any: one buffer grows, the count stays
    pool.give(big)
    assert pool.nbytes == (100 + 4) * 8
    pool.clear()
    assert pool.nbytes == 0


def test_bad_programs_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="'g' is the gradient"):
        Assign(Vec("g"), Vec("H"))
    with pytest.raises(TypeError, match="combines expressions and numbers"):
        Vec("a") * "2"
    with pytest.raises(TypeError, match="target of an assignment"):
        Assign("theta", Vec("g"))  # type: ignore[arg-type]


def test_a_riding_predict_that_reads_a_computed_coefficient_is_refused_with_the_column_it_reads():
    """A dynamics that declares ``predict_rides_on_update`` while its predict program reads a column of
    ``predict_coefficients`` (computed from the predict's own reductions) would be run with a value that
    does not exist yet: the composition does not meet the contract, and the message names the column."""
    from kalmanopt.dynamics import Momentum

    class Reckless(Momentum):
        def predict_coefficients(self, b):
            super().predict_coefficients(b)
            b.coef["pull"] = b.red["dist2"] * 0.0

        def predict_program(self, hp):
            return [Assign(Vec("theta"), Vec("theta") + Coef("pull") * State("u"))]

    composition = dataclasses.replace(kalmanopt.get_preset("koala-m").build(), dynamics=Reckless())
    gap = kalmanopt.plan.contract_gap(composition)
    assert gap is not None and "predict_rides_on_update" in gap and "'pull'" in gap
    with pytest.raises(ValueError, match="'pull'"):
        kalmanopt.KalmanOptimizer(torch.nn.Linear(2, 1).parameters(), composition, implementation="foreach")
    honest = Reckless()
    honest.predict_rides_on_update = False  # (an honest declaration meets it)
    assert kalmanopt.plan.contract_gap(dataclasses.replace(composition, dynamics=honest)) is None
