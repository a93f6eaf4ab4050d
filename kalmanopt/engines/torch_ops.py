"""The two-pass step in torch operations: the ``foreach`` engine, and the reference engine's core.

Per group and step: pass 1 evaluates the parts' reductions layer by layer (dot products), the
coefficients are computed for all layers at once (:func:`kalmanopt.contract.run_update_coefficients`),
and pass 2 runs the parts' element-wise programs (:mod:`kalmanopt.program`) in place. Nothing here
names a part: the engine executes their declarations.

Where a branch needs a value (a skipped layer, a non-finite step) the engine reads it on the CPU,
where that is free; on other devices it masks the writes, so a ``foreach`` step never synchronises
with the host. (``host_branches=True``, the reference engine, reads it everywhere.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.contract import CoefficientStage
from kalmanopt.engines import buckets
from kalmanopt.engines import compiled as compiled_coefficients
from kalmanopt.engines.distributed import is_sharded, local_tensor
from kalmanopt.engines.rounding import RoundingKeys, round_into
from kalmanopt.engines.runtime import GroupRuntime, Runtime
from kalmanopt.layers import Layer
from kalmanopt.plan import (
    PredictPlan,
    UpdatePlan,
    contract_gap,
    plan_key,
    predict_plan,
    run_predict_coefficients,
    run_update_coefficients,
    update_plan,
)
from kalmanopt.program import PreparedProgram, hp_coefficients, prepare_program, reduce_layer
from kalmanopt.scratch import Scratch
from kalmanopt.state import StateTable

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["TorchEngine", "ForeachEngine", "FlatLayer", "GroupContext", "has_gradient", "flat_layers", "UPDATE",
           "PREDICT", "rounding_salt"]


def has_gradient(layer: Layer) -> bool:
    """Whether any parameter of the layer has a gradient (known on the host)."""
    return any(p.grad is not None for p in layer.params)


class GroupContext:
    """One parameter group as the driver hands it to an engine.

    Args:
        composition: the parts.
        group: the ``param_group``.
        group_state: the group's shared state.
        layers: the group's layers, or a function that builds them (built on first use: an engine's
            steady state may never need them).
        diagnostics: whether per-layer diagnostics are recorded.
        state: the optimizer's per-parameter state mapping (read by engines that cache per-step plans).
        runtime: the optimizer's step-to-step bookkeeping (:class:`~kalmanopt.engines.runtime.Runtime`): every
            cache an engine keeps lives there (a fresh one, caching for this call only, if none is given).
        index: the group's position in ``param_groups`` (its entry in the runtime).
        ride_predict: an update: the predict of the next step follows it at once (``step()``), so an engine may
            run a riding predict (``Dynamics.predict_rides_on_update``) in the update's element-wise pass.
        ridden: a predict that follows such an update: an engine whose update ran it has only its
            coefficients left to compute.
    """

    def __init__(self, composition: Composition, group: dict[str, Any], group_state: dict,
                 layers: Sequence[Layer] | Callable[[], Sequence[Layer]], diagnostics: bool = False,
                 state: Mapping[Any, Any] | None = None, runtime: Runtime | None = None, index: int = 0,
                 ride_predict: bool = False, ridden: bool = False) -> None:
        self.composition, self.group, self.group_state = composition, group, group_state
        self.diagnostics = diagnostics
        self.state = state
        self.runtime = Runtime() if runtime is None else runtime
        self.index = index
        self.ride_predict, self.ridden = ride_predict, ridden
        self._layers = layers

    @property
    def kept(self) -> GroupRuntime:
        """This group's entry in the runtime."""
        return self.runtime.group(self.index, self.group)

    @property
    def layers(self) -> Sequence[Layer]:
        """The group's layers (built on first use)."""
        if callable(self._layers):
            self._layers = self._layers()
        return self._layers


