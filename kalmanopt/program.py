"""Element-wise programs: what a part does to its vectors, written once, run by every engine.

A two-pass step (see :mod:`kalmanopt.contract`) ends with one element-wise pass over each
layer's vectors. A part writes that pass as a short program of assignments over named vectors
and per-layer scalar coefficients::

    v, H_prev, H = State("v"), State("H"), Vec("H")
    program = [Assign(v, Coef("a") * v + Coef("b") * H + Coef("c") * H_prev),   # v_k = a v + b H + c H_prev
               Assign(H_prev, H)]                                              # store H_k

Vectors are the measurement's (``theta``, ``g``, ``H``), a part's state vectors (:class:`State`),
or temporaries defined earlier in the program. Scalars are per-layer coefficients (:class:`Coef`,
columns the part's batched coefficient function produces) and constants. Expressions combine them
with

- arithmetic: ``+``, ``-``, ``*``, ``/`` and ``**`` (:meth:`Expr.pow`: the exponent a number or an expression);
- functions: :meth:`Expr.abs` (``abs(x)``), :meth:`Expr.sign`, :meth:`Expr.exp`, :meth:`Expr.log`,
  :meth:`Expr.sqrt` and :meth:`Expr.clamp_min`; :func:`minimum` and :func:`maximum` of two expressions;
- a choice: :func:`where` ``(cond, a, b)``, ``cond`` a comparison ``<``, ``<=``, ``>`` or ``>=`` of two
  expressions (``==`` stays Python's structural equality of expressions, which the engines rely on)::

      step = where(abs(H) > Coef("clip"), Coef("clip") * H.sign(), H)   # H clipped at ±clip

Each has torch's semantics on every engine, NaN and ±inf included (``log(0) = -inf``, ``log(x < 0) = NaN``,
``x ** y`` as :func:`torch.pow` of two tensors; :func:`minimum` and :func:`maximum` propagate NaN as
:func:`torch.minimum` does), with one exception: :meth:`Expr.sign` is NaN where its argument is
(:func:`torch.sign` gives 0 there), so that a NaN cannot vanish inside a sign.

The same program is evaluated by torch operations (the reference and multi-tensor engines,
:func:`prepare_program`) and turned into Triton source (the fused engine): a part is fast without
touching an engine. Sums over a layer (:class:`Reduction`) use the same expressions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from kalmanopt.scratch import Scratch

__all__ = ["Expr", "Vec", "State", "Coef", "Const", "Compare", "Assign", "Reduction", "minimum", "maximum", "where",
           "PreparedProgram", "prepare_program", "evaluate_vector", "vectors_read", "coefficients_read", "is_vector",
           "MEASUREMENT_VECTORS", "hp_coefficients"]

#: the vectors the engine provides to every program: θ (the parameters), g (the gradient), H (g + wd θ)
MEASUREMENT_VECTORS = ("theta", "g", "H")

Number = Union[int, float]


def _as_expr(value: Expr | Number) -> Expr:
    """``value`` as an expression: an expression itself, a number as a :class:`Const`."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"an element-wise expression combines expressions and numbers, got {type(value).__name__}")
    return Const(float(value))


class Expr:
    """A node of an element-wise expression (build with operators, not by hand).

    ``==`` is the structural equality of two expressions (engines hash and compare declarations with it);
    the other comparisons, ``<``, ``<=``, ``>`` and ``>=``, build a :class:`Compare`, the condition of
    :func:`where`.
    """

    def _wrap(self, other: Expr | Number) -> Expr:
        return _as_expr(other)

    def __add__(self, other: Expr | Number) -> Expr:
        return BinOp("+", self, self._wrap(other))

    def __radd__(self, other: Number) -> Expr:
        return BinOp("+", self._wrap(other), self)

    def __sub__(self, other: Expr | Number) -> Expr:
        return BinOp("-", self, self._wrap(other))

    def __rsub__(self, other: Number) -> Expr:
        return BinOp("-", self._wrap(other), self)

    def __mul__(self, other: Expr | Number) -> Expr:
        return BinOp("*", self, self._wrap(other))

    def __rmul__(self, other: Number) -> Expr:
        return BinOp("*", self._wrap(other), self)

    def __truediv__(self, other: Expr | Number) -> Expr:
        return BinOp("/", self, self._wrap(other))

    def __neg__(self) -> Expr:
        return BinOp("*", Const(-1.0), self)

    def clamp_min(self, low: float) -> Expr:
        """max(self, low), element-wise."""
        return ClampMin(self, float(low))

    def sqrt(self) -> Expr:
        """√self, element-wise (correctly rounded on every engine; NaN below 0, as torch.sqrt)."""
        return Sqrt(self)

    def abs(self) -> Expr:
        """The absolute value of self, element-wise (also ``abs(x)``)."""
        return Unary("abs", self)

    def __abs__(self) -> Expr:
        return Unary("abs", self)

    def sign(self) -> Expr:
        """-1, 0 or 1 as self is negative, zero or positive, element-wise; NaN where self is NaN (torch.sign
        gives 0 there: here a NaN stays visible to the step's checks)."""
        return Unary("sign", self)

    def exp(self) -> Expr:
        """e ** self, element-wise (as torch.exp: inf past the float's range, 0 at -inf)."""
        return Unary("exp", self)

    def log(self) -> Expr:
        """The natural logarithm of self, element-wise (as torch.log: -inf at 0, NaN below 0)."""
        return Unary("log", self)

    def pow(self, exponent: Expr | Number) -> Expr:
        """self ** exponent, element-wise, the exponent a number or an expression (also ``x ** y``); as
        torch.pow of two tensors (C's pow): NaN for a negative base and a non-integer exponent, ``x ** 0 = 1``
        and ``1 ** y = 1`` even for NaN, inf where it overflows. (A tensor to the number ±0.5 is a square root
        in torch, -0 and NaN at -0 and -inf; here it is pow there too: +0 and +inf.)"""
        return Pow(self, _as_expr(exponent))

    def __pow__(self, other: Expr | Number) -> Expr:
        return Pow(self, _as_expr(other))

    def __rpow__(self, other: Number) -> Expr:
        return Pow(_as_expr(other), self)

    def __lt__(self, other: Expr | Number) -> Compare:
        return Compare("<", self, _as_expr(other))

    def __le__(self, other: Expr | Number) -> Compare:
        return Compare("<=", self, _as_expr(other))

    def __gt__(self, other: Expr | Number) -> Compare:
        return Compare(">", self, _as_expr(other))

    def __ge__(self, other: Expr | Number) -> Compare:
        return Compare(">=", self, _as_expr(other))


