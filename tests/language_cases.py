"""Programs of the element-wise language's operations, run through an optimizer's step, and the same formulas
in torch (tests/test_language.py on the reference and foreach engines; tests/test_fast_gpu.py on the fused
engine, on a GPU or in Triton's interpreter).

A form is written once, as a function of an ``ops`` namespace and its operands: with :data:`PROGRAM` it
builds the expression a part declares (``x``, ``y`` its state vectors, ``k`` a per-layer coefficient column,
``c`` a hyper-parameter read as a coefficient), with :data:`TORCH` it computes the value the plain way, by
torch's own functions on tensors. The probe part runs the diagonal surrogate and, in its program, writes the
form's value into a state vector ``out``, which a test compares with the torch value.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch

import kalmanopt
from kalmanopt.program import Assign, Coef, State, maximum, minimum, where
from kalmanopt.state import StateTable, VectorState

INF, NAN = math.inf, math.nan


def _tensors(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands as tensors (a number in the other's dtype)."""
    like = a if isinstance(a, torch.Tensor) else b
    return (a if isinstance(a, torch.Tensor) else torch.full((), float(a), dtype=like.dtype),
            b if isinstance(b, torch.Tensor) else torch.full((), float(b), dtype=like.dtype))


def _where(cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a = torch.full((), float(a), dtype=torch.float64)
    return torch.where(cond, *_tensors(a, b))


#: the operations as the language spells them
PROGRAM = SimpleNamespace(sign=lambda x: x.sign(), pow=lambda x, e: x.pow(e), minimum=minimum, maximum=maximum,
                          where=where)
#: the same, as torch computes them (sign: NaN where x is NaN, the language's one departure from torch.sign;
#: and pow with a tensor exponent: C's pow, where torch takes a square root for the number 0.5)
TORCH = SimpleNamespace(sign=lambda x: torch.where(torch.isnan(x), x, torch.sign(x)),
                        pow=lambda x, e: torch.pow(*_tensors(x, e)),
                        minimum=lambda a, b: torch.minimum(*_tensors(a, b)),
                        maximum=lambda a, b: torch.maximum(*_tensors(a, b)), where=_where)

Form = Callable[[SimpleNamespace, Any, Any, Any, Any], Any]

#: each operation (and the older clamp_min and sqrt) in the shapes an engine evaluates differently: of vectors,
#: of a vector and a scalar, of a temporary (evaluated in place), of scalars alone (a coefficient expression)
FORMS: dict[str, list[tuple[str, Form]]] = {
    "abs": [("abs(x)", lambda o, x, y, k, c: abs(x)),
            ("abs(x - y)", lambda o, x, y, k, c: abs(x - y)),
            ("x + abs(k)", lambda o, x, y, k, c: x + abs(k))],
    "sign": [("sign(x)", lambda o, x, y, k, c: o.sign(x)),
             ("sign(x * y)", lambda o, x, y, k, c: o.sign(x * y)),
             ("x - sign(k)", lambda o, x, y, k, c: x - o.sign(k))],
    "exp": [("exp(x)", lambda o, x, y, k, c: x.exp()),
            ("exp(x - y)", lambda o, x, y, k, c: (x - y).exp()),
            ("x + exp(k) / exp(c)", lambda o, x, y, k, c: x + k.exp() / c.exp())],
    "log": [("log(x)", lambda o, x, y, k, c: x.log()),
            ("log(x * y)", lambda o, x, y, k, c: (x * y).log()),
            ("x + log(k) - log(c)", lambda o, x, y, k, c: x + k.log() - c.log())],
    "pow": [("x ** y", lambda o, x, y, k, c: x ** y),
            ("x ** 2", lambda o, x, y, k, c: x ** 2.0),
            ("x ** 0.5", lambda o, x, y, k, c: o.pow(x, 0.5)),
            ("x ** -0.5", lambda o, x, y, k, c: o.pow(x, -0.5)),
            ("2 ** x", lambda o, x, y, k, c: 2.0 ** x),
            ("(x - y) ** (y + x)", lambda o, x, y, k, c: (x - y) ** (y + x)),
            ("x ** k", lambda o, x, y, k, c: x ** k),
            ("k ** x", lambda o, x, y, k, c: k ** x),
            ("x + k ** c", lambda o, x, y, k, c: x + k ** c)],
    "minimum": [("minimum(x, y)", lambda o, x, y, k, c: o.minimum(x, y)),
                ("minimum(x, k)", lambda o, x, y, k, c: o.minimum(x, k)),
                ("minimum(c, x)", lambda o, x, y, k, c: o.minimum(c, x)),
                ("minimum(x * 2, y + 1)", lambda o, x, y, k, c: o.minimum(x * 2.0, y + 1.0)),
                ("minimum(x, 0.5)", lambda o, x, y, k, c: o.minimum(x, 0.5)),
                ("x - minimum(k, c)", lambda o, x, y, k, c: x - o.minimum(k, c))],
    "maximum": [("maximum(x, y)", lambda o, x, y, k, c: o.maximum(x, y)),
                ("maximum(x, k)", lambda o, x, y, k, c: o.maximum(x, k)),
                ("maximum(c, x)", lambda o, x, y, k, c: o.maximum(c, x)),
                ("maximum(x * 2, y + 1)", lambda o, x, y, k, c: o.maximum(x * 2.0, y + 1.0)),
                ("maximum(x, -0.5)", lambda o, x, y, k, c: o.maximum(x, -0.5)),
                ("x - maximum(k, c)", lambda o, x, y, k, c: x - o.maximum(k, c))],
    "clamp_min": [("clamp_min(x, 0)", lambda o, x, y, k, c: x.clamp_min(0.0)),
                  ("clamp_min(x - y, -1)", lambda o, x, y, k, c: (x - y).clamp_min(-1.0))],
    "sqrt": [("sqrt(x)", lambda o, x, y, k, c: x.sqrt()),
             ("sqrt(x * y)", lambda o, x, y, k, c: (x * y).sqrt())],
    "where": [("where(x < y, x, y)", lambda o, x, y, k, c: o.where(x < y, x, y)),
              ("where(x <= 0, 0, x)", lambda o, x, y, k, c: o.where(x <= 0.0, 0.0, x)),
              ("where(x > k, 1, -1)", lambda o, x, y, k, c: o.where(x > k, 1.0, -1.0)),
              ("where(k >= c, x, y)", lambda o, x, y, k, c: o.where(k >= c, x, y)),
              ("where(x >= y, k, c)", lambda o, x, y, k, c: o.where(x >= y, k, c)),
              ("where(0 < x, x * y, y - x)", lambda o, x, y, k, c: o.where(0.0 < x, x * y, y - x)),
              ("x + where(k < 0, 1, c)", lambda o, x, y, k, c: x + o.where(k < 0.0, 1.0, c))],
}

# (a scalar enters the forms by addition: the torch engines read ``scalar * vector`` as a linear term and drop
# it where the scalar is 0, also where the vector holds ±inf or NaN, which 0 · inf would make NaN)

#: every form, as pytest parameters: (operation, form's name, form)
ALL_FORMS = [(op, name, form) for op, forms in FORMS.items() for name, form in forms]

#: the special values the vectors' entries are drawn from besides ordinary numbers
SPECIAL = (0.0, -0.0, 1.0, -1.0, 2.0, -2.5, 0.5, INF, -INF, NAN)
#: the scalars' values (hyper-parameters are finite; 800: exp overflows)
SCALARS = (0.0, -0.0, 1.0, -1.0, 2.0, 3.0, -2.5, 0.5, 1.5, 800.0, -800.0)


class Probe(kalmanopt.DiagonalSurrogate):
    """The diagonal surrogate, whose program also writes ``out = expr`` (``x``, ``y`` state vectors; ``k``
    a coefficient column, ``c`` a hyper-parameter; both set by ``probe_k`` and ``probe_c``)."""

    hyperparameters = kalmanopt.DiagonalSurrogate.hyperparameters + (
        kalmanopt.HyperParameter("probe_k", 0.0, kalmanopt.Range(), "the coefficient column probe_kt"),
        kalmanopt.HyperParameter("probe_c", 0.0, kalmanopt.Range(), "a hyper-parameter the program reads"),
    )

    def __init__(self, expr: Any) -> None:
        self.expr = expr

    def options(self) -> dict[str, object]:
        return {"expr": self.expr}

    def state_table(self) -> StateTable:
        base = super().state_table()
        return StateTable(vectors=base.vectors + (VectorState("x"), VectorState("y"), VectorState("out")))

    def coefficients(self, b: Any) -> None:
        super().coefficients(b)
        b.coef["probe_kt"] = torch.full_like(b.S, float(b.hp["probe_k"]))

    def program(self, hp: Any) -> list[Assign]:
        return super().program(hp) + [Assign(State("out"), self.expr)]


def probe_composition(form: Form) -> kalmanopt.Composition:
    """The diagonal filter with the probe writing ``form``'s value."""
    expr = form(PROGRAM, State("x"), State("y"), Coef("probe_kt"), Coef("probe_c"))
    return kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(), Probe(expr), name="probe")