class FlatLayer:
    """A layer's θ and g as flat vectors in the state precision, with its state vectors.

    A single contiguous parameter already in that precision is used in place (a view);
    otherwise θ is a copy and :meth:`commit` writes it back. A DTensor parameter (FSDP2) is
    represented by its local shard (``sharded`` is then True: the layer's sums are partial).
    A state vector stored in a narrower precision (``state_dtype="bfloat16"``) is widened into a copy
    the programs run on, and :meth:`commit` rounds it back stochastically with the keys of ``rounding``
    (:mod:`kalmanopt.engines.rounding`).
    """

    def __init__(self, layer: Layer, table: StateTable, rounding: RoundingKeys | None = None) -> None:
        self.layer = layer
        params = [local_tensor(p) for p in layer.params]
        grads = [None if p.grad is None else local_tensor(p.grad) for p in layer.params]
        self.sharded = any(is_sharded(p) for p in layer.params)
        self.params = params
        dtype = layer.dtype
        self.direct = len(params) == 1 and params[0].is_contiguous() and params[0].dtype == dtype
        self.theta = params[0].detach().view(-1) if self.direct else \
            torch.cat([p.detach().reshape(-1).to(dtype) for p in params])
        g0 = grads[0]
        if len(params) == 1 and g0 is not None and g0.is_contiguous() and g0.dtype == dtype:
            g = g0.detach().view(-1)
        elif all(g is None for g in grads):
            g = torch.zeros_like(self.theta)
        else:  # (in a global layer a parameter without a gradient contributes zeros)
            g = torch.cat([(torch.zeros_like(p) if gi is None else gi).detach().reshape(-1).to(dtype)
                           for p, gi in zip(params, grads)])
        self.env: dict[str, Tensor] = {"theta": self.theta, "g": g}
        self.rounding = rounding
        self.narrow: dict[str, Tensor] = {}
        for e in table.vectors:
            stored = layer.state[e.name]
            if stored.dtype == torch.bfloat16 and dtype != torch.bfloat16:
                self.narrow[e.name] = stored
                stored = stored.to(dtype)
            self.env[f"state.{e.name}"] = stored

    def commit(self) -> None:
        """Write θ back to the parameters (their local shards) if it is a copy, and the widened state vectors
        back into their storage, stochastically rounded."""
        if not self.direct:
            Layer(self.params, {}, self.layer.name).write(self.theta)
        if self.narrow:
            if self.rounding is None:
                raise RuntimeError(f"{self.layer.name}: a state vector stored in a narrower precision has no "
                                   "rounding keys")  # (an engine builds every FlatLayer that writes with them)
            for name, stored in self.narrow.items():
                round_into(stored, self.env[f"state.{name}"], self.rounding.key(name))


#: the phases of a step, as the rounding keys' salt counts them (``2 · group + phase``)
UPDATE, PREDICT = 0, 1


def rounding_salt(ctx: GroupContext, phase: int) -> int:
    """The salt of this group's rounding keys in ``phase`` (:data:`UPDATE` or :data:`PREDICT`)."""
    return 2 * ctx.index + phase


def flat_layers(layers: Sequence[Layer], table: StateTable, ctx: GroupContext, phase: int) -> list[FlatLayer]:
    """The layers as :class:`FlatLayer`, each with its rounding keys for ``phase`` (where vectors are narrow)."""
    narrow = any(layer.vector_dtype != layer.dtype for layer in layers) and bool(table.vectors)
    if not narrow:
        return [FlatLayer(layer, table) for layer in layers]
    steps, salt = ctx.group_state["steps"], rounding_salt(ctx, phase)
    return [FlatLayer(layer, table, RoundingKeys(steps, salt, i)) for i, layer in enumerate(layers)]


def local_numel(layer: Layer) -> int:
    """The number of elements of the layer on this rank (its local shards; all of it unless sharded)."""
    return sum(local_tensor(p).numel() for p in layer.params)