def minimum(a: Expr | Number, b: Expr | Number) -> Expr:
    """min(a, b), element-wise; NaN where either is NaN (as torch.minimum)."""
    return Extremum("minimum", _as_expr(a), _as_expr(b))


def maximum(a: Expr | Number, b: Expr | Number) -> Expr:
    """max(a, b), element-wise; NaN where either is NaN (as torch.maximum)."""
    return Extremum("maximum", _as_expr(a), _as_expr(b))


def where(cond: Compare, a: Expr | Number, b: Expr | Number) -> Expr:
    """``a`` where ``cond`` holds, else ``b``, element-wise (as torch.where); ``cond`` is a comparison of
    expressions, ``x < y``, ``x <= y``, ``x > y`` or ``x >= y`` (false where either side is NaN)."""
    if not isinstance(cond, Compare):
        raise TypeError(f"the condition of where() is a comparison of expressions (x < y, x >= y, ...), "
                        f"got {type(cond).__name__}")
    return Where(cond, _as_expr(a), _as_expr(b))


@dataclass(frozen=True, eq=True)
class Vec(Expr):
    """A vector of the layer's size: ``theta``, ``g``, ``H``, or a temporary of the program."""

    name: str

    @property
    def key(self) -> str:
        """The name under which engines hold the vector."""
        return self.name

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class State(Vec):
    """A per-layer state vector declared in a part's state table (read and written in place)."""

    @property
    def key(self) -> str:
        return f"state.{self.name}"

    def __repr__(self) -> str:
        return f"state[{self.name!r}]"


@dataclass(frozen=True, eq=True)
class Coef(Expr):
    """A per-layer scalar: one column of the coefficient table the part's batched function fills."""

    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class Const(Expr):
    """A constant."""

    value: float

    def __repr__(self) -> str:
        return repr(self.value)


def _check_values(node: Expr, *operands: Expr) -> None:
    """Refuse a comparison where a value is expected (a comparison is only the condition of ``where``)."""
    for operand in operands:
        if isinstance(operand, Compare):
            raise TypeError(f"{operand!r} is a condition, not a value: use it as where(cond, a, b)'s condition "
                            f"(in {type(node).__name__})")
        if not isinstance(operand, Expr):
            raise TypeError(f"an operand of {type(node).__name__} is an expression, got {type(operand).__name__}")


@dataclass(frozen=True, eq=True)
class BinOp(Expr):
    """``a op b`` for op in + - * /."""

    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        _check_values(self, self.a, self.b)

    def __repr__(self) -> str:
        return f"({self.a!r} {self.op} {self.b!r})"


@dataclass(frozen=True, eq=True)
class ClampMin(Expr):
    """max(a, low)."""

    a: Expr
    low: float

    def __post_init__(self) -> None:
        _check_values(self, self.a)

    def __repr__(self) -> str:
        return f"max({self.a!r}, {self.low!r})"


@dataclass(frozen=True, eq=True)
class Sqrt(Expr):
    """√a."""

    a: Expr

    def __post_init__(self) -> None:
        _check_values(self, self.a)

    def __repr__(self) -> str:
        return f"sqrt({self.a!r})"


#: the element-wise functions of one argument (:class:`Unary`)
UNARY_OPS = ("abs", "sign", "exp", "log")


@dataclass(frozen=True, eq=True)
class Unary(Expr):
    """``op(a)`` for op in abs, sign, exp, log."""

    op: str
    a: Expr

    def __post_init__(self) -> None:
        if self.op not in UNARY_OPS:
            raise ValueError(f"unknown element-wise function {self.op!r}; there are {', '.join(UNARY_OPS)}")
        _check_values(self, self.a)

    def __repr__(self) -> str:
        return f"{self.op}({self.a!r})"


@dataclass(frozen=True, eq=True)
class Pow(Expr):
    """``a ** b``."""

    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        _check_values(self, self.a, self.b)

    def __repr__(self) -> str:
        return f"({self.a!r} ** {self.b!r})"


