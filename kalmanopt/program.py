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
with ``+``, ``-``, ``*``, ``/``, :meth:`Expr.clamp_min` and :meth:`Expr.sqrt`.

The same program is evaluated by torch operations (the reference and multi-tensor engines,
:func:`prepare_program`) and turned into Triton source (the fused engine): a part is fast without
touching an engine. Sums over a layer (:class:`Reduction`) use the same expressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Expr", "Vec", "State", "Coef", "Const", "Assign", "Reduction", "PreparedProgram", "prepare_program",
           "evaluate_vector", "vectors_read", "coefficients_read", "is_vector", "MEASUREMENT_VECTORS",
           "hp_coefficients"]

#: the vectors the engine provides to every program: θ (the parameters), g (the gradient), H (g + wd θ)
MEASUREMENT_VECTORS = ("theta", "g", "H")

Number = Union[int, float]


class Expr:
    """A node of an element-wise expression (build with operators, not by hand)."""

    def _wrap(self, other: Expr | Number) -> Expr:
        if isinstance(other, Expr):
            return other
        if isinstance(other, bool) or not isinstance(other, (int, float)):
            raise TypeError(f"an element-wise expression combines expressions and numbers, got {type(other).__name__}")
        return Const(float(other))

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


@dataclass(frozen=True, eq=True)
class BinOp(Expr):
    """``a op b`` for op in + - * /."""

    op: str
    a: Expr
    b: Expr

    def __repr__(self) -> str:
        return f"({self.a!r} {self.op} {self.b!r})"


@dataclass(frozen=True, eq=True)
class ClampMin(Expr):
    """max(a, low)."""

    a: Expr
    low: float

    def __repr__(self) -> str:
        return f"max({self.a!r}, {self.low!r})"


@dataclass(frozen=True, eq=True)
class Sqrt(Expr):
    """√a."""

    a: Expr

    def __repr__(self) -> str:
        return f"sqrt({self.a!r})"


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
        if not is_vector(self.expr) and not isinstance(self.expr, (Const, Coef, BinOp, ClampMin, Sqrt)):
            raise TypeError(f"the value of an assignment is an expression, got {type(self.expr).__name__}")
        if self.target.name == "g" and not isinstance(self.target, State):
            raise ValueError("'g' is the gradient; a program cannot assign it")


@dataclass(frozen=True)
class Reduction:
    """A per-layer sum Σ_i expr_i over the layer's elements (a dot product, a squared norm)."""

    name: str
    expr: Expr


def _children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, BinOp):
        return (e.a, e.b)
    if isinstance(e, (ClampMin, Sqrt)):
        return (e.a,)
    return ()


def _walk(e: Expr) -> Iterable[Expr]:
    yield e
    for c in _children(e):
        yield from _walk(c)


def is_vector(e: Expr) -> bool:
    """Whether ``e`` has the layer's size (it reads a vector) rather than being a scalar."""
    return any(isinstance(n, Vec) for n in _walk(e))


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
    raise TypeError(f"not a scalar expression: {e!r}")


_OPS: dict[str, Callable] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                             "/": lambda a, b: a / b}


def _linear_terms(e: Expr) -> list[tuple[Expr, Vec]] | None:
    """``e`` as Σ scalar_i · vec_i, or None where it is not linear in plain vectors."""
    if isinstance(e, Vec):
        return [(Const(1.0), e)]
    if isinstance(e, BinOp):
        if e.op in "+-":
            a, b = _linear_terms(e.a), _linear_terms(e.b)
            if a is None or b is None:
                return None
            if e.op == "-":
                b = [(Const(-1.0) * s if not isinstance(s, Const) else Const(-s.value), v) for s, v in b]
            return a + b
        if e.op == "*":
            if not is_vector(e.a):
                inner = _linear_terms(e.b)
                return None if inner is None else [(_mul(e.a, s), v) for s, v in inner]
            if not is_vector(e.b):
                inner = _linear_terms(e.a)
                return None if inner is None else [(_mul(e.b, s), v) for s, v in inner]
        if e.op == "/" and not is_vector(e.b):
            inner = _linear_terms(e.a)
            return None if inner is None else [(BinOp("/", s, e.b), v) for s, v in inner]
    return None


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


def evaluate_vector(e: Expr, env: Mapping[str, Tensor], coefs: Mapping[str, Scalar]) -> Tensor | Scalar:
    """The value of ``e`` over the vectors of ``env`` (a new tensor, or a scalar where ``e`` reads none)."""
    return _evaluate(e, env, coefs)[0]