@dataclass
class _Work:
    """What pass 1 leaves for pass 2."""

    ctx: GroupContext
    flats: list[FlatLayer]
    program: PreparedProgram
    hp: dict[str, float]
    n_none: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: per row of the reductions: whether the layer is sharded over ranks (its sums are this rank's part)
    sharded: list[bool] = field(default_factory=list)


class TorchEngine:
    """The two-pass step in torch operations, for compositions whose parts meet the contract."""

    name = "foreach"
    device_step = True
    #: whether the coefficient functions run compiled on CUDA (:mod:`kalmanopt.engines.compiled`); off here:
    #: the foreach engine is the fallback that runs anything at once, with no compilation on first use
    compile_coefficients = False

    def __init__(self, host_branches: bool = False) -> None:
        self.host_branches = host_branches

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        return contract_gap(composition)

    # ------------------------------------------------------------------ plans
    def _update_plan(self, ctx: GroupContext) -> tuple[UpdatePlan, tuple[PreparedProgram, PreparedProgram]]:
        """The update's plan and its compiled pre-program (H) and program, cached per structure."""
        def make() -> tuple[UpdatePlan, tuple[PreparedProgram, PreparedProgram]]:
            plan = update_plan(ctx.composition, ctx.group, ctx.diagnostics)
            return plan, (prepare_program(plan.pre, ()), prepare_program(plan.program, plan.outputs))

        return ctx.runtime.cached("plans", ("update", plan_key(ctx.group, ctx.diagnostics)), make)

    def _predict_plan(self, ctx: GroupContext) -> tuple[PredictPlan, PreparedProgram]:
        def make() -> tuple[PredictPlan, PreparedProgram]:
            plan = predict_plan(ctx.composition, ctx.group)
            return plan, prepare_program(plan.program, plan.outputs)

        return ctx.runtime.cached("plans", ("predict", plan_key(ctx.group, False)), make)

    @staticmethod
    def _ensure_state(table: StateTable, layers: Sequence[Layer], group: Mapping[str, Any]) -> list[bool]:
        """Create missing per-layer state; which layers got new state."""
        if not table.has_layer_state():
            return [False] * len(layers)
        keys = table.layer_keys
        # (a layer that has its state already costs a few dictionary lookups: the common case, every step)
        return [False if all(k in layer.state for k in keys) else
                table.init_layer(layer.state, local_numel(layer), group, layer.dtype, layer.params[0].device,
                                 layer.vector_dtype)
                for layer in layers]

    def _host(self, like: Tensor) -> bool:
        return self.host_branches or like.device.type == "cpu"

    # ------------------------------------------------------------------ update
    def reduce_update(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Pass 1: the layers' reductions ``[layers]`` each, their scalar state, their sizes."""
        plan, (pre, program) = self._update_plan(ctx)
        active = [layer for layer in ctx.layers if has_gradient(layer)]
        created = self._ensure_state(plan.table, active, ctx.group)
        flats = flat_layers(active, plan.table, ctx, UPDATE)
        hp = hp_coefficients(ctx.group)
        like = ctx.group_state["R"]
        names = [r.name for r in plan.reductions]
        ranges = self._bucketed(flats, like, ctx.runtime)
        table = self._sums(flats, ranges, plan.pre, pre, plan.reductions, hp, like, self._scratch(ctx.runtime, like))
        red = {name: table[:, i] for i, name in enumerate(names)}
        scalars = {e.name: (torch.stack([f.layer.state[e.name] for f in flats]).to(like) if flats
                            else like.new_zeros(0)) for e in plan.table.scalars}
        numel = ctx.runtime.int64([f.layer.numel for f in flats], like.device)
        work = _Work(ctx, flats, program, hp, n_none=len(ctx.layers) - len(active), sharded=[f.sharded for f in flats])
        work.extra["created"] = (created, plan.table.layer_keys)
        work.extra.update(pre=(plan.pre, pre), buckets=ranges)
        return work, red, scalars, numel

    def _scratch(self, runtime: Runtime, like: Tensor) -> Scratch | None:
        """The pool the layer-by-layer host path borrows its temporaries from: on the CPU, where a fresh
        layer-sized tensor costs its page faults (:mod:`kalmanopt.scratch`); None elsewhere (CUDA's caching
        allocator reuses memory already)."""
        return runtime.scratch if like.device.type == "cpu" and self._host(like) else None

    def _bucketed(self, flats: Sequence[FlatLayer], like: Tensor,
                  runtime: Runtime) -> list[tuple[int, int, buckets.Layout | None]] | None:
        """The buckets of the layers where the engine masks on the device (see :mod:`buckets`), each with its
        layout (None for a layer on its own), else None."""
        if self._host(like) or len(flats) < 2 or not buckets.CONFIG["elements"]:
            return None
        return [(start, stop, buckets.layout(runtime, [f.env["theta"].numel() for f in flats[start:stop]], like.device)
                 if stop - start > 1 else None) for start, stop in buckets.plan_buckets([f.env for f in flats])]

    def _sums(self, flats: Sequence[FlatLayer], ranges: list[tuple[int, int, buckets.Layout | None]] | None,
              pre_assigns: Sequence[Any], pre: PreparedProgram | None, reductions: Sequence[Any], hp: dict[str, float],
              like: Tensor, scratch: Scratch | None = None) -> Tensor:
        """Pass 1: ``[layers, reductions]`` (the pre-program run first: H_ℓ = g_ℓ + wd θ_ℓ), bucket by bucket
        over ``ranges`` (:meth:`_bucketed`), else layer by layer. A layer's H is kept for pass 2, or, with a
        ``scratch`` pool, given back (pass 2 computes it again: one layer's temporaries in memory at a time)."""
        blocks = []
        for start, stop, where in ranges or [(i, i + 1, None) for i in range(len(flats))]:
            if where is not None:
                envs = [f.env for f in flats[start:stop]]
                blocks.append(buckets.bucket_sums(envs, pre_assigns, pre, reductions, hp, where, like))
                continue
            f = flats[start]
            if pre is not None:
                pre.run(f.env, hp, scratch=scratch)
            row = torch.stack(reduce_layer(reductions, f.env, hp, like, scratch)).to(like) if reductions \
                else like.new_zeros(0)
            if pre is not None and scratch is not None:
                pre.release(f.env, scratch)
            blocks.append(row[None])
        return torch.cat(blocks) if blocks else like.new_zeros(0, len(reductions))

    def update_coefficients(self, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        """The coefficients of all layers at once (every part's batched function; compiled on CUDA)."""
        compiled = self._compiled_coefficients(b)
        return run_update_coefficients(composition, b) if compiled is None else compiled.update(composition, b)

    def _compiled_coefficients(self, b: CoefficientStage) -> compiled_coefficients.CompiledCoefficients | None:
        """The compiled coefficient functions where the engine wants them (on CUDA), else None."""
        if not (self.compile_coefficients and b.like.is_cuda and compiled_coefficients.CONFIG["enabled"]):
            return None
        return compiled_coefficients.CODE_CACHE

    def apply_update(self, work: _Work, b: CoefficientStage) -> None:
        """Pass 2: the element-wise programs on the layers that update; layer and group state; counters."""
        ctx = work.ctx
        self._run_programs(work.flats, work.program, work.hp, b, work.extra.get("pre"), work.extra.get("buckets"),
                           self._scratch(ctx.runtime, b.like))
        self._commit_layer_scalars(work.flats, b)
        self._commit_group(ctx.group_state, b)
        if work.n_none:  # (the layers without a gradient; none: nothing to add, no kernel)
            b.count("skipped_layers", torch.full((), work.n_none, dtype=torch.int64, device=b.ok.device))
        self._commit_counters(ctx.group_state, b)
        self._forget_skipped_new_state([f.layer for f in work.flats], work, b)

    def _forget_skipped_new_state(self, layers: Sequence[Layer], work: _Work, b: CoefficientStage) -> None:
        """As if never touched: a layer skipped at its first update keeps no state (free to check on the CPU;
        elsewhere its state stays at its initial values, which mark "no update yet")."""
        created, keys = work.extra.get("created", ((), ()))
        if any(created) and self._host(b.like):
            for layer, new, skipped in zip(layers, created, b.skip.tolist()):
                if new and skipped:
                    for key in keys:
                        layer.state.pop(key, None)

    def _run_programs(self, flats: list[FlatLayer], program: PreparedProgram, hp: dict[str, float],
                      b: CoefficientStage, pre: tuple[Sequence[Any], PreparedProgram] | None = None,
                      ranges: list[tuple[int, int, buckets.Layout | None]] | None = None,
                      scratch: Scratch | None = None) -> None:
        """Pass 2: ``program`` on every layer (where it updates). ``ranges``: pass 1's buckets; ``pre``: the
        update's pre-program, which a bucket runs again on its concatenated vectors (a layer on its own kept
        its result from pass 1, unless it gave it back to ``scratch``, the pool its temporaries come from)."""
        if not flats or not program.program:
            return
        names = list(b.coef)
        n = len(flats)
        like = b.like
        cols = [b.coef[k].to(like).expand(n) for k in names]
        table = torch.stack(cols, 1) if cols else like.new_zeros(n, 0)
        host = self._host(like)
        if host:
            skipped = b.skip.tolist()
            rows = table.tolist()
        else:
            keep = ~b.skip
        in_bucket = [False] * n
        for start, stop, where in ranges or []:
            if where is None:
                continue
            envs = [f.env for f in flats[start:stop]]
            buckets.run_bucket_program(envs, *(pre or ((), None)), program, hp, names, table[start:stop],
                                       keep[start:stop], where)
            for i in range(start, stop):
                in_bucket[i] = True
                flats[i].commit()
        if not host and not all(in_bucket):
            rows = [row.unbind(0) for row in table.unbind(0)]
        for i, f in enumerate(flats):
            if in_bucket[i]:
                continue
            coefs = dict(hp)
            coefs.update(zip(names, rows[i]))
            if host:
                if skipped[i]:
                    continue
                if scratch is None:
                    program.run(f.env, coefs)
                else:
                    self._run_borrowing(f.env, program, coefs, pre[1] if pre else None, hp, scratch)
            else:  # masked: a skipped layer keeps every value it had
                old = {k: f.env[k].clone() for k in program.outputs}
                program.run(f.env, coefs)
                for k, value in old.items():
                    f.env[k].copy_(torch.where(keep[i], f.env[k], value))
            f.commit()

    @staticmethod
    def _run_borrowing(env: dict[str, Tensor], program: PreparedProgram, coefs: dict[str, Any],
                       pre: PreparedProgram | None, hp: dict[str, float], scratch: Scratch) -> None:
        """One layer's pass 2 with its temporaries from ``scratch``: the pre-program again (pass 1 gave its H
        back), the program, and every temporary given back."""
        if pre is not None:
            pre.run(env, hp, scratch=scratch)
        program.run(env, coefs, scratch=scratch)
        program.release(env, scratch)
        if pre is not None:
            pre.release(env, scratch)

    @staticmethod
    def _commit_layer_scalars(flats: list[FlatLayer], b: CoefficientStage) -> None:
        for name, new in b.new_layer.items():
            if not flats:
                continue
            values = torch.where(b.skip, b.layer[name], new.to(b.layer[name]))
            torch._foreach_copy_([f.layer.state[name] for f in flats], list(values.unbind(0)))

    @staticmethod
    def _commit_group(group_state: dict, b: CoefficientStage) -> None:
        for name, new in b.new_group.items():
            old = group_state[name]
            torch.where(b.ok, new.to(old), old, out=old)  # (in place, element by element)

    @staticmethod
    def _commit_counters(group_state: dict, b: CoefficientStage) -> None:
        for name, n in b.counters.items():
            if name in group_state:
                group_state[name].add_(torch.where(b.ok, n, 0).to(group_state[name]))

    # ------------------------------------------------------------------ predict
    def reduce_predict(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], Tensor]:
        """The predict's pass 1 over every layer (nothing when the dynamics do not move the state)."""
        plan, program = self._predict_plan(ctx)
        like = ctx.group_state["R"]
        hp = hp_coefficients(ctx.group)
        if not plan.moves:
            work = _Work(ctx, [], program, hp)
            return work, {}, like.new_zeros(0, dtype=torch.int64)
        layers = list(ctx.layers)
        self._ensure_state(plan.table, layers, ctx.group)
        flats = flat_layers(layers, plan.table, ctx, PREDICT)
        names = [r.name for r in plan.reductions]
        ranges = self._bucketed(flats, like, ctx.runtime)
        table = self._sums(flats, ranges, (), None, plan.reductions, hp, like, self._scratch(ctx.runtime, like))
        red = {name: table[:, i] for i, name in enumerate(names)}
        numel = ctx.runtime.int64([f.layer.numel for f in flats], like.device)
        work = _Work(ctx, flats, program, hp, sharded=[f.sharded for f in flats])
        work.extra["buckets"] = ranges
        return work, red, numel

    def predict_coefficients(self, composition: Composition, b: CoefficientStage) -> CoefficientStage:
        """The predict's batched coefficients and group state (compiled on CUDA)."""
        compiled = self._compiled_coefficients(b)
        return run_predict_coefficients(composition, b) if compiled is None else compiled.predict(composition, b)

    def apply_predict(self, work: _Work, b: CoefficientStage) -> None:
        """The predict's element-wise pass (where the step is ok) and group state."""
        self._run_programs(work.flats, work.program, work.hp, b, ranges=work.extra.get("buckets"),
                           scratch=self._scratch(work.ctx.runtime, b.like))
        self._commit_group(work.ctx.group_state, b)


class ForeachEngine(TorchEngine):
    """``implementation="foreach"``: any device, no host synchronisation, every contract composition."""

    name = "foreach"
    device_step = True

    def graph_token(self, ctx: GroupContext) -> tuple | None:
        """What a captured step of this group depends on (see :mod:`kalmanopt.engines.graphs`): the buffers of
        its parameters, gradients, layer state and group state; None off CUDA. The device path runs no host
        branch and no host synchronisation, so once these stay put a step is the same kernels on the same
        memory."""
        params = ctx.group["params"]
        if self.host_branches or not params or params[0].device.type != "cuda" or ctx.state is None:
            return None
        token: list[Any] = [id(params), ctx.group.get("granularity")]
        token.extend((k, v.data_ptr()) for k, v in ctx.group_state.items() if isinstance(v, Tensor))
        for p in params:
            grad = p.grad
            token.append(local_tensor(p).data_ptr())
            token.append(0 if grad is None else local_tensor(grad).data_ptr())
            state = ctx.state.get(p)
            if state:
                token.extend((k, v.data_ptr()) for k, v in state.items() if isinstance(v, Tensor))
        return tuple(token)