@dataclass(frozen=True, eq=True)
class Extremum(Expr):
    """``minimum(a, b)`` or ``maximum(a, b)`` (NaN where either is NaN)."""

    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if self.op not in ("minimum", "maximum"):
            raise ValueError(f"an extremum is 'minimum' or 'maximum', got {self.op!r}")
        _check_values(self, self.a, self.b)

    def __repr__(self) -> str:
        return f"{self.op}({self.a!r}, {self.b!r})"


#: the comparisons a condition makes (:class:`Compare`)
COMPARISONS = ("<", "<=", ">", ">=")


@dataclass(frozen=True, eq=True)
class Compare(Expr):
    """``a op b`` for op in < <= > >=: the condition of :func:`where`, not a value (false where either
    side is NaN)."""

    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if self.op not in COMPARISONS:
            raise ValueError(f"a comparison is one of {' '.join(COMPARISONS)}, got {self.op!r}")
        _check_values(self, self.a, self.b)

    def __bool__(self) -> bool:
        raise TypeError(f"{self!r} compares two element-wise expressions: it has no truth value in Python "
                        "(use it as where(cond, a, b)'s condition)")

    def __repr__(self) -> str:
        return f"({self.a!r} {self.op} {self.b!r})"


@dataclass(frozen=True, eq=True)
class Where(Expr):
    """``where(cond, a, b)``: ``a`` where the comparison ``cond`` holds, else ``b``."""

    cond: Compare
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        if not isinstance(self.cond, Compare):
            raise TypeError(f"the condition of where() is a comparison, got {type(self.cond).__name__}")
        _check_values(self, self.a, self.b)

    def __repr__(self) -> str:
        cond = self.cond
        return f"where({cond.a!r} {cond.op} {cond.b!r}, {self.a!r}, {self.b!r})"


@dataclass(frozen=True)
class Assign:
    """``target ← expr``: a state vector or ``theta`` is written back; any other name is a temporary."""

    target: Vec
    expr: Expr

    def __post_init__(self) -> None:
        if not isinstance(self.target, Vec):
            raise TypeError(f"the target of an assignment is a Vec or State, got {type(self.target).__name__}")
        if isinstance(self.expr, (int, float)):
            object.__setattr__(self, "expr", Const(float(self.expr)))
        if not isinstance(self.expr, Expr):
            raise TypeError(f"the value of an assignment is an expression, got {type(self.expr).__name__}")
        if isinstance(self.expr, Compare):
            raise TypeError(f"the value of an assignment is a value, got the condition {self.expr!r} "
                            "(use it as where(cond, a, b)'s condition)")
        if self.target.name == "g" and not isinstance(self.target, State):
            raise ValueError("'g' is the gradient; a program cannot assign it")


@dataclass(frozen=True)
class Reduction:
    """A per-layer sum Σ_i expr_i over the layer's elements (a dot product, a squared norm)."""

    name: str
    expr: Expr

    def __post_init__(self) -> None:
        if isinstance(self.expr, Compare):
            raise TypeError(f"reduction {self.name!r} sums a value, got the condition {self.expr!r} (use it as "
                            "where(cond, a, b)'s condition: where(cond, 1.0, 0.0) counts)")
        if not isinstance(self.expr, Expr):
            raise TypeError(f"reduction {self.name!r} sums an expression, got {type(self.expr).__name__}")


def _children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, (BinOp, Pow, Extremum, Compare)):
        return (e.a, e.b)
    if isinstance(e, (ClampMin, Sqrt, Unary)):
        return (e.a,)
    if isinstance(e, Where):
        return (e.cond, e.a, e.b)
    return ()


def _walk(e: Expr) -> Iterable[Expr]:
    yield e
    for c in _children(e):
        yield from _walk(c)


def is_vector(e: Expr) -> bool:
    """Whether ``e`` has the layer's size (it reads a vector) rather than being a scalar.

    Kept on the (immutable) node once known: the torch evaluation asks it of every node of every expression at
    every step, and a walk each time costs a step of a small model about as much as its arithmetic."""
    known = e.__dict__.get("_reads_vector")
    if known is None:
        known = isinstance(e, Vec) or any(is_vector(c) for c in _children(e))
        object.__setattr__(e, "_reads_vector", known)
    return known


def vectors_read(exprs: Iterable[Expr]) -> list[Vec]:
    """The vectors the expressions read, in first-use order."""
    seen: dict[str, Vec] = {}
    for e in exprs:
        for n in _walk(e):
            if isinstance(n, Vec):
                seen.setdefault(n.key, n)
    return list(seen.values())


def coefficients_read(exprs: Iterable[Expr]) -> list[str]:
    """The coefficient columns the expressions read, in first-use order."""
    seen: dict[str, None] = {}
    for e in exprs:
        for n in _walk(e):
            if isinstance(n, Coef):
                seen.setdefault(n.name)
    return list(seen)


# ---------------------------------------------------------------------------------------- torch
Scalar = Union[float, Tensor]


