"""The fused engine (``implementation="fused"``): Triton kernels generated from the parts' declarations.

For each update (and each predict that moves the state) the engine turns the parts' reductions and
element-wise programs (:mod:`kalmanopt.program`) into two Triton kernels, compiled once per
distinct declaration and cached (:mod:`kalmanopt.engines.triton_source`):

    reduce   per chunk of a layer: the pre-program (H = g + wd θ) and every reduction, partial sums
    (sum)    per-layer sums of the partials (deterministic segment sums, no atomics)
    (coef)   the parts' batched coefficient functions, in torch, on ``[layers]`` tensors
    apply    per chunk of a layer that updates: the programs, in reverse chunk order (what the
             reduction pass read last is still in L2)

A part is fast here without touching the engine: it only declares. Groups the kernels cannot
address (a global layer of several tensors, non-contiguous parameters or gradients, mixed dtypes)
run on the multi-tensor torch operations of :class:`~kalmanopt.engines.torch_ops.TorchEngine`.
Triton is imported only when a fused step first runs.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kalmanopt.contract import Batch, contract_gap
from kalmanopt.engines.distributed import is_sharded
from kalmanopt.engines.torch_ops import GroupContext, TorchEngine, _Work, has_gradient
from kalmanopt.layers import Layer
from kalmanopt.program import Assign, Reduction

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.filters.composition import Composition

__all__ = ["FusedEngine", "CONFIG", "triton_available"]

#: launch configuration: elements per program (chunk), per block, warps per program
CONFIG = {"chunk": 8192, "block": 1024, "warps": 4}


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


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


def _eligible(layers: Sequence[Layer], with_grads: bool) -> str | None:
    """Why the kernels cannot address these layers directly, or None."""
    if not layers:
        return "no layer"
    dtype = layers[0].params[0].dtype
    for layer in layers:
        if len(layer.params) != 1:
            return "a global layer of several tensors"
        p = layer.params[0]
        if is_sharded(p):  # (the torch path runs the local shards)
            return "a sharded DTensor parameter"
        if not p.is_contiguous() or p.dtype != dtype:
            return "a non-contiguous parameter or mixed dtypes"
        if with_grads and (p.grad is None or not p.grad.is_contiguous() or p.grad.dtype != p.dtype):
            return "a missing, non-contiguous or differently typed gradient"
    return None


_SLOTS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _slot(tensors: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """A base tensor and the element offset of each tensor from it (all of one dtype).

    Cached by the tensors' addresses: the offset table is copied to the device only when they move.
    """
    base = tensors[0]
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (ptrs, base.dtype, str(device))
    cached = _SLOTS.get(key)
    if cached is not None:
        return base, cached[1]
    size = base.element_size()
    offsets = [(p - ptrs[0]) // size for p in ptrs]
    host = torch.tensor(offsets, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    if len(_SLOTS) > 256:
        _SLOTS.clear()
    _SLOTS[key] = (base, table)
    return base, table


class FusedEngine(TorchEngine):
    """Generated Triton kernels for every composition that meets the two-pass contract, on CUDA."""

    name = "fused"
    device_step = True

    def __init__(self) -> None:
        super().__init__(host_branches=False)
        self._chunks: dict[tuple, _Chunks] = {}

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        gap = contract_gap(composition)
        if gap is not None:
            return gap
        params = group["params"]
        devices = sorted({str(p.device) for p in params})
        if any(not d.startswith("cuda") for d in devices):
            return (f"fused kernels need CUDA tensors, the parameters are on {', '.join(devices) or 'no device'}; "
                    "use implementation='foreach' (any device) or None")
        if len(devices) > 1:
            return f"fused kernels need the group's parameters on one device, got {', '.join(devices)}"
        if not triton_available():
            return "Triton is not installed"
        return None

    # ------------------------------------------------------------------ update
    def reduce_update(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], dict[str, Tensor], Tensor]:
        active = [layer for layer in ctx.layers if has_gradient(layer)]
        if _eligible(active, with_grads=True) is not None:
            work, red, scalars, numel = super().reduce_update(ctx)
            work.extra["torch"] = True
            return work, red, scalars, numel
        plan, _ = self._update_plan(ctx)
        created = self._ensure_state(plan.table, active, ctx.group)
        like = ctx.group_state["R"]
        hp = _hp(ctx.group)
        numels = [layer.numel for layer in active]
        chunks = self._chunk_tables(numels, like.device)
        slots = self._slots(active, plan.table, with_grads=True)
        red_names = [r.name for r in plan.reductions]
        kernels = _kernels(plan.pre, plan.reductions, plan.program, plan.outputs, slots.keys())
        coef_names = kernels.reduce_coefs
        table = _coef_table(coef_names, hp, {}, len(active), like)
        partials = torch.empty(max(chunks.n_chunks, 1), max(len(red_names), 1), dtype=like.dtype, device=like.device)
        if chunks.n_chunks:
            kernels.launch_reduce(chunks, slots, table, partials, like.dtype)
        sums = torch.segment_reduce(partials[: chunks.n_chunks], "sum", lengths=chunks.counts[: len(active)],
                                    axis=0, unsafe=True, initial=0.0) if active else like.new_zeros(0, len(red_names))
        red = {name: sums[:, i] for i, name in enumerate(red_names)}
        scalars = {e.name: _gather_scalars(active, e.name, like) for e in plan.table.scalars}
        numel = chunks.numel[: len(active)]
        work = _Work(ctx, [], None, hp, n_none=len(ctx.layers) - len(active))  # type: ignore[arg-type]
        work.extra.update(layers=active, chunks=chunks, slots=slots, kernels=kernels, created=(created, ()))
        return work, red, scalars, numel

    def apply_update(self, work: _Work, b: Batch) -> None:
        if work.extra.get("torch"):
            return super().apply_update(work, b)
        ctx = work.ctx
        layers: list[Layer] = work.extra["layers"]
        kernels = work.extra["kernels"]
        chunks = work.extra["chunks"]
        like = b.like
        table = _coef_table(kernels.apply_coefs, work.hp, b.coef, len(layers), like)
        skip = b.skip.to(torch.int32)
        if chunks.n_chunks and kernels.has_apply:
            kernels.launch_apply(chunks, work.extra["slots"], table, skip, like.dtype)
        for name, new in b.new_layer.items():
            values = torch.where(b.skip, b.layer[name], new.to(b.layer[name]))
            _scatter_scalars(layers, name, values)
        self._commit_group(ctx.group_state, b)
        b.count("skipped_layers", torch.full((), work.n_none, dtype=torch.int64, device=b.ok.device))
        self._commit_counters(ctx.group_state, b)

    # ------------------------------------------------------------------ predict
    def reduce_predict(self, ctx: GroupContext) -> tuple[_Work, dict[str, Tensor], Tensor]:
        plan, _ = self._predict_plan(ctx)
        layers = [layer for layer in ctx.layers if layer.numel > 0]
        if not plan.moves or _eligible(layers, with_grads=False) is not None:
            work, red, numel = super().reduce_predict(ctx)
            work.extra["torch"] = True
            return work, red, numel
        self._ensure_state(plan.table, layers, ctx.group)
        like = ctx.group_state["R"]
        hp = _hp(ctx.group)
        numels = [layer.numel for layer in layers]
        chunks = self._chunk_tables(numels, like.device)
        slots = self._slots(layers, plan.table, with_grads=False)
        kernels = _kernels((), plan.reductions, plan.program, plan.outputs, slots.keys())
        red_names = [r.name for r in plan.reductions]
        partials = torch.empty(max(chunks.n_chunks, 1), max(len(red_names), 1), dtype=like.dtype, device=like.device)
        if red_names and chunks.n_chunks:
            table = _coef_table(kernels.reduce_coefs, hp, {}, len(layers), like)
            kernels.launch_reduce(chunks, slots, table, partials, like.dtype)
        sums = torch.segment_reduce(partials[: chunks.n_chunks], "sum", lengths=chunks.counts[: len(layers)],
                                    axis=0, unsafe=True, initial=0.0)
        red = {name: sums[:, i] for i, name in enumerate(red_names)}
        numel = chunks.numel[: len(layers)]
        work = _Work(ctx, [], None, hp)  # type: ignore[arg-type]
        work.extra.update(layers=layers, chunks=chunks, slots=slots, kernels=kernels)
        return work, red, numel

    def apply_predict(self, work: _Work, b: Batch) -> None:
        if work.extra.get("torch"):
            return super().apply_predict(work, b)
        kernels, chunks = work.extra["kernels"], work.extra["chunks"]
        like = b.like
        table = _coef_table(kernels.apply_coefs, work.hp, b.coef, len(work.extra["layers"]), like)
        if chunks.n_chunks and kernels.has_apply:
            kernels.launch_apply(chunks, work.extra["slots"], table, b.skip.to(torch.int32), like.dtype)
        self._commit_group(work.ctx.group_state, b)

    # ------------------------------------------------------------------ helpers
    def _chunk_tables(self, numels: list[int], device: torch.device) -> _Chunks:
        key = (tuple(numels), int(CONFIG["chunk"]), str(device))
        chunks = self._chunks.get(key)
        if chunks is None:
            if len(self._chunks) > 64:
                self._chunks.clear()
            chunks = _Chunks(numels, int(CONFIG["chunk"]), device)
            self._chunks[key] = chunks
        return chunks

    @staticmethod
    def _slots(layers: list[Layer], table: Any, with_grads: bool) -> dict[str, tuple[Tensor, Tensor]]:
        device = layers[0].params[0].device
        slots = {"theta": _slot([layer.params[0].detach() for layer in layers], device)}
        if with_grads:
            slots["g"] = _slot([layer.params[0].grad for layer in layers], device)
        for e in table.vectors:
            slots[f"state.{e.name}"] = _slot([layer.state[e.name] for layer in layers], device)
        return slots


def _hp(group: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in group.items()
            if k != "params" and isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def _gather_scalars(layers: list[Layer], name: str, like: Tensor) -> Tensor:
    """The layers' scalar ``name`` as one vector (the vector they are views of, when they are)."""
    if not layers:
        return like.new_zeros(0)
    holder = getattr(layers[0].state[name], "_base", None)
    if holder is not None and holder.shape == (len(layers),) and all(
            layer.state[name]._base is holder for layer in layers):
        return holder.clone()
    return torch.stack([layer.state[name] for layer in layers]).to(like)


def _scatter_scalars(layers: list[Layer], name: str, values: Tensor) -> None:
    """Write per-layer scalars: the layers' entries become views of one vector (one copy per step)."""
    first = layers[0].state[name] if layers else None
    holder = getattr(first, "_base", None)
    if holder is not None and holder.shape == values.shape and all(
            layer.state[name]._base is holder for layer in layers):
        holder.copy_(values)
        return
    vector = values.clone()
    for i, layer in enumerate(layers):
        layer.state[name] = vector[i]


def _kernels(pre: Sequence[Assign], reductions: Sequence[Reduction], program: Sequence[Assign],
             outputs: Sequence[str], slots: Any) -> Any:
    from kalmanopt.engines import triton_source

    return triton_source.kernels_for(tuple(pre), tuple(reductions), tuple(program), tuple(outputs), tuple(slots))
