"""Triton source generated from element-wise programs and reductions (imported on first fused step).

Every vector a kernel touches is addressed as a base tensor plus one element offset per layer; a
program's assignments become local variables, its outputs stores; a coefficient is one column of the
``[layers, columns]`` table the engine fills. Constants that float32 cannot hold exactly travel in
that table too (Triton types a Python float literal as float32), so float64 state gets them exactly.

A subexpression of constants alone is evaluated here, in double precision as the torch engines evaluate
it, and enters the kernel as one constant. The functions whose Triton default is less accurate than
torch's get helpers in the module's header (:data:`_HEADER`): ``precise_sqrt`` (correctly rounded),
``precise_exp``, ``precise_log`` and ``precise_pow`` (libdevice's, as CUDA's own ``expf``, ``logf`` and
``powf``: ``tl.exp`` is an approximation in float32), ``nan_sign`` (NaN stays NaN). Triton's interpreter
has no libdevice: there the helpers take ``tl.exp`` and ``tl.log`` (numpy's), and ``precise_pow`` is
built from them in float64 with C's special cases, a few ulps from torch's. ``minimum``/``maximum`` are
``tl.minimum``/``tl.maximum`` with NaN propagated, as torch's. Every state vector is stored through ``stored``:
rounded to nearest in its slot's dtype, or, in a bfloat16 slot (``state_dtype="bfloat16"``), stochastically
with the random bits of :mod:`kalmanopt.engines.rounding`, whose formula the header writes in Triton.

The generated module is written to a cache folder and imported, once per distinct declaration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import re
import tempfile
from typing import Any, Sequence

import torch
from torch import Tensor

from kalmanopt.engines.rounding import GOLDEN, MIX, name_salt
from kalmanopt.engines.triton_config import CONFIG, interpreting
from kalmanopt.program import (
    Assign,
    BinOp,
    ClampMin,
    Coef,
    Compare,
    Const,
    Expr,
    Extremum,
    Pow,
    Reduction,
    Sqrt,
    Unary,
    Vec,
    Where,
    coefficients_read,
    evaluate_vector,
    is_vector,
)

__all__ = ["kernels_for", "Kernels", "source_for", "slot_traffic"]


def _name(key: str, slots: Sequence[str], assigned: set[str]) -> str:
    safe = re.sub(r"\W", "_", key)
    if key in slots:
        return f"v_{safe}"
    return f"t_{safe}"


def _exact32(value: float) -> bool:
    """Whether ``value`` can be written as a literal: finite (Triton source has no name for inf or NaN) and
    exact in float32 (the type Triton gives a Python float literal)."""
    return math.isfinite(value) and float(torch.tensor(value, dtype=torch.float32)) == value


def _constant(e: Expr) -> bool:
    """Whether ``e`` is a value computed from constants alone (folded at generation)."""
    return not isinstance(e, Compare) and not is_vector(e) and not coefficients_read([e])


#: the Triton function for each :class:`~kalmanopt.program.Unary` op, and whether its argument is converted
#: to the kernel's state dtype first (a transcendental function of a float32 literal's value is not
#: computed in float32 where the state is float64)
_UNARY = {"abs": ("tl.abs", False), "sign": ("nan_sign", False), "exp": ("precise_exp", True),
          "log": ("precise_log", True)}


class _Writer:
    """Turns expressions into Triton source, collecting the coefficient columns they read."""

    def __init__(self, slots: Sequence[str]) -> None:
        self.slots = list(slots)
        self.coefs: list[str] = []
        self.assigned: set[str] = set()
        self.read_slots: list[str] = []

    def coef(self, name: str) -> str:
        if name not in self.coefs:
            self.coefs.append(name)
        return f"c{self.coefs.index(name)}"

    def expr(self, e: Expr) -> str:
        if isinstance(e, Vec):
            key = e.key
            if key in self.slots and key not in self.assigned and key not in self.read_slots:
                self.read_slots.append(key)
            if key not in self.slots and key not in self.assigned:
                raise ValueError(f"the program reads {key!r} before assigning it")
            return _name(key, self.slots, self.assigned)
        if isinstance(e, Coef):
            return self.coef(e.name)
        if isinstance(e, Const):
            return self.const(e.value)
        if _constant(e):  # (evaluated here, in double precision, as the torch engines do)
            return self.const(float(evaluate_vector(e, {}, {})))
        if isinstance(e, BinOp):
            return f"({self.expr(e.a)} {e.op} {self.expr(e.b)})"
        if isinstance(e, ClampMin):
            return f"tl.maximum({self.expr(e.a)}, {self.const(e.low)}, propagate_nan=tl.PropagateNan.ALL)"
        if isinstance(e, Sqrt):
            return f"precise_sqrt({self.expr(e.a)})"
        if isinstance(e, Unary):
            function, convert = _UNARY[e.op]
            return f"{function}({self.state_dtype(e.a) if convert else self.expr(e.a)})"
        if isinstance(e, Pow):
            return f"precise_pow({self.state_dtype(e.a)}, {self.state_dtype(e.b)})"
        if isinstance(e, Extremum):
            return f"tl.{e.op}({self.expr(e.a)}, {self.expr(e.b)}, propagate_nan=tl.PropagateNan.ALL)"
        if isinstance(e, Compare):
            return f"({self.expr(e.a)} {e.op} {self.expr(e.b)})"
        if isinstance(e, Where):
            return f"tl.where({self.expr(e.cond)}, {self.expr(e.a)}, {self.expr(e.b)})"
        raise TypeError(f"cannot write {e!r} as Triton source")

    def const(self, value: float) -> str:
        """A constant: a literal where float32 holds it exactly, else a column of the coefficient table."""
        if _exact32(value):
            return repr(float(value))
        return self.coef(f"__const:{value!r}")

    def state_dtype(self, e: Expr) -> str:
        """``e`` as a tensor of the kernel's state dtype ``S_DT`` (a Python float literal is float32 in Triton,
        and libdevice takes operands of one dtype)."""
        if isinstance(e, Coef):
            return self.expr(e)  # (loaded in S_DT)
        if _constant(e):
            value = e.value if isinstance(e, Const) else float(evaluate_vector(e, {}, {}))
            return f"tl.full([], {value!r}, S_DT)" if _exact32(value) else self.const(value)
        return f"({self.expr(e)}).to(S_DT)"

    def assign(self, a: Assign) -> str:
        value = self.expr(a.expr)
        self.assigned.add(a.target.key)
        return f"{_name(a.target.key, self.slots, self.assigned)} = {value}"


_HEADER = '''import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: Triton's interpreter (TRITON_INTERPRET=1) has no libdevice: the helpers below take tl's functions there
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").strip() == "1")


@triton.jit
def precise_sqrt(x):
    """√x correctly rounded, as torch's (tl.sqrt is approximate in float32; tl.sqrt_rn takes float32 only)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def precise_exp(x):
    """e ** x as torch's: libdevice's exp (tl.exp is ex2.approx in float32); the interpreter's is numpy's."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def precise_log(x):
    """The natural logarithm as torch's: libdevice's log (-inf at 0, NaN below); the interpreter's is numpy's."""
    if INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def interpreted_pow(x, y):
    """x ** y with C's special cases, from exp and log in float64 (the interpreter has no libdevice)."""
    x, y = tl.broadcast(x, y)  # (the interpreter mistypes a comparison of scalars that it then broadcasts)
    ax = tl.abs(x).to(tl.float64)
    y64 = y.to(tl.float64)
    r = tl.exp(y64 * tl.log(ax))
    integer = tl.floor(y64) == y64  # (±inf count as even integers, NaN as not an integer)
    odd = integer & (tl.floor(y64 * 0.5) != y64 * 0.5)
    negative = (x < 0) | ((x == 0) & (1.0 / x < 0))  # (-0 included)
    r = tl.where(negative & odd, -r, r)
    r = tl.where((x < 0) & (x > -float("inf")) & (tl.floor(y64) != y64), float("nan"), r)
    r = tl.where((ax == 1.0) & (tl.abs(y64) == float("inf")), 1.0, r)  # (-1) ** ±inf
    r = tl.where((x == 1.0) | (y64 == 0.0), 1.0, r)  # 1 ** y and x ** 0, NaN included
    return r.to(x.dtype)