def _scalar(e: Expr, coefs: Mapping[str, Scalar]) -> Scalar:
    """Evaluate a scalar expression (floats on the CPU, 0-d tensors elsewhere)."""
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Coef):
        return coefs[e.name]
    if isinstance(e, BinOp):
        a, b = _scalar(e.a, coefs), _scalar(e.b, coefs)
        return _OPS[e.op](a, b)
    if isinstance(e, ClampMin):
        a = _scalar(e.a, coefs)
        return max(a, e.low) if isinstance(a, float) else a.clamp_min(e.low)
    if isinstance(e, Sqrt):
        a = _scalar(e.a, coefs)
        return (math.sqrt(a) if a >= 0.0 else math.nan) if isinstance(a, float) else a.sqrt()
    if isinstance(e, Unary):
        a = _scalar(e.a, coefs)
        return _UNARY_FLOAT[e.op](a) if isinstance(a, float) else _unary_tensor(e.op, a, fresh=False)
    if isinstance(e, Pow):
        a, b = _scalar(e.a, coefs), _scalar(e.b, coefs)
        if isinstance(a, float) and isinstance(b, float):
            return _pow_float(a, b)
        return torch.pow(a, _exponent(b, a) if isinstance(a, Tensor) else b)
    if isinstance(e, Extremum):
        a, b = _scalar(e.a, coefs), _scalar(e.b, coefs)
        if isinstance(a, float) and isinstance(b, float):
            return math.nan if math.isnan(a) or math.isnan(b) else (min(a, b) if e.op == "minimum" else max(a, b))
        return _extremum(e.op, a, b, False, False)
    if isinstance(e, Compare):
        return _COMPARE[e.op](_scalar(e.a, coefs), _scalar(e.b, coefs))
    if isinstance(e, Where):
        x, y = _scalar(e.cond.a, coefs), _scalar(e.cond.b, coefs)
        cond = _COMPARE[e.cond.op](x, y)
        a, b = _scalar(e.a, coefs), _scalar(e.b, coefs)
        if not isinstance(cond, Tensor):
            return a if cond else b
        return _where(cond, a, False, b, False, x if isinstance(x, Tensor) else y)
    raise TypeError(f"not a scalar expression: {e!r}")


def _divide(a: Scalar, b: Scalar) -> Scalar:
    """a / b; two floats as IEEE (and torch) divide them: ±inf or NaN by zero, where Python raises."""
    if isinstance(a, float) and isinstance(b, float) and b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


_OPS: dict[str, Callable] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                             "/": _divide}

_COMPARE: dict[str, Callable] = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _sign_float(x: float) -> float:
    if math.isnan(x):
        return x
    return 1.0 if x > 0.0 else -1.0 if x < 0.0 else 0.0


def _exp_float(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _log_float(x: float) -> float:
    if x > 0.0:
        return math.log(x)
    return -math.inf if x == 0.0 else math.nan  # (NaN stays NaN)


#: the functions of :class:`Unary` on floats, as torch's on a float64 tensor (where Python's math raises, the
#: IEEE value: log(0) = -inf, log(x < 0) = NaN, exp overflows to inf)
_UNARY_FLOAT: dict[str, Callable[[float], float]] = {"abs": abs, "sign": _sign_float, "exp": _exp_float,
                                                      "log": _log_float}


def _pow_float(a: float, b: float) -> float:
    """a ** b as torch.pow (C's pow): where Python's math.pow raises (a negative base to a fractional power,
    zero to a negative one, an overflow), the value C gives, from torch."""
    try:
        return math.pow(a, b)
    except (ValueError, OverflowError, ZeroDivisionError):
        return float(torch.pow(torch.tensor(a, dtype=torch.float64), b))


def _exponent(b: Scalar, base: Tensor) -> Scalar:
    """The exponent of ``base ** b`` as torch.pow takes it with C's pow semantics: torch computes a tensor to the
    number ±0.5 as a square root (its reciprocal), whose values at -0 and -inf differ from pow's (-0 and NaN
    for +0 and +inf); a tensor exponent takes pow's, as the fused engine does."""
    if isinstance(b, float) and abs(b) == 0.5:
        return torch.full((), b, dtype=base.dtype, device=base.device)
    return b


def _unary_tensor(op: str, a: Tensor, fresh: bool) -> Tensor:
    """``op(a)``, in place where ``a`` is a temporary (``fresh``)."""
    if op == "sign":  # NaN where a is NaN (torch.sign gives 0)
        nan = torch.isnan(a)
        return (a.sign_() if fresh else a.sign()).masked_fill_(nan, math.nan)
    return getattr(a, f"{op}_")() if fresh else getattr(torch, op)(a)


def _extremum(op: str, a: Scalar, b: Scalar, fresh_a: bool, fresh_b: bool) -> Tensor:
    """minimum(a, b) or maximum(a, b) (NaN where either is NaN), at least one a tensor; into a temporary
    where one fits."""
    if not isinstance(b, Tensor) or not isinstance(a, Tensor):
        x, bound, fresh = (a, b, fresh_a) if isinstance(a, Tensor) else (b, a, fresh_b)
        clamp = "clamp_max" if op == "minimum" else "clamp_min"  # (a NaN bound gives NaN, as torch.minimum)
        return getattr(x, f"{clamp}_")(bound) if fresh else getattr(x, clamp)(bound)
    function = torch.minimum if op == "minimum" else torch.maximum
    if fresh_a and _fits_into(b, a):
        return function(a, b, out=a)
    if fresh_b and _fits_into(a, b):
        return function(a, b, out=b)
    return function(a, b)


def _where(cond: Tensor, a: Scalar, fresh_a: bool, b: Scalar, fresh_b: bool, like: Tensor) -> Tensor:
    """torch.where(cond, a, b), into a temporary where one fits; two float branches take ``like``'s dtype
    (torch would make them float32)."""
    dtype = torch.result_type(a, b) if isinstance(a, Tensor) or isinstance(b, Tensor) else like.dtype
    device = next(t.device for t in (a, b, cond) if isinstance(t, Tensor))
    a = a if isinstance(a, Tensor) else torch.full((), a, dtype=dtype, device=device)
    b = b if isinstance(b, Tensor) else torch.full((), b, dtype=dtype, device=device)
    shape = _broadcast_shape(cond.shape, a.shape, b.shape)
    for value, fresh in ((a, fresh_a), (b, fresh_b)):
        if fresh and value.shape == shape and value.dtype == dtype:
            return torch.where(cond, a, b, out=value)
    return torch.where(cond, a, b)


def _linear_terms(e: Expr) -> list[tuple[Expr, Vec]] | None:
    """``e`` as Σ scalar_i · vec_i, or None where it is not linear in plain vectors."""
    terms = _affine_terms(e)
    return terms if terms is not None and all(isinstance(t, Vec) for _, t in terms) else None


def _mul(a: Expr, b: Expr) -> Expr:
    if isinstance(a, Const) and a.value == 1.0:
        return b
    if isinstance(b, Const) and b.value == 1.0:
        return a
    return BinOp("*", a, b)


_IN_PLACE = {"+": "add_", "-": "sub_", "*": "mul_", "/": "div_"}


def _fits_into(other: Tensor | Scalar, target: Tensor) -> bool:
    """Whether ``target op= other`` gives ``target op other`` (same shape and dtype, or a scalar)."""
    if not isinstance(other, Tensor):
        return True
    if other.dim() == 0:
        return other.dtype == target.dtype or not other.is_floating_point()
    return other.shape == target.shape and other.dtype == target.dtype


def evaluate_vector(e: Expr, env: Mapping[str, Tensor], coefs: Mapping[str, Scalar],
                    scratch: Scratch | None = None) -> Tensor | Scalar:
    """The value of ``e`` over the vectors of ``env`` (a new tensor, or a scalar where ``e`` reads none).

    ``scratch``: the new tensor is borrowed from this pool (the caller gives it back) instead of allocated."""
    return _evaluate(e, env, coefs, scratch)[0]


_OUT_OPS: dict[str, Callable] = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}