def _evaluate(e: Expr, env: Mapping[str, Tensor], coefs: Mapping[str, Scalar]) -> tuple[Tensor | Scalar, bool]:
    """(value, fresh): ``fresh`` when the value is a temporary this evaluation made, which the next
    operation may then overwrite in place (one allocation per expression instead of one per operation)."""
    if isinstance(e, Vec):
        return env[e.key], False
    if not is_vector(e):
        return _scalar(e, coefs), False
    if isinstance(e, BinOp):
        (a, fresh_a), (b, fresh_b) = _evaluate(e.a, env, coefs), _evaluate(e.b, env, coefs)
        if fresh_a and isinstance(a, Tensor) and _fits_into(b, a):
            return getattr(a, _IN_PLACE[e.op])(b), True
        if fresh_b and isinstance(b, Tensor) and e.op in "+*" and _fits_into(a, b):
            return getattr(b, _IN_PLACE[e.op])(a), True  # (commutative)
        return _OPS[e.op](a, b), True
    if isinstance(e, ClampMin):
        a, fresh = _evaluate(e.a, env, coefs)
        return (a.clamp_min_(e.low) if fresh else a.clamp_min(e.low)), True
    if isinstance(e, Sqrt):
        a, fresh = _evaluate(e.a, env, coefs)
        return (a.sqrt_() if fresh else a.sqrt()), True
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


class PreparedProgram:
    """A program prepared for torch evaluation: linear assignments run as in-place axpys.

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
            self._steps.append((a.target.key, a.expr, terms))

    def run(self, env: dict[str, Tensor], coefs: Mapping[str, Scalar], in_place: bool = True) -> None:
        """Run the program on one layer: ``env`` maps keys to flat tensors, ``coefs`` to its scalars.

        ``in_place=False``: each output is bound to a new tensor in ``env`` (what a later assignment reads)
        and the tensor it held is left as it was (the caller keeps it where it needs the old values)."""
        for key, expr, terms in self._steps:
            if key in self.outputs and not in_place:
                value = _linear_out_of_place(terms, env, coefs) if terms is not None else \
                    evaluate_vector(expr, env, coefs)
                if not isinstance(value, Tensor) or value.shape != env[key].shape:  # (a constant, a broadcast)
                    value = torch.empty_like(env[key]).copy_(value)
                env[key] = value
            elif key in self.outputs:
                x = env[key]
                if terms is not None:
                    self._linear_in_place(x, key, terms, env, coefs)
                else:
                    x.copy_(evaluate_vector(expr, env, coefs))
            else:
                value = evaluate_vector(expr, env, coefs)
                if not isinstance(value, Tensor) or value.dim() == 0:
                    raise ValueError(f"temporary {key!r} of a program must be a vector expression")
                env[key] = value

    @staticmethod
    def _linear_in_place(x: Tensor, key: str, terms: list[tuple[Expr, Vec]], env: Mapping[str, Tensor],
                         coefs: Mapping[str, Scalar]) -> None:
        own = [s for s, v in terms if v.key == key]
        others = [(s, v) for s, v in terms if v.key != key]
        reads_later = any(env[v.key] is x for _, v in others)
        if reads_later:  # x appears aliased on the right-hand side: evaluate out of place
            value = None
            for s, v in terms:
                term = env[v.key] * _scalar(s, coefs)
                value = term if value is None else value.add_(term)
            x.copy_(value)
            return
        if own:
            scale: Scalar = 0.0
            for s in own:
                scale = scale + _scalar(s, coefs)
            if isinstance(scale, float):
                if scale != 1.0:
                    x.mul_(scale)
            else:
                x.mul_(scale)
        elif len(others) == 1 and isinstance(others[0][0], Const) and others[0][0].value == 1.0:
            x.copy_(env[others[0][1].key])  # a plain copy
            return
        else:
            x.zero_()
        for s, v in others:
            _axpy(x, env[v.key], _scalar(s, coefs))


def hp_coefficients(group: Mapping[str, Any]) -> dict[str, float]:
    """A group's numeric hyper-parameters as program coefficients (a part's column of that name wins)."""
    return {k: float(v) for k, v in group.items()
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def prepare_program(program: Sequence[Assign], outputs: Iterable[str]) -> PreparedProgram:
    """Prepare ``program`` for torch evaluation (see :class:`PreparedProgram`)."""
    return PreparedProgram(program, outputs)


def reduce_layer(reductions: Sequence[Reduction], env: Mapping[str, Tensor], coefs: Mapping[str, Scalar],
                 like: Tensor) -> list[Tensor]:
    """Σ over the layer of each reduction's expression (0-d tensors in ``like``'s dtype)."""
    out = []
    for r in reductions:
        e = r.expr
        if isinstance(e, BinOp) and e.op == "*" and isinstance(e.a, Vec) and isinstance(e.b, Vec):
            out.append(torch.dot(env[e.a.key], env[e.b.key]))  # a dot product, without a temporary
        elif isinstance(e, BinOp) and e.op == "*" and isinstance(e.a, Vec) and e.b == Const(0.0):
            # Σ x·0: NaN exactly where x holds a NaN or ±inf; min and max carry those, in one vectorised pass
            x = env[e.a.key]
            out.append(torch.stack(torch.aminmax(x)).mul(0.0).sum() if x.numel() else like.new_zeros(()))
        else:
            value = evaluate_vector(e, env, coefs)
            out.append(value.sum() if isinstance(value, Tensor) and value.dim() else like.new_tensor(0.0))
    return out


#: the names these had before the step plan (deprecated): a program is prepared, not compiled
CompiledProgram = PreparedProgram
compile_program = prepare_program
