"""The fused engine (``implementation="fused"``): Triton kernels generated from the parts' declarations.

For each update (and each predict that moves the state) the engine turns the parts' reductions and
element-wise programs (:mod:`kalmanopt.program`) into two Triton kernels, compiled once per
distinct declaration and cached (:mod:`kalmanopt.engines.triton_source`):

    reduce   per chunk of a layer: the pre-program (H = g + wd θ) and every reduction, partial sums
    (sum)    per-layer sums of the partials (deterministic segment sums, no atomics)
    (coef)   the parts' batched coefficient functions on ``[layers]`` tensors, compiled by
             ``torch.compile`` into a few kernels (:mod:`kalmanopt.engines.compiled`)
    apply    per chunk of a layer that updates: the programs, in reverse chunk order (what the
             reduction pass read last is still in L2)

Under ``step()`` a predict that may ride on the update (``Dynamics.predict_rides_on_update``, KOALA-M's)
runs inside the update's apply kernel: its sums over the updated vectors as partials of that kernel, its
program after the update's; the predict phase that follows computes its coefficients only.

A part is fast here without touching the engine: it only declares. DTensor parameters (FSDP2) run on
their local shards; the step driver sums the sharded layers' partial reductions over the ranks between
the passes. Groups the kernels cannot address (a global layer of several tensors, mixed dtypes) run on
the multi-tensor torch operations of :class:`~kalmanopt.engines.torch_ops.TorchEngine`.
Triton is imported only when a fused step first runs.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from kalmanopt.contract import CoefficientStage
from kalmanopt.engines import triton_source
from kalmanopt.engines.distributed import is_sharded, local_tensor
from kalmanopt.engines.runtime import Runtime
from kalmanopt.engines.torch_ops import (
    PREDICT,
    UPDATE,
    GroupContext,
    TorchEngine,
    _Work,
    has_gradient,
    local_numel,
    rounding_salt,
)
from kalmanopt.engines.triton_config import CONFIG, interpreting, triton_available
from kalmanopt.engines.triton_source import slot_traffic
from kalmanopt.layers import Layer
from kalmanopt.plan import contract_gap, predict_plan, update_plan
from kalmanopt.program import Assign, Reduction, hp_coefficients

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.composition import Composition

__all__ = ["FusedEngine", "CONFIG", "triton_available", "interpreting", "MemoryTraffic", "memory_traffic"]



@dataclass(frozen=True)
class MemoryTraffic:
    """The per-parameter vectors one fused step reads and writes, by pass (each one access per element).

    ``step(loss=...)`` runs the update's reduction and element-wise passes, then the predict's where the
    dynamics move the state, unless the predict rides on the update's element-wise pass
    (``Dynamics.predict_rides_on_update``, KOALA-M's: then its reductions and moves happen in that pass;
    the two-phase API runs them in passes of their own). For comparison, AdamW's fused step makes 7
    accesses (it reads g, θ, m and v, and writes θ, m and v): on a model large enough to be bound by
    memory bandwidth, the ratio of the accesses is the floor of the ratio of the step times.
    """

    update_reduce: tuple[str, ...]
    update_reads: tuple[str, ...]
    update_writes: tuple[str, ...]
    predict_reduce: tuple[str, ...] = ()
    predict_reads: tuple[str, ...] = ()
    predict_writes: tuple[str, ...] = ()

    @property
    def accesses(self) -> int:
        """Reads and writes per parameter in one step, over every pass."""
        return sum(map(len, (self.update_reduce, self.update_reads, self.update_writes, self.predict_reduce,
                             self.predict_reads, self.predict_writes)))

    @property
    def passes(self) -> int:
        """How many times the step sweeps the parameters."""
        return sum(1 for p in (self.update_reduce, self.update_reads, self.predict_reduce, self.predict_reads) if p)


def memory_traffic(composition: Composition, group: Mapping[str, Any], diagnostics: bool = False) -> MemoryTraffic:
    """What the fused engine's generated kernels read and write per parameter for ``composition`` with the
    options of ``group`` (a ``param_group``: its ``weight_decay``, ``r`` and ``guard`` shape the programs),
    from the same declarations the kernels are generated from; no GPU needed.

    Example::

        opt = kalmanopt.create("koala++", model.parameters())
        memory_traffic(opt.filter, opt.param_groups[0]).accesses   # 10 (AdamW fused: 7)

    Raises:
        ValueError: the composition does not meet the two-pass contract (it runs on the reference path).
    """
    gap = contract_gap(composition)
    if gap is not None:
        raise ValueError(f"the composition does not run on the fused engine: {gap}")
    update = update_plan(composition, group, diagnostics)
    reduce, reads, writes = slot_traffic(update.pre, update.reductions, update.program, update.outputs,
                                         _slot_names(update.table, with_grads=True))
    predict = predict_plan(composition, group)
    if predict.rides:  # one element-wise pass for the update and the next predict
        reduce, reads, writes = slot_traffic(update.pre, update.reductions, update.program, update.outputs,
                                             _slot_names(update.table, with_grads=True),
                                             (predict.reductions, predict.program, predict.outputs))
    moves = slot_traffic((), predict.reductions, predict.program, predict.outputs,
                         _slot_names(predict.table, with_grads=False)) \
        if predict.moves and not predict.rides else ([], [], [])
    return MemoryTraffic(*(tuple(x) for x in (reduce, reads, writes, *moves)))


def _slot_names(table: Any, with_grads: bool) -> list[str]:
    """The vectors a kernel can address, in the order of its arguments: θ, g (an update), the state table's."""
    return ["theta", *(["g"] if with_grads else []), *(f"state.{e.name}" for e in table.vectors)]