def _broadcast_shape(*shapes: torch.Size) -> torch.Size:
    """The shape operands of ``shapes`` broadcast to: the first where all are equal (the common case, without
    ``torch.broadcast_shapes``, whose Python implementation costs tens of microseconds a call)."""
    first = shapes[0]
    return first if all(s == first for s in shapes[1:]) else torch.broadcast_shapes(*shapes)


def _new_binop(op: str, a: Scalar, b: Scalar, scratch: Scratch | None) -> Tensor:
    """``a op b`` (one of them a tensor) as a new tensor, borrowed from ``scratch`` where one is given."""
    if scratch is None:
        return _binop_into(op, a, b, None)
    like = a if isinstance(a, Tensor) else b
    shape = _broadcast_shape(a.shape, b.shape) if isinstance(a, Tensor) and isinstance(b, Tensor) else like.shape
    return _binop_into(op, a, b, scratch.take(shape, torch.result_type(a, b), like.device))


def _binop_into(op: str, a: Scalar, b: Scalar, out: Tensor | None) -> Tensor:
    """``a op b`` (one of them a tensor) into ``out``, which may be an operand (a new tensor where ``out`` is
    None). A number first is rounded to the tensor's dtype, as torch rounds it; ``number / tensor`` is a true
    division, as the fused engine's (torch's is ``reciprocal(tensor) * number``: two roundings, two passes)."""
    if isinstance(a, Tensor):
        return _OUT_OPS[op](a, b, out=out)
    if op in "+*":
        return _OUT_OPS[op](b, a, out=out)
    return _OUT_OPS[op](torch.tensor(a, dtype=b.dtype), b, out=out)


def _new_unary(op: str, a: Tensor, scratch: Scratch | None, *args: float) -> Tensor:
    """``op(a, *args)`` (``sqrt``, ``clamp_min`` or a :class:`Unary` function) as a new tensor, borrowed from
    ``scratch`` where one is given."""
    if scratch is None:
        return _unary_tensor(op, a, fresh=False) if op in _UNARY_FLOAT else getattr(torch, op)(a, *args)
    out = scratch.take(a.shape, a.dtype, a.device)
    if op == "sign":
        return _unary_tensor(op, out.copy_(a), fresh=True)
    return getattr(torch, op)(a, *args, out=out)


def _drop(value: Tensor | Scalar, fresh: bool, scratch: Scratch | None) -> None:
    """A temporary of this evaluation that is no longer needed goes back to ``scratch``."""
    if fresh and scratch is not None and isinstance(value, Tensor):
        scratch.give(value)


