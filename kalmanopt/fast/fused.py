"""The fused path (``implementation="fused"``): CUDA, Triton kernels, four launches per update.

See :mod:`kalmanopt.fast.kernels` for the kernels. This module plans a parameter group once
(segments, chunks, the per-layer tables, the state pointers), checks the plan on the host each
step (identity of the state tensors, addresses of the parameters and gradients: no device
access), and launches. Where a step cannot run fused (a non-contiguous gradient, a gradient of
another dtype, a global layer with a missing gradient), it runs on the multi-tensor path.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kalmanopt.fast import support
from kalmanopt.fast.foreach import ForeachImplementation, ensure_state, has_gradient
from kalmanopt.fast.step import report
from kalmanopt.layers import Layer, state_dtype
from kalmanopt.reference import ReferenceImplementation

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.filters.composition import Composition
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["FusedImplementation", "CONFIG", "triton_available"]

#: launch configuration: elements per program (chunk), per block, warps per program
CONFIG = {"chunk": 8192, "block": 1024, "warps": 4}

_REFERENCE = ReferenceImplementation()
_FOREACH = ForeachImplementation()
_MODES = {"product": 0, "diagonal": 1, "scalar": 2, "block": 3}
_STATE_KEYS = {"product": ("v", "H"), "diagonal": ("p", "p"), "scalar": (), "block": ("u", "w_bar")}


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _kernels() -> Any:
    from kalmanopt.fast import kernels

    return kernels


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _split(x: float) -> tuple[float, float]:
    """x as a float32 pair (hi, lo) with hi + lo = x to about 1e-15 relative."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def _pinned_to(values: list[int], device: torch.device) -> Tensor:
    """An int64 device tensor from host integers, copied without blocking from pinned memory."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class _Plan:
    """Segments, chunks and buffers of one group's layers (those with gradients, or all for predict)."""

    def __init__(self, layers: Sequence[Layer], kind: str, chunk: int) -> None:
        self.layers = list(layers)
        self.kind = kind
        self.chunk = chunk
        first = self.layers[0].params[0]
        self.device = first.device
        self.param_dtype = first.dtype
        self.state_dtype = state_dtype(first.dtype)
        self.segments: list[tuple[int, Tensor, int]] = []  # (layer, parameter, offset in the layer)
        for index, layer in enumerate(self.layers):
            offset = 0
            for p in layer.params:
                self.segments.append((index, p, offset))
                offset += p.numel()
        numels = [p.numel() for _, p, _ in self.segments]
        chunk_seg, chunk_start, layer_first, layer_last = [], [], [], []
        seg_layer = [li for li, _, _ in self.segments]
        for si, n in enumerate(numels):
            li = seg_layer[si]
            while len(layer_first) <= li:
                layer_first.append(len(chunk_seg))
                layer_last.append(len(chunk_seg))
            for start in range(0, n, chunk):
                chunk_seg.append(si)
                chunk_start.append(start)
            layer_last[li] = len(chunk_seg)
        while len(layer_first) < len(self.layers):
            layer_first.append(len(chunk_seg))
            layer_last.append(len(chunk_seg))
        dev = self.device
        self.n_chunks = len(chunk_seg)
        self.n_layers = len(self.layers)
        self.chunk_seg = _pinned_to(chunk_seg, dev).to(torch.int32)
        self.chunk_start = _pinned_to(chunk_start, dev)
        self.seg_numel = _pinned_to(numels, dev)
        self.seg_layer = _pinned_to(seg_layer, dev).to(torch.int32)
        self.layer_first = _pinned_to(layer_first, dev)
        self.layer_last = _pinned_to(layer_last, dev)
        sd = self.state_dtype
        self.partials = torch.zeros(max(self.n_chunks, 1), 8, dtype=sd, device=dev)
        self.dots = torch.zeros(max(self.n_layers, 1), 8, dtype=sd, device=dev)
        self.coef = torch.zeros(max(self.n_layers, 1), 4, dtype=sd, device=dev)
        self.skip = torch.zeros(max(self.n_layers, 1), dtype=torch.int32, device=dev)
        self.code = torch.zeros((), dtype=torch.int32, device=dev)
        self.R_floor = torch.full((), torch.finfo(sd).tiny, dtype=sd, device=dev)
        self.no_code = torch.zeros((), dtype=torch.int32, device=dev)
        self.pointers: dict[str, tuple[list[int], Tensor, Tensor, Any]] = {}
        self.state_refs: list[Tensor] = []
        self.S_views: list[Tensor] = []
        self.aligned = True
        if kind == "product":
            # S of every layer in one vector; the layers' state["S"] become views of it
            values = [layer.state["S"].to(device=dev, dtype=sd).reshape(()) for layer in self.layers]
            self.S_all = torch.stack(values) if values else torch.zeros(1, dtype=sd, device=dev)
            self.S_views = [self.S_all[i] for i in range(self.n_layers)]
            for layer, view in zip(self.layers, self.S_views):
                layer.state["S"] = view
        else:
            self.S_all = self.dots  # unused
        keys = _STATE_KEYS[kind]
        self.state_refs = [layer.state[k] for layer in self.layers for k in keys]
        for key, slot in zip(keys, ("s0", "s1")):
            tensors = []
            for li, _, offset in self.segments:
                t = self.layers[li].state[key]
                tensors.append((t, offset))
            self._bind(slot, [(t.data_ptr() + offset * t.element_size(), t) for t, offset in tensors], sd)

    def valid(self, layers: Sequence[Layer], kind: str, chunk: int) -> bool:
        """Whether the plan still fits (same layers, same state tensors): host checks only."""
        if kind != self.kind or chunk != self.chunk or len(layers) != len(self.layers):
            return False
        for a, b in zip(layers, self.layers):
            if len(a.params) != len(b.params) or any(x is not y for x, y in zip(a.params, b.params)):
                return False
        keys = _STATE_KEYS[kind]
        refs = iter(self.state_refs)
        for layer in layers:
            for k in keys:
                if layer.state.get(k) is not next(refs):
                    return False
        if kind == "product":
            return all(layer.state.get("S") is view for layer, view in zip(layers, self.S_views))
        return True

    def _bind(self, slot: str, addresses: list[tuple[int, Tensor]], dtype: torch.dtype) -> None:
        """Point slot at tensors: a base tensor and per-segment element offsets from it."""
        ptrs = [a for a, _ in addresses]
        cached = self.pointers.get(slot)
        if cached is not None and cached[0] == ptrs:
            return
        base = addresses[0][1] if addresses else self.partials
        size = base.element_size()
        base_ptr = base.data_ptr()
        offsets = []
        for a in ptrs:
            if (a - base_ptr) % size:
                raise RuntimeError("misaligned tensor")  # cannot happen for tensors of one dtype
            offsets.append((a - base_ptr) // size)
            if a % 16:
                self.aligned = False
        if base_ptr % 16:
            self.aligned = False
        self.pointers[slot] = (ptrs, base, _pinned_to(offsets or [0], self.device), base.dtype)

    def bind_step(self, with_grads: bool) -> None:
        """Point the parameter (and gradient) slots at this step's tensors."""
        self._bind("p", [(p.data_ptr(), p) for _, p, _ in self.segments], self.param_dtype)
        if with_grads:
            self._bind("g", [(p.grad.data_ptr(), p.grad) for _, p, _ in self.segments], self.param_dtype)
        if not _STATE_KEYS[self.kind]:
            self.pointers["s0"] = self.pointers["s1"] = self.pointers["p"]

    def slot(self, name: str) -> tuple[Tensor, Tensor]:
        _, base, offsets, _ = self.pointers[name]
        return base, offsets


class FusedImplementation:
    """Triton kernels for KOALA++ / KOALA++-NS / KOALA-V / KOALA-M / diagonal on CUDA."""

    name = "fused"
    device_step = True
    #: the reduction pass reports non-finite gradients itself (no extra pass over g)
    checks_gradients = True

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        reason = support.unsupported_reason(composition, group)
        if reason is not None:
            return reason
        params = group["params"]
        devices = sorted({str(p.device) for p in params})
        if any(not d.startswith("cuda") for d in devices):
            return (f"fused kernels need CUDA tensors, the parameters are on {', '.join(devices)}; use "
                    "implementation='foreach' (any device) or None")
        if len(devices) > 1:
            return f"fused kernels need the group's parameters on one device, got {', '.join(devices)}"
        dtypes = sorted({str(p.dtype) for p in params})
        if len(dtypes) > 1:
            return f"fused kernels need one parameter dtype per group, got {', '.join(dtypes)}"
        if not triton_available():
            return "Triton is not installed"
        return None

    # ------------------------------------------------------------------ plans
    @staticmethod
    def _plan(opt: KalmanOptimizer, group: dict[str, Any], layers: Sequence[Layer], kind: str,
              purpose: str) -> _Plan:
        plans = opt.__dict__.setdefault("_fused_plans", {})
        key = (id(group), purpose)
        plan = plans.get(key)
        chunk = int(CONFIG["chunk"])
        if plan is None or not plan.valid(layers, kind, chunk):
            plan = _Plan(layers, kind, chunk)
            plans[key] = plan
        return plan

    @staticmethod
    def _fusable(layers: Sequence[Layer]) -> bool:
        for layer in layers:
            for p in layer.params:
                g = p.grad
                if g is None or not p.is_contiguous() or not g.is_contiguous() or g.dtype != p.dtype \
                        or g.device != p.device:
                    return False
        return True

    # ------------------------------------------------------------------ predict
    def predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                layers: Sequence[Layer], ok: Tensor | None = None) -> None:
        kind, _ = support.surrogate_kind(opt.filter)
        if kind != "block":
            _FOREACH.predict(opt, group, group_state, layers, ok)
            return
        layers = [layer for layer in layers if layer.numel > 0]
        if not layers or any(not p.is_contiguous() for layer in layers for p in layer.params):
            _FOREACH.predict(opt, group, group_state, layers, ok)
            return
        for layer in layers:
            ensure_state("block", layer, group)
        plan = self._plan(opt, group, layers, kind, "predict")
        plan.bind_step(with_grads=False)
        k = _kernels()
        p_base, p_off = plan.slot("p")
        s0_base, s0_off = plan.slot("s0")
        s1_base, s1_off = plan.slot("s1")
        code = plan.no_code if ok is None else (~ok).to(torch.int32)
        a_hi, a_lo = _split(float(group["a"]))
        sd = _tl_dtype(plan.state_dtype)
        k.momentum_predict_kernel[(plan.n_chunks,)](
            plan.chunk_seg, plan.chunk_start, plan.seg_numel, p_base, p_off, s0_base, s0_off, s1_base, s1_off,
            plan.partials, code, a_hi, a_lo, USE_CODE=ok is not None, ALIGNED=plan.aligned,
            VEC_P=max(16 // p_base.element_size(), 1), VEC_S=max(16 // s0_base.element_size(), 1), S_DT=sd,
            CHUNK=plan.chunk, BLOCK=int(CONFIG["block"]), num_warps=int(CONFIG["warps"]))
        k.layer_sum_kernel[(plan.n_layers,)](plan.partials, plan.layer_first, plan.layer_last, plan.dots, ROWS=128)
        n_total = sum(layer.numel for layer in layers)
        support.momentum_covariance_predict(plan.dots[: plan.n_layers, 0].sum(), n_total, group_state, group, ok)

    # ------------------------------------------------------------------ update
    def update(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
               layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None,
               code: Tensor | None = None) -> Tensor | None:
        if opt.track_diagnostics:
            _REFERENCE.update(opt, group, group_state, layers, loss, statistic)
            return code
        kind, _ = support.surrogate_kind(opt.filter)
        active = [layer for layer in layers if has_gradient(layer)]
        if not self._fusable(active) or not active:
            return _FOREACH.update(opt, group, group_state, layers, loss, statistic, code=code)
        for layer in active:
            ensure_state(kind, layer, group)
        plan = self._plan(opt, group, active, kind, "update")
        plan.bind_step(with_grads=True)
        if code is None:
            plan.code.zero_()
        else:
            plan.code.copy_(code)
        if group["r"] is None and statistic is None:
            raise ValueError("r is None (online noise estimate) but no loss statistic was given")
        self._launch(plan, kind, group, group_state, loss, statistic, len(layers) - len(active), opt)
        if code is None:
            report(opt, plan.code)
        return plan.code

    def _launch(self, plan: _Plan, kind: str, group: dict[str, Any], group_state: dict, loss: Tensor,
                statistic: Tensor | None, n_none: int, opt: KalmanOptimizer) -> None:
        k = _kernels()
        sd = _tl_dtype(plan.state_dtype)
        mode = _MODES[kind]
        wd = float(group["weight_decay"])
        p_base, p_off = plan.slot("p")
        g_base, g_off = plan.slot("g")
        s0_base, s0_off = plan.slot("s0")
        s1_base, s1_off = plan.slot("s1")
        vec_p = max(16 // p_base.element_size(), 1)
        vec_s = max(16 // s0_base.element_size(), 1)
        block, warps = int(CONFIG["block"]), int(CONFIG["warps"])
        wd_hi, wd_lo = _split(wd)
        if plan.n_chunks:
            k.dots_kernel[(plan.n_chunks,)](
                plan.chunk_seg, plan.chunk_start, plan.seg_numel, p_base, p_off, g_base, g_off, s0_base, s0_off,
                s1_base, s1_off, plan.partials, wd_hi, wd_lo, MODE=mode, HAS_WD=wd != 0, ALIGNED=plan.aligned,
                VEC_P=vec_p, VEC_S=vec_s, S_DT=sd, CHUNK=plan.chunk, BLOCK=block, num_warps=warps)
        k.layer_sum_kernel[(plan.n_layers,)](plan.partials, plan.layer_first, plan.layer_last, plan.dots, ROWS=128)
        loss_t = loss.to(device=plan.device, dtype=plan.state_dtype).reshape(())
        stat_t = loss_t if statistic is None else statistic.to(device=plan.device, dtype=plan.state_dtype)
        online = group["r"] is None
        P = group_state.get("P", plan.dots)
        hyper = [_split(float(group.get(name) or 0.0)) for name in ("sigma", "q", "lr", "weight_decay", "r",
                                                                     "alpha_r")]
        flat = [x for pair in hyper for x in pair]
        block_l = 128 if plan.n_layers <= 128 else 512
        k.finish_kernel[(1,)](
            plan.dots, plan.n_layers, plan.S_all, P, group_state["R"], plan.R_floor, loss_t, stat_t, plan.code,
            plan.coef, plan.skip, group_state["skipped_layers"], group_state["guard_restarts"], n_none, *flat,
            MODE=mode,            SYMMETRIC=support.symmetric(opt.filter) if kind == "product" else False,
            GUARD=bool(group.get("guard", True)), ONLINE_R=online, S_DT=sd, BLOCK_L=block_l, num_warps=4)
        if plan.n_chunks:
            q_hi, q_lo = _split(float(group.get("q") or 0.0))
            along_g = kind == "scalar" and getattr(opt.filter.surrogate, "direction", "gradient") == "gradient"
            k.apply_kernel[(plan.n_chunks,)](
                plan.chunk_seg, plan.chunk_start, plan.seg_numel, plan.seg_layer, p_base, p_off, g_base, g_off,
                s0_base, s0_off, s1_base, s1_off, plan.coef, plan.skip, plan.n_chunks, wd_hi, wd_lo, q_hi, q_lo,
                MODE=mode, HAS_WD=wd != 0, ALONG_G=along_g, ALIGNED=plan.aligned, VEC_P=vec_p, VEC_S=vec_s,
                S_DT=sd, CHUNK=plan.chunk, BLOCK=block, num_warps=warps)