class _Chunks:
    """The chunk tables of a list of layer sizes (cached: they change only with the layers)."""

    def __init__(self, numels: Sequence[int], chunk: int, device: torch.device) -> None:
        chunk_layer, chunk_start, counts = [], [], []
        for li, n in enumerate(numels):
            starts = list(range(0, n, chunk))
            chunk_layer += [li] * len(starts)
            chunk_start += starts
            counts.append(len(starts))
        self.n_chunks = len(chunk_layer)

        def to_device(values: list[int], dtype: torch.dtype) -> Tensor:
            host = torch.tensor(values or [0], dtype=dtype)
            return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)

        self.chunk_layer = to_device(chunk_layer, torch.int32)
        self.chunk_start = to_device(chunk_start, torch.int64)
        self.numel = to_device(list(numels), torch.int64)
        self.counts = to_device(counts, torch.int64)
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        self.layer_first = to_device(firsts, torch.int64)
        self.layer_last = to_device([f + c for f, c in zip(firsts, counts)], torch.int64)


def _theta(layer: Layer) -> Tensor:
    """The layer's parameter as the kernels address it: its local shard for a DTensor (FSDP2)."""
    return local_tensor(layer.params[0]).detach()


def _grad(p: Tensor) -> Tensor | None:
    """A parameter's gradient as the kernels address it (its local shard for a DTensor), or None."""
    return None if p.grad is None else local_tensor(p.grad)


def _eligible(layers: Sequence[Layer], with_grads: bool) -> str | None:
    """Why the kernels cannot address these layers directly, or None."""
    if not layers:
        return "no layer"
    dtype = layers[0].params[0].dtype
    for layer in layers:
        if len(layer.params) != 1:
            return "a global layer of several tensors"
        p = layer.params[0]
        if p.dtype != dtype:
            return "mixed parameter dtypes"
        if with_grads and (p.grad is None or p.grad.dtype != p.dtype):
            return "a missing or differently typed gradient"
    return None


def _sharded(layers: Sequence[Layer]) -> list[bool]:
    """Per layer: whether it is a DTensor split over ranks (the kernels then run on its local shard)."""
    return [is_sharded(layer.params[0]) for layer in layers]


class _Staging:
    """Contiguous copies of the parameters and gradients the kernels cannot address in place (a
    channels_last convolution weight, a transposed view): kept from step to step, so their addresses
    stay put (a captured step replays them), filled before the passes and θ written back after."""

    def __init__(self, layers: Sequence[Layer], with_grads: bool) -> None:
        self.theta: dict[int, Tensor] = {}
        self.grad: dict[int, Tensor] = {}
        for i, layer in enumerate(layers):
            p = _theta(layer)
            if not p.is_contiguous():
                self.theta[i] = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            if with_grads and (not _grad(layer.params[0]).is_contiguous() or i in self.theta):
                self.grad[i] = torch.empty(p.shape, dtype=p.dtype, device=p.device)

    def thetas(self, layers: Sequence[Layer]) -> list[Tensor]:
        return [self.theta.get(i, _theta(layer)) for i, layer in enumerate(layers)]

    def grads(self, layers: Sequence[Layer]) -> list[Tensor]:
        return [self.grad.get(i, _grad(layer.params[0])) for i, layer in enumerate(layers)]

    def fill(self, layers: Sequence[Layer]) -> None:
        for i, buf in self.theta.items():
            buf.copy_(_theta(layers[i]))
        for i, buf in self.grad.items():
            buf.copy_(_grad(layers[i].params[0]))

    def write_back(self, layers: Sequence[Layer]) -> None:
        for i, buf in self.theta.items():
            _theta(layers[i]).copy_(buf)