def _evaluate(e: Expr, env: Mapping[str, Tensor], coefs: Mapping[str, Scalar],
              scratch: Scratch | None = None) -> tuple[Tensor | Scalar, bool]:
    """(value, fresh): ``fresh`` when the value is a temporary this evaluation made, which the next
    operation may then overwrite in place (one allocation per expression instead of one per operation;
    none where ``scratch`` lends the temporaries)."""
    if isinstance(e, Vec):
        return env[e.key], False
    if not is_vector(e):
        return _scalar(e, coefs), False
    if isinstance(e, BinOp):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        if fresh_a and isinstance(a, Tensor) and _fits_into(b, a):
            value = getattr(a, _IN_PLACE[e.op])(b)
            _drop(b, fresh_b, scratch)
            return value, True
        if fresh_b and isinstance(b, Tensor) and e.op in "+*" and _fits_into(a, b):
            value = getattr(b, _IN_PLACE[e.op])(a)  # (commutative)
            _drop(a, fresh_a, scratch)
            return value, True
        if fresh_b and isinstance(b, Tensor) and not isinstance(a, Tensor):  # number - b, number / b
            return _binop_into(e.op, a, b, b), True
        value = _new_binop(e.op, a, b, scratch)
        _drop(a, fresh_a, scratch)
        _drop(b, fresh_b, scratch)
        return value, True
    if isinstance(e, ClampMin):
        a, fresh = _evaluate(e.a, env, coefs, scratch)
        return (a.clamp_min_(e.low) if fresh else _new_unary("clamp_min", a, scratch, e.low)), True
    if isinstance(e, Sqrt):
        a, fresh = _evaluate(e.a, env, coefs, scratch)
        return (a.sqrt_() if fresh else _new_unary("sqrt", a, scratch)), True
    if isinstance(e, Unary):
        a, fresh = _evaluate(e.a, env, coefs, scratch)
        return (_unary_tensor(e.op, a, fresh) if fresh else _new_unary(e.op, a, scratch)), True
    if isinstance(e, Pow):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        b = _exponent(b, a) if isinstance(a, Tensor) else b
        if fresh_a and isinstance(a, Tensor) and _fits_into(b, a):
            value = a.pow_(b)
            _drop(b, fresh_b, scratch)
            return value, True
        if fresh_b and isinstance(b, Tensor) and _fits_into(a, b):
            return torch.pow(a, b, out=b), True
        value = torch.pow(a, b)
        _drop(a, fresh_a, scratch)
        _drop(b, fresh_b, scratch)
        return value, True
    if isinstance(e, Extremum):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        value = _extremum(e.op, a, b, fresh_a, fresh_b)
        for x, fresh in ((a, fresh_a), (b, fresh_b)):
            if x is not value:
                _drop(x, fresh, scratch)
        return value, True
    if isinstance(e, Compare):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        value = _COMPARE[e.op](a, b)
        _drop(a, fresh_a, scratch)
        _drop(b, fresh_b, scratch)
        return value, True
    if isinstance(e, Where):
        (x, fresh_x), (y, fresh_y) = (_evaluate(e.cond.a, env, coefs, scratch),
                                      _evaluate(e.cond.b, env, coefs, scratch))
        cond = _COMPARE[e.cond.op](x, y)
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        like = next(t for t in (x, y, a, b) if isinstance(t, Tensor))
        if not isinstance(cond, Tensor):  # (a scalar condition of floats, over vector branches)
            cond = torch.full((), cond, dtype=torch.bool, device=like.device)
        value = _where(cond, a, fresh_a, b, fresh_b, like)
        for t, fresh in ((x, fresh_x), (y, fresh_y), (a, fresh_a), (b, fresh_b)):
            if t is not value:
                _drop(t, fresh, scratch)
        return value, True
    raise TypeError(f"not an expression: {e!r}")


def _axpy(x: Tensor, y: Tensor, c: Scalar) -> Tensor:
    """x += c y in place (c a float or a 0-d tensor)."""
    if isinstance(c, float):
        return x if c == 0.0 else x.add_(y, alpha=c)
    return x.addcmul_(y, c)


def _linear_out_of_place(terms: list[tuple[Expr, Vec]], env: Mapping[str, Tensor],
                         coefs: Mapping[str, Scalar]) -> Tensor:
    """Σ scalar_i · vec_i as a new tensor (a plain copy ``x = y`` binds ``y`` itself)."""
    (s0, v0), rest = terms[0], terms[1:]
    first = _scalar(s0, coefs)
    if not rest and isinstance(first, float) and first == 1.0:
        return env[v0.key]
    value = env[v0.key] * first
    for s, v in rest:
        _axpy(value, env[v.key], _scalar(s, coefs))
    return value


def _affine_terms(e: Expr) -> list[tuple[Expr, Expr]] | None:
    """``e`` as Σ scalar_i · term_i over vector expressions ``term_i``, or None where it has a scalar term."""
    if isinstance(e, BinOp):
        if e.op in "+-":
            a, b = _affine_terms(e.a), _affine_terms(e.b)
            if a is None or b is None:
                return None
            if e.op == "-":
                b = [(Const(-s.value) if isinstance(s, Const) else Const(-1.0) * s, t) for s, t in b]
            return a + b
        if e.op == "*" and not is_vector(e.a):
            inner = _affine_terms(e.b)
            return None if inner is None else [(_mul(e.a, s), t) for s, t in inner]
        if e.op == "*" and not is_vector(e.b):
            inner = _affine_terms(e.a)
            return None if inner is None else [(_mul(e.b, s), t) for s, t in inner]
        if e.op == "/" and not is_vector(e.b):
            inner = _affine_terms(e.a)
            return None if inner is None else [(BinOp("/", s, e.b), t) for s, t in inner]
    return [(Const(1.0), e)] if is_vector(e) else None