def run_probe(composition: kalmanopt.Composition, implementation: str, xs: list[torch.Tensor],
              ys: list[torch.Tensor], k: float, c: float, device: str = "cpu") -> list[torch.Tensor]:
    """Each parameter's ``out`` after a step from state vectors ``x`` and ``y`` (one tensor per parameter, in
    the tensors' dtype): the first step creates the state, the second runs the program on the values."""
    dtype = xs[0].dtype
    params = [torch.nn.Parameter(torch.linspace(-1.0, 1.0, x.numel(), dtype=dtype, device=device)) for x in xs]
    opt = kalmanopt.KalmanOptimizer(params, composition, implementation=implementation, sigma=0.1, q=0.01, lr=0.1,
                                    r=1.0, probe_k=k, probe_c=c)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        for p in params:
            p.grad = (torch.rand(p.shape, generator=gen, dtype=dtype) + 0.5).to(device)
        if step == 1:
            for p, x, y in zip(params, xs, ys):
                opt.state[p]["x"].copy_(x)
                opt.state[p]["y"].copy_(y)
                opt.state[p]["out"].fill_(12345.0)  # (what a skipped layer would keep)
        opt.step(loss=torch.full((4,), 1.0, dtype=dtype, device=device))
    return [opt.state[p]["out"].detach().cpu() for p in params]


def expected(form: Form, x: torch.Tensor, y: torch.Tensor, k: float, c: float) -> torch.Tensor:
    """``form``'s value by torch (the scalars as 0-d tensors of the vectors' dtype)."""
    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=x.dtype)

    value = form(TORCH, x, y, scalar(k), scalar(c))
    return torch.as_tensor(value, dtype=x.dtype).expand(x.shape)