#: the attribute an offset table carries: whether its offsets are multiples of 16 elements from a 16-byte
#: aligned base (kept on the table itself, so that clearing the cache never forgets it for a table in use)
_ALIGNED = "_kalmanopt_aligned"


def _slot(tensors: Sequence[Tensor], device: torch.device, runtime: Runtime | None = None) -> tuple[Tensor, Tensor]:
    """A base tensor and the element offset of each tensor from it (all of one dtype).

    Cached in the optimizer's ``runtime`` by the tensors' addresses (only the table is kept: holding a tensor
    would keep its memory, and FSDP2 hands new gradient buffers every step): the offset table is copied to
    the device only when they move.
    """
    base = tensors[0]
    ptrs = tuple(t.data_ptr() for t in tensors)

    def make() -> Tensor:
        offsets = [(p - ptrs[0]) // base.element_size() for p in ptrs]
        host, aligned = _host_offsets(offsets, ptrs[0], device)
        table = host.to(device, non_blocking=True)
        setattr(table, _ALIGNED, aligned)
        return table

    if runtime is None:
        return base, make()
    return base, runtime.slot_table((ptrs, base.dtype, str(device)), make)


def _host_offsets(offsets: list[int], base_ptr: int, device: torch.device) -> tuple[Tensor, bool]:
    """An offset table on the host (pinned where it goes to a GPU: copied without blocking) and whether the
    kernels may take it as aligned (a 16-byte aligned base, every offset a multiple of 16 elements)."""
    host = torch.tensor(offsets, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host, base_ptr % 16 == 0 and all(o % 16 == 0 for o in offsets)


class FusedEngine(TorchEngine):
    """Generated Triton kernels for every composition that meets the two-pass contract, on CUDA."""

    name = "fused"
    device_step = True
    compile_coefficients = True

    def __init__(self) -> None:
        super().__init__(host_branches=False)

    @staticmethod
    def runs_kernels(runtime: Runtime, index: int, group: dict[str, Any]) -> bool:
        """Whether group ``index`` of the optimizer whose runtime this is keeps a plan of the generated kernels
        (its updates run them, not the torch operations of the fallback)."""
        return runtime.group(index, group).steady is not None

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        gap = contract_gap(composition)
        if gap is not None:
            return gap
        params = group["params"]
        devices = sorted({str(p.device) for p in params})
        interpreted = devices == ["cpu"] and group.get("implementation") == "fused" and interpreting()
        if any(not d.startswith("cuda") for d in devices) and not interpreted:
            return (f"fused kernels need CUDA tensors, the parameters are on {', '.join(devices) or 'no device'}; "
                    "use implementation='foreach' (any device) or None")
        if len(devices) > 1:
            return f"fused kernels need the group's parameters on one device, got {', '.join(devices)}"
        if not triton_available():
            return "Triton is not installed"
        return None

    # ------------------------------------------------------------------ update
    def reduce_update(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        kept = ctx.kept
        kept.ridden = None  # (a predict that rode on an earlier update is over)
        plan, _ = self._update_plan(ctx)
        steady = self._steady(ctx, plan)
        if steady is None:
            active = [layer for layer in ctx.layers if has_gradient(layer)]
            if _eligible(active, with_grads=True) is not None:
                work, red, scalars, numel = super().reduce_update(ctx)
                work.extra["torch"] = True
                return work, red, scalars, numel
            created = self._ensure_state(plan.table, active, ctx.group)
            like = ctx.group_state["R"]
            staging = _Staging(active, with_grads=True)
            slots = self._slots(active, plan.table, staging, with_grads=False, runtime=ctx.runtime)  # (g: bind)
            steady = _SteadyPlan(ctx, plan, active, slots,
                                 self._chunk_tables(ctx.runtime, [local_numel(x) for x in active], like.device),
                                 complete=len(active) == len(ctx.layers), staging=staging,
                                 numel=ctx.runtime.int64([x.numel for x in active], like.device))
            if steady.complete and ctx.state is not None:
                kept.steady = steady
            n_none = len(ctx.layers) - len(active)
        else:
            created = [False] * len(steady.layers)
            n_none = 0
        active, chunks = steady.layers, steady.chunks
        slots = steady.bind(active)
        steady.staging.fill(active)
        like = ctx.group_state["R"]
        hp = hp_coefficients(ctx.group)
        red_names = [r.name for r in plan.reductions]
        ride = self._ride(ctx, n_none)
        kernels = _kernels(plan.pre, plan.reductions, plan.program, plan.outputs, slots.keys(),
                           (ride.reductions, ride.program, ride.outputs) if ride is not None else ())
        table = _coef_table(kernels.reduce_coefs, hp, {}, len(active), like)
        partials = torch.zeros(max(chunks.n_chunks, 1), _pow2(len(red_names)), dtype=like.dtype, device=like.device)
        if chunks.n_chunks:
            kernels.launch_reduce(chunks, slots, table, partials, like.dtype, _aligned(slots))
        sums = kernels.layer_sums(chunks, partials, len(active))
        red = {name: sums[:, i] for i, name in enumerate(red_names)}
        scalars = {e.name: _gather_scalars(active, e.name, like) for e in plan.table.scalars}
        work = _Work(ctx, [], None, hp, n_none=n_none, sharded=steady.sharded)  # type: ignore[arg-type]
        work.extra.update(layers=active, chunks=chunks, slots=slots, kernels=kernels,
                          created=(created, plan.table.layer_keys), staging=steady.staging, ride=ride,
                          numel=steady.numel)
        return work, red, scalars, steady.numel

    def _ride(self, ctx: GroupContext, n_none: int) -> Any:
        """The predict plan to run in this update's element-wise pass, or None: where the predict follows
        at once (``ctx.ride_predict``), the dynamics' program may ride, and every layer updates (a layer
        without a gradient would need a predict pass of its own)."""
        if not ctx.ride_predict or n_none:
            return None
        plan, _ = self._predict_plan(ctx)
        return plan if plan.rides else None

    def graph_token(self, ctx: GroupContext) -> tuple | None:
        """What a captured step depends on, or None if the group has no steady plan that fits this step (see
        :mod:`kalmanopt.engines.graphs`): the steady plan, the parameters' addresses, the staged gradients'
        addresses (their copies are captured) and the gradients' alignment. Gradients that move otherwise are
        followed through their offset table, which the plan rewrites in place."""
        plan, _ = self._update_plan(ctx)
        steady = self._steady(ctx, plan)
        if steady is None:
            return None
        staged = tuple(steady.grad_ptrs[i] for i in sorted(steady.staging.grad))
        return id(steady), tuple(steady.theta_ptrs), staged, steady.gradients_aligned

    def _steady(self, ctx: GroupContext, plan: Any) -> _SteadyPlan | None:
        """The cached plan of this group if it still fits this step (host checks only), refreshed."""
        steady = ctx.kept.steady
        if steady is None or steady.plan is not plan or ctx.state is None:
            return None
        return steady if steady.fits(ctx) else None

    def apply_update(self, work: _Work, b: CoefficientStage) -> None:
        if work.extra.get("torch"):
            return super().apply_update(work, b)
        ctx = work.ctx
        layers: list[Layer] = work.extra["layers"]
        kernels = work.extra["kernels"]
        chunks = work.extra["chunks"]
        like = b.like
        table = _coef_table(kernels.apply_coefs, work.hp, b.coef, len(layers), like)
        skip = b.skip.to(torch.int32)
        ride = work.extra["ride"]
        partials = None
        if ride is not None:
            # per layer: 0 update and predict, 1 the predict only (the layer is skipped), 2 nothing (the step is)
            skip = skip + (~b.ok).to(torch.int32)
            partials = torch.zeros(max(chunks.n_chunks, 1), _pow2(kernels.n_ride_reductions), dtype=like.dtype,
                                   device=like.device)
        if chunks.n_chunks and kernels.has_apply:
            kernels.launch_apply(chunks, work.extra["slots"], table, skip, like.dtype, _aligned(work.extra["slots"]),
                                 partials, steps=ctx.group_state["steps"], salt=rounding_salt(ctx, UPDATE))
        work.extra["staging"].write_back(layers)
        if ride is not None:
            sums = kernels.layer_sums(chunks, partials, len(layers))
            red = {r.name: sums[:, i] for i, r in enumerate(ride.reductions)}
            ctx.kept.ridden = (red, work.extra["numel"], work.sharded, layers)
        for name, new in b.new_layer.items():
            _scatter_scalars(layers, name, b.skip, b.layer[name], new)
        self._commit_group(ctx.group_state, b)
        if work.n_none:  # (the layers without a gradient; none: nothing to add, no kernel)
            b.count("skipped_layers", torch.full((), work.n_none, dtype=torch.int64, device=b.ok.device))
        self._commit_counters(ctx.group_state, b)
        self._forget_skipped_new_state(layers, work, b)  # (CPU tensors only: the interpreter)

    # ------------------------------------------------------------------ predict
    def reduce_predict(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], Tensor]:
        kept = ctx.kept
        ridden, kept.ridden = kept.ridden, None
        if ridden is not None and ctx.ridden:  # its passes ran in the update's: the coefficients are left
            red, numel, sharded, layers = ridden
            work = _Work(ctx, [], None, hp_coefficients(ctx.group), sharded=sharded)  # type: ignore[arg-type]
            work.extra.update(ridden=True, layers=layers)  # (the rows of its sums: the update's layers)
            return work, red, numel
        plan, _ = self._predict_plan(ctx)
        if plan.moves:  # every layer gets its state, as on the other engines (an empty one included)
            self._ensure_state(plan.table, list(ctx.layers), ctx.group)
        layers = [layer for layer in ctx.layers if layer.numel > 0] if plan.moves else []
        if not plan.moves or _eligible(layers, with_grads=False) is not None:
            work, red, numel = super().reduce_predict(ctx)
            work.extra["torch"] = True
            return work, red, numel
        self._ensure_state(plan.table, layers, ctx.group)
        like = ctx.group_state["R"]
        hp = hp_coefficients(ctx.group)
        chunks = self._chunk_tables(ctx.runtime, [local_numel(layer) for layer in layers], like.device)
        params = [layer.params[0] for layer in layers]
        key = tuple(layer.numel for layer in layers)
        found = kept.staging.get(key)
        if found is not None and all(map(operator.is_, found[0], params)):
            staging = found[1]
        else:  # (kept: a replayed step reads the same buffers)
            if len(kept.staging) > 64:
                kept.staging.clear()
            staging = _Staging(layers, with_grads=False)
            kept.staging[key] = (params, staging)
        staging.fill(layers)
        slots = self._slots(layers, plan.table, staging, with_grads=False, runtime=ctx.runtime)
        kernels = _kernels((), plan.reductions, plan.program, plan.outputs, slots.keys())
        red_names = [r.name for r in plan.reductions]
        partials = torch.zeros(max(chunks.n_chunks, 1), _pow2(len(red_names)), dtype=like.dtype, device=like.device)
        if red_names and chunks.n_chunks:
            table = _coef_table(kernels.reduce_coefs, hp, {}, len(layers), like)
            kernels.launch_reduce(chunks, slots, table, partials, like.dtype, _aligned(slots))
        sums = kernels.layer_sums(chunks, partials, len(layers)) if red_names else partials[:0]
        red = {name: sums[:, i] for i, name in enumerate(red_names)}
        numel = ctx.runtime.int64([layer.numel for layer in layers], like.device)
        work = _Work(ctx, [], None, hp, sharded=_sharded(layers))  # type: ignore[arg-type]
        work.extra.update(layers=layers, chunks=chunks, slots=slots, kernels=kernels, staging=staging)
        return work, red, numel

    def apply_predict(self, work: _Work, b: CoefficientStage) -> None:
        if work.extra.get("ridden"):
            return self._commit_group(work.ctx.group_state, b)
        if work.extra.get("torch"):
            return super().apply_predict(work, b)
        kernels, chunks = work.extra["kernels"], work.extra["chunks"]
        like = b.like
        table = _coef_table(kernels.apply_coefs, work.hp, b.coef, len(work.extra["layers"]), like)
        if chunks.n_chunks and kernels.has_apply:
            kernels.launch_apply(chunks, work.extra["slots"], table, b.skip.to(torch.int32), like.dtype,
                                 _aligned(work.extra["slots"]), steps=work.ctx.group_state["steps"],
                                 salt=rounding_salt(work.ctx, PREDICT))
        work.extra["staging"].write_back(work.extra["layers"])
        self._commit_group(work.ctx.group_state, b)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _chunk_tables(runtime: Runtime, numels: list[int], device: torch.device) -> _Chunks:
        chunk = int(CONFIG["chunk"])
        return runtime.cached("chunks", (tuple(numels), chunk, str(device)), lambda: _Chunks(numels, chunk, device))

    @staticmethod
    def _slots(layers: list[Layer], table: Any, staging: _Staging, with_grads: bool,
               runtime: Runtime) -> dict[str, tuple[Tensor, Tensor]]:
        device = _theta(layers[0]).device

        def tensors(name: str) -> list[Tensor]:
            if name == "theta":
                return staging.thetas(layers)
            if name == "g":
                return staging.grads(layers)
            return [layer.state[name.removeprefix("state.")] for layer in layers]

        return {name: _slot(tensors(name), device, runtime) for name in _slot_names(table, with_grads)}


class _SteadyPlan:
    """A group's layers, slots and chunk tables, reused while the parameters, gradients and state stay put."""

    def __init__(self, ctx: GroupContext, plan: Any, layers: list[Layer], slots: dict[str, tuple[Tensor, Tensor]],
                 chunks: _Chunks, complete: bool, staging: _Staging, numel: Tensor) -> None:
        self.plan, self.layers, self.chunks, self.complete = plan, layers, chunks, complete
        # the gradients' slot keeps its offset table only: a gradient held from one step to the next would
        # keep its memory through the next backward (FSDP2's reduce-scatter buffers). Its offsets count from
        # θ's base, which stays put, and the table is rewritten in place when the gradients move (torch's
        # zero_grad(set_to_none=True) hands new buffers): a captured step replays on the new gradients.
        self.slots = slots  # θ's and the state's
        self.g_base = self.slots["theta"][0]
        self.staging = staging
        self.g_table = torch.zeros(len(layers), dtype=torch.int64, device=self.g_base.device)
        if not self._point_at(self.staging.grads(layers)):
            raise RuntimeError("a gradient is not addressable from its parameter's base")  # (same dtype: cannot)
        self.numel = numel  # the layers' sizes (whole, where the chunk tables hold the local shards')
        self.sharded = _sharded(layers)
        self.any_sharded = any(self.sharded)
        self.params = ctx.group["params"]
        self.n = len(self.params)
        self.keys = [e.name for e in plan.table.vectors] + [e.name for e in plan.table.scalars]
        self.dicts = list(map(ctx.state.get, self.params))  # type: ignore[union-attr]
        complete = all(d is not None for d in self.dicts) or not self.keys  # (KOALA-V keeps no layer state)
        # per state key, the tensor of each layer (a step checks that none was replaced: load_state_dict)
        self.refs = [(k, [d.get(k) if d is not None else None for d in self.dicts]) for k in self.keys] \
            if complete else None
        self.theta_ptrs = list(map(Tensor.data_ptr, self._thetas(self.params)))
        self.grad_ptrs = [g.data_ptr() if g is not None else 0 for g in self._grads(self.params)]

    def _thetas(self, params: Sequence[Tensor]) -> Sequence[Tensor]:
        return [local_tensor(p) for p in params] if self.any_sharded else params

    def _grads(self, params: Sequence[Tensor]) -> list[Tensor | None]:
        return list(map(_grad, params)) if self.any_sharded else [p.grad for p in params]

    def fits(self, ctx: GroupContext) -> bool:
        """Whether the plan still covers this step; rebinds moved gradients (host work only)."""
        params = ctx.group["params"]
        if params is not self.params or len(params) != self.n or ctx.group["granularity"] != "layer":
            return False
        if self.refs is None:
            return False
        grads = self._grads(params)
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            return False
        dicts = list(map(ctx.state.get, params))  # type: ignore[union-attr]
        if not all(map(operator.is_, dicts, self.dicts)):
            return False
        for key, refs in self.refs:
            if not all(map(operator.is_, map(dict.get, dicts, itertools.repeat(key)), refs)):
                return False
        if list(map(Tensor.data_ptr, self._thetas(params))) != self.theta_ptrs:
            return False
        ptrs = list(map(Tensor.data_ptr, grads))
        if ptrs != self.grad_ptrs:
            dtype = params[0].dtype
            staged = self.staging.grad
            if not all(g.dtype == dtype and (i in staged or g.is_contiguous()) for i, g in enumerate(grads)):
                return False
            if not self._point_at(self.staging.grads(self.layers)):
                return False
            self.grad_ptrs = ptrs
        return True

    def _point_at(self, grads: Sequence[Tensor]) -> bool:
        """Rewrite the gradients' offset table (in place, on the stream) for these buffers; False where one
        is not a whole number of elements from θ's base."""
        size = self.g_base.element_size()
        base = self.g_base.data_ptr()
        distances = [g.data_ptr() - base for g in grads]
        if any(d % size for d in distances):
            return False
        host, aligned = _host_offsets([d // size for d in distances], base, self.g_table.device)
        self.g_table.copy_(host, non_blocking=True)
        setattr(self.g_table, _ALIGNED, aligned)
        return True

    @property
    def gradients_aligned(self) -> bool:
        """Whether the gradients' offsets are all multiples of 16 elements (the kernels' alignment hint)."""
        return bool(getattr(self.g_table, _ALIGNED, False))

    def bind(self, layers: list[Layer]) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's slots: the kept ones and the gradients' (offsets from θ's base, see ``__init__``)."""
        slots = {"theta": self.slots["theta"], "g": (self.g_base, self.g_table)}
        slots.update(self.slots)  # (the kernels' argument order: θ, g, then the state)
        return slots


def _aligned(slots: dict[str, tuple[Tensor, Tensor]]) -> bool:
    """Whether every slot's base is 16-byte aligned and every offset a multiple of 16 elements."""
    return all(getattr(table, _ALIGNED, False) for _, table in slots.values())


def _pow2(n: int) -> int:
    """The smallest power of two ≥ max(n, 1) (the layer-sum kernel's column block)."""
    return 1 << max(n - 1, 0).bit_length()


def _coef_table(names: Sequence[str], hp: dict[str, float], coef: dict[str, Tensor], n: int, like: Tensor) -> Tensor:
    """The ``[layers, columns]`` coefficient table the kernels read (constants and hyper-parameters included)."""
    if not names:
        return like.new_zeros(max(n, 1), 1)
    cols = []
    for name in names:
        if name in coef:
            cols.append(coef[name].to(like).expand(n))
        elif name.startswith("__const:"):
            cols.append(like.new_full((n,), float(name.split(":", 1)[1])))
        else:
            cols.append(like.new_full((n,), hp[name]))
    return torch.stack(cols, 1).contiguous() if n else like.new_zeros(1, len(names))


def _holder(layers: list[Layer], name: str, n: int) -> Tensor | None:
    """The vector of ``n`` entries whose views the layers' scalars ``name`` are, or None."""
    holder = getattr(layers[0].state[name], "_base", None) if layers else None
    if holder is not None and holder.shape == (n,) and all(layer.state[name]._base is holder for layer in layers):
        return holder
    return None


def _gather_scalars(layers: list[Layer], name: str, like: Tensor) -> Tensor:
    """The layers' scalar ``name`` as one vector: the vector they are views of, when they are (read as it is:
    only :func:`_scatter_scalars` writes it, after the step's last read), else a stacked copy."""
    if not layers:
        return like.new_zeros(0)
    holder = _holder(layers, name, len(layers))
    if holder is not None:
        return holder
    return torch.stack([layer.state[name] for layer in layers]).to(like)


def _scatter_scalars(layers: list[Layer], name: str, skip: Tensor, old: Tensor, new: Tensor) -> None:
    """Write per-layer scalars, ``new`` where a layer is not skipped and ``old`` where it is: into the vector
    the layers' entries are views of (one kernel), or into a new such vector."""
    holder = _holder(layers, name, old.shape[0])
    if holder is not None:
        torch.where(skip, old, new.to(old), out=holder)  # (``old`` is ``holder``: element by element, in place)
        return
    vector = torch.where(skip, old, new.to(old))
    for i, layer in enumerate(layers):
        layer.state[name] = vector[i]


def _kernels(pre: Sequence[Assign], reductions: Sequence[Reduction], program: Sequence[Assign],
             outputs: Sequence[str], slots: Any, ride: tuple = ()) -> Any:
    return triton_source.kernels_for(tuple(pre), tuple(reductions), tuple(program), tuple(outputs), tuple(slots),
                                     tuple(tuple(x) for x in ride))