def _pair(e: Expr, env: Mapping[str, Tensor], x: Tensor) -> tuple[str, Tensor, Tensor] | None:
    """("addcmul_" | "addcdiv_", u, w) where ``e`` is ``u * w`` or ``u / w`` of two vectors of ``x``'s shape and
    dtype other than ``x``, else None."""
    if not (isinstance(e, BinOp) and e.op in "*/" and isinstance(e.a, Vec) and isinstance(e.b, Vec)):
        return None
    u, w = env[e.a.key], env[e.b.key]
    if any(t is x or t.shape != x.shape or t.dtype != x.dtype for t in (u, w)):
        return None
    return ("addcmul_" if e.op == "*" else "addcdiv_"), u, w


def _affine_in_place(x: Tensor, key: str, terms: list[tuple[Expr, Expr]], env: Mapping[str, Tensor],
                     coefs: Mapping[str, Scalar], scratch: Scratch | None) -> None:
    """``x = Σ s_i · term_i`` in place: the terms that are expressions evaluated first (they may read ``x``), then
    ``x`` scaled by its own coefficient and each term added (a product or quotient of two vectors fused)."""
    scale: Scalar = 0.0
    own = False  # (an own term, even one scaled by 0, reads x: 0 · NaN stays NaN)
    adds: list[tuple[Scalar, Any]] = []  # (coefficient, a tensor to add, or a ("addcmul_", u, w) pair)
    borrowed: list[Tensor] = []
    for s, t in terms:
        c = _scalar(s, coefs)
        if isinstance(t, Vec) and t.key == key:
            scale, own = scale + c, True
            continue
        pair = _pair(t, env, x) if isinstance(c, float) else None
        if isinstance(t, Vec) or pair is not None:
            adds.append((c, env[t.key] if pair is None else pair))
            continue
        value, fresh = _evaluate(t, env, coefs, scratch)
        adds.append((c, value))
        if fresh:
            borrowed.append(value)
    if own:
        if isinstance(scale, Tensor) or scale != 1.0:
            x.mul_(scale)
    elif adds:  # x's old values are not read: the first term is written over them
        c, first = adds.pop(0)
        if isinstance(first, tuple):
            (torch.mul if first[0] == "addcmul_" else torch.div)(first[1], first[2], out=x)
            if c != 1.0:
                x.mul_(c)
        elif isinstance(c, float) and c == 1.0:
            x.copy_(first)
        else:
            torch.mul(first, c, out=x) if first.shape == x.shape and first.dtype == x.dtype else \
                x.copy_(first * c)
    else:
        x.zero_()
    for c, term in adds:
        if isinstance(term, tuple):
            if c != 0.0:
                getattr(x, term[0])(term[1], term[2], value=c)
        else:
            _axpy(x, term, c)
    for value in borrowed:
        _drop(value, True, scratch)


def _evaluate_into(e: Expr, env: Mapping[str, Tensor], coefs: Mapping[str, Scalar], scratch: Scratch | None,
                   out: Tensor) -> bool:
    """Evaluate ``e`` straight into ``out`` where its last operation can write there (an element-wise operation
    of ``out``'s shape and dtype; its operands are computed before it writes); False where it cannot."""
    if isinstance(e, BinOp) and is_vector(e):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs, scratch), _evaluate(e.b, env, coefs, scratch)
        shapes = [t.shape for t in (a, b) if isinstance(t, Tensor)]
        if torch.result_type(a, b) != out.dtype or _broadcast_shape(*shapes) != out.shape:
            value = _new_binop(e.op, a, b, scratch)
            out.copy_(value)
            _drop(value, True, scratch)
        else:
            _binop_into(e.op, a, b, out)
        _drop(a, fresh_a, scratch)
        _drop(b, fresh_b, scratch)
        return True
    if isinstance(e, (Sqrt, ClampMin)) or (isinstance(e, Unary) and e.op != "sign"):
        a, fresh = _evaluate(e.a, env, coefs, scratch)
        if not isinstance(a, Tensor) or a.shape != out.shape or a.dtype != out.dtype:
            _drop(a, fresh, scratch)
            return False
        if isinstance(e, Sqrt):
            torch.sqrt(a, out=out)
        elif isinstance(e, ClampMin):
            torch.clamp_min(a, e.low, out=out)
        else:
            getattr(torch, e.op)(a, out=out)
        _drop(a, fresh, scratch)
        return True
    return False


def _give_unbound(value: Tensor | Scalar | None, env: Mapping[str, Tensor], scratch: Scratch | None) -> None:
    """``value`` back to ``scratch`` if it lent it and no key of ``env`` holds it any more."""
    if scratch is not None and scratch.lent(value) and not any(value is t for t in env.values()):
        scratch.give(value)