@triton.jit
def precise_pow(x, y):
    """x ** y as torch.pow (C's pow: libdevice's); x and y of one dtype."""
    if INTERPRETED:
        return interpreted_pow(x, y)
    else:
        return libdevice.pow(x, y)


@triton.jit
def nan_sign(x):
    """-1, 0 or 1 as x is negative, zero or positive; NaN where x is NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == x, 0.0, x)))


@triton.jit
def layer_sum_kernel(partials, layer_first, layer_last, out, NR: tl.constexpr, ROWS: tl.constexpr):
    """out[layer, :] = the sum of the partial rows of the layer's chunks (in order: deterministic)."""
    layer = tl.program_id(0)
    first = tl.load(layer_first + layer)
    last = tl.load(layer_last + layer)
    cols = tl.arange(0, NR)
    acc = tl.zeros([ROWS, NR], dtype=partials.dtype.element_ty)
    for r in range(first, last, ROWS):
        rows = r + tl.arange(0, ROWS)
        acc += tl.load(partials + rows[:, None] * NR + cols[None, :], mask=(rows < last)[:, None], other=0.0)
    tl.store(out + layer * NR + cols, tl.sum(acc, 0))


@triton.jit
def _aligned(offset, ALIGNED: tl.constexpr):
    if ALIGNED:
        return tl.multiple_of(offset, 16)
    else:
        return offset