class PreparedProgram:
    """A program prepared for torch evaluation: linear assignments run as in-place axpys.

    An output that is a sum of scaled terms is updated in place term by term (a product or quotient of two
    vectors by ``addcmul_``/``addcdiv_``); any other output is evaluated straight into its tensor.

    Args:
        program: the assignments, in order.
        outputs: env keys written back in place (state vectors, ``theta``); other targets are temporaries.
    """

    def __init__(self, program: Sequence[Assign], outputs: Iterable[str]) -> None:
        self.program = list(program)
        self.outputs = set(outputs)
        self._steps = []
        for a in self.program:
            terms = _linear_terms(a.expr)
            affine = _affine_terms(a.expr) if a.target.key in self.outputs else None
            if terms is None and affine is not None and len(affine) == 1 and affine[0][0] == Const(1.0):
                affine = None  # (one term of an expression: evaluated straight into its target)
            self._steps.append((a.target.key, a.expr, terms, affine))

    def run(self, env: dict[str, Tensor], coefs: Mapping[str, Scalar], in_place: bool = True,
            scratch: Scratch | None = None) -> None:
        """Run the program on one layer: ``env`` maps keys to flat tensors, ``coefs`` to its scalars.

        ``in_place=False``: each output is bound to a new tensor in ``env`` (what a later assignment reads)
        and the tensor it held is left as it was (the caller keeps it where it needs the old values).
        ``scratch``: the temporaries are borrowed from this pool; those bound in ``env`` stay there until
        :meth:`release` gives them back."""
        for key, expr, terms, affine in self._steps:
            if key in self.outputs and not in_place:
                value = _linear_out_of_place(terms, env, coefs) if terms is not None else \
                    evaluate_vector(expr, env, coefs)
                if not isinstance(value, Tensor) or value.shape != env[key].shape:  # (a constant, a broadcast)
                    value = torch.empty_like(env[key]).copy_(value)
                env[key] = value
            elif key in self.outputs:
                x = env[key]
                if affine is not None and not any(isinstance(t, Vec) and t.key != key and env[t.key] is x
                                                    for _, t in affine):
                    _affine_in_place(x, key, affine, env, coefs, scratch)
                elif not _evaluate_into(expr, env, coefs, scratch, x):
                    value = evaluate_vector(expr, env, coefs, scratch)
                    x.copy_(value)
                    _give_unbound(value, env, scratch)
            else:
                value = evaluate_vector(expr, env, coefs, scratch)
                if not isinstance(value, Tensor) or value.dim() == 0:
                    raise ValueError(f"temporary {key!r} of a program must be a vector expression")
                old = env.get(key)
                env[key] = value
                _give_unbound(old, env, scratch)

    def release(self, env: dict[str, Tensor], scratch: Scratch) -> None:
        """Give the temporaries :meth:`run` borrowed from ``scratch`` back, and unbind them from ``env``."""
        for key, *_ in self._steps:
            if key not in self.outputs and key in env:
                _give_unbound(env.pop(key), env, scratch)


def hp_coefficients(group: Mapping[str, Any]) -> dict[str, float]:
    """A group's numeric hyper-parameters as program coefficients (a part's column of that name wins)."""
    return {k: float(v) for k, v in group.items()
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def prepare_program(program: Sequence[Assign], outputs: Iterable[str]) -> PreparedProgram:
    """Prepare ``program`` for torch evaluation (see :class:`PreparedProgram`)."""
    return PreparedProgram(program, outputs)


def _dot_shaped(v: Tensor) -> bool:
    """Whether torch.dot takes ``v`` (a 1-D floating tensor)."""
    return v.dim() == 1 and v.is_floating_point()


def reduce_layer(reductions: Sequence[Reduction], env: Mapping[str, Tensor], coefs: Mapping[str, Scalar],
                 like: Tensor, scratch: Scratch | None = None) -> list[Tensor]:
    """Σ over the layer of each reduction's expression (0-d tensors in ``like``'s dtype; the temporaries
    borrowed from ``scratch`` where one is given)."""
    out = []
    for r in reductions:
        e = r.expr
        if isinstance(e, BinOp) and e.op == "*" and isinstance(e.a, Vec) and isinstance(e.b, Vec):
            out.append(torch.dot(env[e.a.key], env[e.b.key]))  # a dot product, without a temporary
        elif isinstance(e, BinOp) and e.op == "*" and isinstance(e.b, Vec) and is_vector(e.a) and \
                _dot_shaped(env[e.b.key]):  # Σ A·v: A into a temporary, dotted with v
            value = evaluate_vector(e.a, env, coefs, scratch)
            v = env[e.b.key]
            out.append(torch.dot(value, v) if value.shape == v.shape and value.dtype == v.dtype
                       else (value * v).sum())
            _give_unbound(value, env, scratch)
        elif isinstance(e, BinOp) and e.op == "*" and isinstance(e.a, Vec) and e.b == Const(0.0):
            # Σ x·0: NaN exactly where x holds a NaN or ±inf; min and max carry those, in one vectorised pass
            x = env[e.a.key]
            out.append(torch.stack(torch.aminmax(x)).mul(0.0).sum() if x.numel() else like.new_zeros(()))
        else:
            value = evaluate_vector(e, env, coefs, scratch)
            out.append(value.sum() if isinstance(value, Tensor) and value.dim() else like.new_tensor(0.0))
            _give_unbound(value, env, scratch)
    return out


#: the names these had before the step plan (deprecated): a program is prepared, not compiled
CompiledProgram = PreparedProgram
compile_program = prepare_program