@triton.jit
def mix32(x):
    """The 32-bit finaliser of kalmanopt.engines.rounding (uint32 arithmetic wraps modulo 2**32)."""
    x = x ^ (x >> {S1})
    x = x * {M1}
    x = x ^ (x >> {S2})
    x = x * {M2}
    return x ^ (x >> {S3})


@triton.jit
def rounding_key(step, salt, layer, name_salt):
    """The key of a layer's vector at this write, as kalmanopt.engines.rounding.rounding_key."""
    k = mix32(step.to(tl.uint32) ^ (salt.to(tl.uint32) * {GOLDEN}))
    k = mix32(k ^ layer.to(tl.uint32))
    return mix32(k ^ name_salt)


@triton.jit
def stored(x, ptr, key, index):
    """x in the dtype of the slot ``ptr`` points into: bfloat16 stochastically rounded with the bits of ``key``
    (NaN kept), any other dtype rounded to nearest."""
    if ptr.dtype.element_ty == tl.bfloat16:
        y = x.to(tl.float32)
        bits = mix32(index.to(tl.uint32) ^ key) & 0xFFFF
        up = ((y.to(tl.uint32, bitcast=True) + bits) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(y != y, y, up).to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)
'''.replace("{S1}", str(MIX[0])).replace("{M1}", hex(MIX[1])).replace("{S2}", str(MIX[2])).replace(
    "{M2}", hex(MIX[3])).replace("{S3}", str(MIX[4])).replace("{GOLDEN}", hex(GOLDEN))


def _loop_head(masked: bool, indent: str) -> list[str]:
    """A full chunk runs unmasked with a constant trip count; the last, partial chunk masked."""
    if not masked:
        return [f"{indent}if end - start == CHUNK:", f"{indent}    for k in range(0, CHUNK // BLOCK):",
                f"{indent}        idx = start + k * BLOCK + tl.arange(0, BLOCK)"]
    return [f"{indent}else:", f"{indent}    for i in range(start, end, BLOCK):",
            f"{indent}        idx = i + tl.arange(0, BLOCK)", f"{indent}        m = idx < end"]


def _loads(keys: Sequence[str], masked: bool, indent: str) -> list[str]:
    mask = ", mask=m, other=0.0" if masked else ""
    return [f"{indent}v_{_safe(k)} = tl.load(p_{_safe(k)} + idx{mask}).to(S_DT)" for k in keys]


def _prologue(kernel: str, slot_args: list[str], extra: str, reverse: bool) -> list[str]:
    writes = kernel != "reduce"  # (the apply kernel takes the group's step counter and salt: the rounding keys)
    args = ", ".join(["chunk_layer", "chunk_start", "layer_numel"] + (["skip", "steps", "salt"] if writes else [])
                     + slot_args + ["coef", extra, "n_chunks", "NC: tl.constexpr", "NR: tl.constexpr",
                                    "S_DT: tl.constexpr", "CHUNK: tl.constexpr", "BLOCK: tl.constexpr",
                                    "ALIGNED: tl.constexpr"])
    lines = ['@triton.jit(do_not_specialize=["salt"])' if writes else "@triton.jit", f"def {kernel}_kernel({args}):"]
    lines.append("    pid = n_chunks - 1 - tl.program_id(0)" if reverse else "    pid = tl.program_id(0)")
    lines.append("    layer = tl.load(chunk_layer + pid)")
    return lines


class _Passes:
    """What the two kernels of a declaration compute: each one's body, the slots it reads and the
    coefficient columns it takes; the apply kernel's stores.

    A riding predict (``ride``: its reductions, program and outputs) runs in the apply kernel after the
    update's program: its sums are taken over the updated vectors (as stored: rounded to the slot's dtype),
    then its program moves them, and every slot either program writes is stored once.
    """

    def __init__(self, pre: Sequence[Assign], reductions: Sequence[Reduction], program: Sequence[Assign],
                 outputs: Sequence[str], slots: Sequence[str], ride: Ride = ()) -> None:
        w = _Writer(slots)
        self.reduce_body = [w.assign(a) for a in pre]
        self.terms = [w.expr(r.expr) for r in reductions]
        self.reduce_reads, self.reduce_coefs = list(w.read_slots), list(w.coefs)
        w = _Writer(slots)
        self.apply_body = [w.assign(a) for a in tuple(pre) + tuple(program)]
        self.updated = [k for k in outputs if k in w.assigned and k in slots]
        self.written = list(self.updated)
        self.ride_terms: list[str] = []
        self.ride_body: list[str] = []
        self.ride_outputs: list[str] = []
        if ride:
            ride_reductions, ride_program, ride_outputs = ride
            self.ride_outputs = [k for k in ride_outputs if k in slots]
            self.ride_terms = [w.expr(r.expr) for r in ride_reductions]
            self.ride_body = [w.assign(a) for a in ride_program]
            self.written += [k for k in ride_outputs if k in slots and k not in self.written]
        self.apply_reads = list(w.read_slots)
        self.apply_slots = list(dict.fromkeys(self.apply_reads + self.written))
        self.apply_coefs = list(w.coefs)
        self.rides = bool(ride)


#: a predict riding on the update's element-wise pass: ``(reductions, program, outputs)``, or ``()``
Ride = tuple


def slot_traffic(pre: Sequence[Assign], reductions: Sequence[Reduction], program: Sequence[Assign],
                 outputs: Sequence[str], slots: Sequence[str],
                 ride: Ride = ()) -> tuple[list[str], list[str], list[str]]:
    """The slots the generated reduce kernel reads, and those the apply kernel reads and writes (one access
    per element each; empty where the declaration has no such kernel)."""
    passes = _Passes(pre, reductions, program, outputs, slots, ride)
    if not reductions:
        passes.reduce_reads = []
    if not program:
        return passes.reduce_reads, [], []
    return passes.reduce_reads, passes.apply_reads, passes.written


def source_for(pre: Sequence[Assign], reductions: Sequence[Reduction], program: Sequence[Assign],
               outputs: Sequence[str], slots: Sequence[str],
               ride: Ride = ()) -> tuple[str, list[str], list[str], list[str], list[str]]:
    """The module source and, for each kernel, the coefficient columns and the slots it passes.

    With ``ride`` (a predict riding on the update, see :class:`_Passes`) the apply kernel reads a per-layer
    flag instead of a skip mask (0: update and predict, 1: the predict only, the layer's update is
    skipped; 2: nothing, the step is skipped) and writes the predict's per-chunk partial sums.
    """
    out = [_HEADER]
    passes = _Passes(pre, reductions, program, outputs, slots, ride)
    # ---------------------------------------------------------------- reduce
    reduce_slots, reduce_coefs, body, terms = passes.reduce_reads, passes.reduce_coefs, passes.reduce_body, passes.terms
    if reductions:
        lines = _prologue("reduce", [f"b_{_safe(k)}, o_{_safe(k)}" for k in reduce_slots], "partials", False)
        lines += _chunk_bounds(reduce_slots, reduce_coefs, "    ")
        lines += [f"    acc{i} = tl.zeros([BLOCK], dtype=S_DT)" for i in range(len(reductions))]
        indent = " " * 12
        for masked in (False, True):
            lines += _loop_head(masked, "    ")
            lines += _loads(reduce_slots, masked, indent)
            lines += [indent + line for line in body]
            lines += [f"{indent}acc{i} += " + (f"tl.where(m, {t}, 0.0)" if masked else t) for i, t in enumerate(terms)]
        lines += [f"    tl.store(partials + pid * NR + {i}, tl.sum(acc{i}, 0))" for i in range(len(reductions))]
        out.append("\n".join(lines) + "\n")
    # ---------------------------------------------------------------- apply
    body, written, apply_slots, apply_coefs = passes.apply_body, passes.written, passes.apply_slots, passes.apply_coefs
    if program:
        rides = passes.rides
        lines = _prologue("apply", [f"b_{_safe(k)}, o_{_safe(k)}" for k in apply_slots],
                          "partials" if rides else "unused", True)
        if rides:
            lines += ["    flag = tl.load(skip + layer)", "    if flag < 2:"]
        else:
            lines += ["    if tl.load(skip + layer) == 0:"]
        lines += _chunk_bounds(apply_slots, apply_coefs, "        ")
        ride_written = set(passes.ride_outputs)
        lines += ["        step = tl.load(steps)"]
        # a write's rounding key: the update's; a riding predict's writes take the predict's (the update has
        # counted its step by then, and the salt's phase is 1), as the torch engines' separate passes do
        state_written = [k for k in passes.written if _rounds(k)]
        lines += [f"        rk_{_safe(k)} = rounding_key(step, salt, layer, {name_salt(k.removeprefix('state.'))})"
                  for k in state_written]
        lines += [f"        rp_{_safe(k)} = rounding_key(step + 1, salt + 1, layer, "
                  f"{name_salt(k.removeprefix('state.'))})" for k in state_written if k in ride_written]
        lines += [f"        acc{i} = tl.zeros([BLOCK], dtype=S_DT)" for i in range(len(passes.ride_terms))]
        indent = " " * 16
        for masked in (False, True):
            lines += _loop_head(masked, "        ")
            lines += _loads(passes.apply_reads, masked, indent)
            if rides:
                lines += [f"{indent}k_{_safe(k)} = v_{_safe(k)}" for k in passes.updated]
            lines += [indent + line for line in body]
            if rides:
                # a layer whose update is skipped keeps its vectors; the predict sees them as stored
                lines += [f"{indent}v_{_safe(k)} = " + _store_value(f"tl.where(flag == 0, v_{_safe(k)}, k_{_safe(k)})",
                                                                  k, "rk") + ".to(S_DT)" for k in passes.updated]
                lines += [f"{indent}acc{i} += " + (f"tl.where(m, {t}, 0.0)" if masked else t)
                          for i, t in enumerate(passes.ride_terms)]
                lines += [indent + line for line in passes.ride_body]
            mask = ", mask=m" if masked else ""
            lines += [indent + f"tl.store(p_{_safe(k)} + idx, "
                      f"{_store_value(f'v_{_safe(k)}', k, 'rp' if k in ride_written else 'rk')}{mask})"
                      for k in written]
        lines += [f"        tl.store(partials + pid * NR + {i}, tl.sum(acc{i}, 0))"
                  for i in range(len(passes.ride_terms))]
        out.append("\n".join(lines) + "\n")
    return "\n\n".join(out), reduce_coefs, reduce_slots, apply_coefs, apply_slots


def _rounds(slot: str) -> bool:
    """Whether writes to ``slot`` go through ``stored`` (a state vector: stochastically rounded where it is
    bfloat16); θ is rounded to nearest in its own dtype, as the torch engines' copy back is."""
    return slot.startswith("state.")


def _store_value(value: str, slot: str, key: str) -> str:
    """The source of ``value`` in the dtype of ``slot``'s storage (``key``: the prefix of its rounding key)."""
    if _rounds(slot):
        return f"stored({value}, p_{_safe(slot)}, {key}_{_safe(slot)}, idx)"
    return f"{value}.to(p_{_safe(slot)}.dtype.element_ty)"


def _safe(key: str) -> str:
    return re.sub(r"\W", "_", key)


def _chunk_bounds(slots: Sequence[str], coefs: Sequence[str], indent: str) -> list[str]:
    lines = [f"{indent}start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)",
             f"{indent}n = tl.load(layer_numel + layer)", f"{indent}end = tl.minimum(start + CHUNK, n)"]
    # every segment's offset is a multiple of 16 elements when ALIGNED (the engine checks): 16-byte accesses
    lines += [f"{indent}p_{_safe(k)} = b_{_safe(k)} + _aligned(tl.load(o_{_safe(k)} + layer), ALIGNED)"
              for k in slots]
    lines += [f"{indent}c{i} = tl.load(coef + layer * NC + {i}).to(S_DT)" for i in range(len(coefs))]
    return lines


class Kernels:
    """The compiled kernels of one declaration and how to launch them."""

    def __init__(self, module: Any, reduce_coefs: list[str], reduce_slots: list[str], apply_coefs: list[str],
                 apply_slots: list[str], n_reductions: int, n_ride_reductions: int = 0) -> None:
        self.module = module
        self.reduce_coefs, self.reduce_slots = reduce_coefs, reduce_slots
        self.apply_coefs, self.apply_slots = apply_coefs, apply_slots
        self.n_reductions = n_reductions
        self.n_ride_reductions = n_ride_reductions  # (the sums of a riding predict, from the apply kernel)
        self.has_apply = hasattr(module, "apply_kernel")

    def launch_reduce(self, chunks: Any, slots: dict[str, tuple[Tensor, Tensor]], table: Tensor, partials: Tensor,
                      dtype: torch.dtype, aligned: bool = False) -> None:
        args = [chunks.chunk_layer, chunks.chunk_start, chunks.numel]
        for k in self.reduce_slots:
            args += list(slots[k])
        args += [table, partials, chunks.n_chunks]
        with _launching():
            self.module.reduce_kernel[(chunks.n_chunks,)](
                *args, NC=table.shape[1], NR=partials.shape[1], S_DT=_tl_dtype(dtype), CHUNK=int(CONFIG["chunk"]),
                BLOCK=int(CONFIG["block"]), ALIGNED=aligned, num_warps=int(CONFIG["warps"]))

    def layer_sums(self, chunks: Any, partials: Tensor, n_layers: int) -> Tensor:
        """Per-layer sums ``[layers, reductions]`` of the reduce kernel's per-chunk partials."""
        out = torch.empty(n_layers, partials.shape[1], dtype=partials.dtype, device=partials.device)
        if n_layers:
            with _launching():
                self.module.layer_sum_kernel[(n_layers,)](partials, chunks.layer_first, chunks.layer_last, out,
                                                          NR=partials.shape[1], ROWS=64)
        return out

    def launch_apply(self, chunks: Any, slots: dict[str, tuple[Tensor, Tensor]], table: Tensor, skip: Tensor,
                     dtype: torch.dtype, aligned: bool = False, partials: Tensor | None = None, *,
                     steps: Tensor, salt: int) -> None:
        """Launch the apply kernel; ``skip`` is the skip mask, or with a riding predict the per-layer flag and
        ``partials`` the ``[chunks, columns]`` buffer of its sums. ``steps`` (the group's step counter, on the
        device) and ``salt`` make the keys of the writes stochastically rounded into bfloat16 slots
        (:mod:`kalmanopt.engines.rounding`)."""
        args = [chunks.chunk_layer, chunks.chunk_start, chunks.numel, skip, steps, salt]
        for k in self.apply_slots:
            args += list(slots[k])
        args += [table, table if partials is None else partials, chunks.n_chunks]
        with _launching():
            self.module.apply_kernel[(chunks.n_chunks,)](
                *args, NC=table.shape[1], NR=1 if partials is None else partials.shape[1], S_DT=_tl_dtype(dtype),
                CHUNK=int(CONFIG["chunk"]), BLOCK=int(CONFIG["block"]), ALIGNED=aligned,
                num_warps=int(CONFIG["warps"]))


def _launching() -> Any:
    """Around a launch: in Triton's interpreter, numpy's floating-point warnings off (a GPU makes ∞ and NaN
    silently; the step's own checks report what matters)."""
    if interpreting():
        import numpy

        return numpy.errstate(all="ignore")
    return contextlib.nullcontext()


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def _cache_dir() -> str:
    base = os.environ.get("KALMANOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kalmanopt")
    path = os.path.join(base, "triton")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        path = os.path.join(tempfile.gettempdir(), "kalmanopt-triton")
        os.makedirs(path, exist_ok=True)
    return path


@functools.lru_cache(maxsize=256)
def kernels_for(pre: tuple[Assign, ...], reductions: tuple[Reduction, ...], program: tuple[Assign, ...],
                outputs: tuple[str, ...], slots: tuple[str, ...], ride: Ride = ()) -> Kernels:
    """The kernels of a declaration (generated, written, imported once); ``ride``: a riding predict."""
    source, reduce_coefs, reduce_slots, apply_coefs, apply_slots = source_for(pre, reductions, program, outputs,
                                                                              slots, ride)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = os.path.join(_cache_dir(), f"kernels_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"kalmanopt_kernels_{digest}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return Kernels(module, reduce_coefs, reduce_slots, apply_coefs, apply_slots, len(reductions),
                   len(ride[0]) if ride else 0)
