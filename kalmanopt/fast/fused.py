"""The fused path (``implementation="fused"``): CUDA, Triton kernels, four launches per update.

See :mod:`kalmanopt.fast.kernels` for the kernels. This module plans a parameter group once
(segments, chunks, the per-layer tables, the state pointers), checks the plan on the host each
step (identity of the state tensors, addresses of the parameters and gradients: no device
access), and launches. Where a step cannot run fused (a non-contiguous gradient, a gradient of
another dtype, a global layer with a missing gradient), it runs on the multi-tensor path.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kalmanopt.fast import support
from kalmanopt.fast.foreach import ForeachImplementation, ensure_state, has_gradient
from kalmanopt.fast.step import _input_code, kinds_accumulator, report
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


@functools.lru_cache(maxsize=512)
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
        self.n_none = 0
        self.n_elements = sum(numels)
        self.block_l = 128 if self.n_layers <= 128 else 512
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
        #: the state tensors the plan points at, checked by identity each step
        self.keys = keys + (("S",) if kind == "product" else ())
        self.state_refs = [layer.state[k] for layer in self.layers for k in self.keys]
        self.params = [p for _, p, _ in self.segments]
        #: set by the caller: the plan covers every parameter of the group, unstaged (the steady state)
        self.complete = False
        #: whether some parameter or gradient is not contiguous (copied each step)
        self.staging = False
        self.params_list: list | None = None
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
        refs = [layer.state.get(k) for layer in layers for k in self.keys]
        return all(a is b for a, b in zip(refs, self.state_refs))

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

    def bind_step(self, thetas: Sequence[Tensor], grads: Sequence[Tensor] | None) -> None:
        """Point the parameter (and gradient) slots at this step's tensors, one per segment."""
        self._bind("p", [(t.data_ptr(), t) for t in thetas], self.param_dtype)
        if grads is not None:
            self._bind("g", [(g.data_ptr(), g) for g in grads], self.param_dtype)
        if not _STATE_KEYS[self.kind]:
            self.pointers["s0"] = self.pointers["s1"] = self.pointers["p"]

    def slot(self, name: str) -> tuple[Tensor, Tensor]:
        _, base, offsets, _ = self.pointers[name]
        return base, offsets


def _staged(segments: Sequence[tuple[int, Tensor, int]], dtype: torch.dtype, with_grads: bool
            ) -> tuple[list[Tensor], list[Tensor] | None, list[tuple[Tensor, Tensor]]]:
    """θ and g per segment, contiguous and of the parameter dtype; copies where they are not.

    Returns (thetas, grads, staged) with ``staged`` the (parameter, copy) pairs to write back.
    A missing gradient (in a global layer) is zeros, as on the reference path.
    """
    thetas, grads, staged = [], [], []
    for _, p, _ in segments:
        theta = p.detach()
        if not theta.is_contiguous():
            theta = theta.contiguous()
            staged.append((p, theta))
        thetas.append(theta)
        if with_grads:
            g = p.grad
            if g is None:
                g = torch.zeros(p.shape, dtype=dtype, device=p.device)
            elif not g.is_contiguous() or g.dtype != dtype:
                g = g.contiguous().to(dtype)
            grads.append(g)
    return thetas, (grads if with_grads else None), staged


def _write_back(staged: list[tuple[Tensor, Tensor]]) -> None:
    for p, theta in staged:
        p.detach().copy_(theta)


class FusedImplementation:
    """Triton kernels for KOALA++ / KOALA++-NS / KOALA-V / KOALA-M / diagonal on CUDA."""

    name = "fused"
    device_step = True
    #: the kernels check the loss, the statistic and the gradients themselves (no extra pass over g)
    checks_gradients = True

    def __init__(self) -> None:
        self._verdicts: dict[int, tuple[list, int, str | None]] = {}

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        reason = support.unsupported_reason(composition, group)
        if reason is not None:
            return reason
        params = group["params"]
        cached = self._verdicts.get(id(params))
        if cached is not None and cached[0] is params and cached[1] == len(params):
            return cached[2]
        verdict = self._check_params(params)
        self._verdicts[id(params)] = (params, len(params), verdict)
        return verdict

    @staticmethod
    def _check_params(params: Sequence[Tensor]) -> str | None:
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
    def _steady_plan(opt: KalmanOptimizer, group: dict[str, Any], group_state: dict, purpose: str,
                     with_grads: bool) -> tuple[_Plan, list[tuple[Tensor, Tensor]]] | None:
        """The cached plan if it still covers every parameter unchanged, bound to this step's tensors.

        A handful of list comprehensions over the parameters: the per-step host cost. Returns the
        plan and the staged (parameter, contiguous copy) pairs to write back, or None.
        """
        plans = opt.__dict__.get("_fused_plans")
        plan = plans.get((id(group), purpose)) if plans else None
        params = group["params"]
        if plan is None or not plan.complete or plan.params_list is not params or len(params) != len(plan.params) \
                or plan.chunk != int(CONFIG["chunk"]):
            return None
        if group["granularity"] == "global":
            st = group_state.get("global", {})
            refs = [st.get(k) for k in plan.keys]
        else:
            state = opt.state
            refs = [st.get(k) for st in [state[p] for p in params] for k in plan.keys]
        if len(refs) != len(plan.state_refs) or not all(map(operator.is_, refs, plan.state_refs)):
            return None
        grads = [p.grad for p in params] if with_grads else None
        if grads is not None and any(g is None for g in grads):
            return None
        if plan.staging:  # non-contiguous parameters or gradients: contiguous copies, every step
            thetas, grads, staged = _staged(plan.segments, plan.param_dtype, with_grads)
            plan.bind_step(thetas, grads)
            return plan, staged
        cached = plan.pointers.get("p")
        if cached is None or [p.data_ptr() for p in params] != cached[0]:
            if not all(p.is_contiguous() for p in params):
                return None
            plan.bind_step(params, None)
        if grads is not None:
            cached = plan.pointers.get("g")
            if cached is None or [g.data_ptr() for g in grads] != cached[0]:
                if not all(g.is_contiguous() and g.dtype == plan.param_dtype for g in grads):
                    return None
                plan.bind_step(params, grads)
        return plan, []

    # ------------------------------------------------------------------ predict
    def predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                layers: Sequence[Layer], ok: Tensor | None = None, code: Tensor | None = None) -> None:
        """The predict phase. With ``code`` (a step's update just ran) KOALA-V's P̂ = P + q is done."""
        kind, _ = support.surrogate_kind(opt.filter)
        if kind in ("product", "diagonal") or (kind == "scalar" and code is not None):
            return
        if kind != "block":
            _FOREACH.predict(opt, group, group_state, layers, ok, code)
            return
        if ok is None and code is not None:
            ok = (code & support.CODE_SKIPS) == 0
        pending = opt.__dict__.pop("_fused_predict_pending", None)
        if pending is not None and code is not None:
            # the update's element-wise pass already moved θ and u and measured ‖w̄ − θ‖²
            k = _kernels()
            k.layer_sum_kernel[(pending.n_layers,)](pending.partials, pending.layer_first, pending.layer_last,
                                                    pending.dots, ROWS=128)
            support.momentum_covariance_predict(pending.dots[: pending.n_layers, 0].sum(), pending.n_elements,
                                                group_state, group, ok)
            return
        steady = self._steady_plan(opt, group, group_state, "predict", with_grads=False)
        if steady is None:
            layers = [layer for layer in layers if layer.numel > 0]
            if not layers:
                return
            for layer in layers:
                ensure_state("block", layer, group)
            plan = self._plan(opt, group, layers, kind, "predict")
            thetas, _, staged = _staged(plan.segments, plan.param_dtype, with_grads=False)
            plan.bind_step(thetas, None)
            plan.staging = bool(staged)
            plan.complete = len(plan.params) == len(group["params"])
            plan.params_list = group["params"]
        else:
            plan, staged = steady
        k = _kernels()
        p_base, p_off = plan.slot("p")
        s0_base, s0_off = plan.slot("s0")
        s1_base, s1_off = plan.slot("s1")
        gate = plan.no_code if ok is None else (~ok).to(torch.int32)
        a_hi, a_lo = _split(float(group["a"]))
        k.momentum_predict_kernel[(plan.n_chunks,)](
            plan.chunk_seg, plan.chunk_start, plan.seg_numel, p_base, p_off, s0_base, s0_off, s1_base, s1_off,
            plan.partials, gate, a_hi, a_lo, USE_CODE=ok is not None, ALIGNED=plan.aligned,
            VEC_P=max(16 // p_base.element_size(), 1), VEC_S=max(16 // s0_base.element_size(), 1),
            S_DT=_tl_dtype(plan.state_dtype), CHUNK=plan.chunk, BLOCK=int(CONFIG["block"]),
            num_warps=int(CONFIG["warps"]))
        _write_back(staged)
        k.layer_sum_kernel[(plan.n_layers,)](plan.partials, plan.layer_first, plan.layer_last, plan.dots, ROWS=128)
        n_total = plan.n_elements
        support.momentum_covariance_predict(plan.dots[: plan.n_layers, 0].sum(), n_total, group_state, group, ok)

    # ------------------------------------------------------------------ update
    def update(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
               layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None,
               code: Tensor | None = None, count: bool = False) -> Tensor | None:
        """The update phase.

        ``code``: a step code from the caller (bits that skip the step), or None. ``count``: a
        whole device step (the kernels count ``steps`` / ``nonfinite_steps`` and collect the code).
        """
        if opt.track_diagnostics:
            _REFERENCE.update(opt, group, group_state, layers, loss, statistic)
            return code
        kind, _ = support.surrogate_kind(opt.filter)
        if group["r"] is None and statistic is None:
            raise ValueError("r is None (online noise estimate) but no loss statistic was given")
        steady = self._steady_plan(opt, group, group_state, "update", with_grads=True)
        if steady is not None:
            plan, staged = steady
        else:
            layers = list(layers)
            active = [layer for layer in layers if has_gradient(layer)]
            if not active:
                return self._without_layers(opt, group, group_state, layers, loss, statistic, code, count)
            for layer in active:
                ensure_state(kind, layer, group)
            plan = self._plan(opt, group, active, kind, "update")
            thetas, grads, staged = _staged(plan.segments, plan.param_dtype, with_grads=True)
            plan.bind_step(thetas, grads)
            plan.staging = bool(staged) or any(a is not b for a, b in zip(grads, (p.grad for p in plan.params)))
            plan.complete = len(active) == len(layers) and \
                all(p.grad is not None for p in plan.params) and len(plan.params) == len(group["params"])
            plan.params_list = group["params"]
            plan.n_none = len(layers) - len(active)
        # KOALA-M in a whole device step: the next predict (θ ← θ + u, u ← a u) rides on the
        # element-wise pass, so the weights are read and written once (its P, q_w follow in predict)
        fuse_predict = count and kind == "block" and plan.complete and plan.n_chunks > 0
        self._launch(plan, kind, group, group_state, loss, statistic, opt, code, count, fuse_predict)
        if fuse_predict:
            opt.__dict__["_fused_predict_pending"] = plan
        _write_back(staged)
        if code is None and not count:
            report(opt, plan.code)
        return plan.code

    def _without_layers(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                        layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None, code: Tensor | None,
                        count: bool) -> Tensor | None:
        """No layer has a gradient: the multi-tensor path (R, counters), with the step's bookkeeping."""
        if not count:
            return _FOREACH.update(opt, group, group_state, layers, loss, statistic, code=code)
        where = group_state["R"].device
        code = _input_code(opt, loss, statistic, where, gradients=True)
        code = _FOREACH.update(opt, group, group_state, layers, loss, statistic, code=code)
        ok = (code & support.CODE_SKIPS) == 0
        group_state["steps"].add_(ok.to(torch.int64))
        group_state["nonfinite_steps"].add_((~ok).to(torch.int64))
        kinds_accumulator(opt, where).bitwise_or_(code)
        if support.surrogate_kind(opt.filter)[0] == "scalar":  # the predict the caller skips
            _FOREACH.predict(opt, group, group_state, layers, ok=ok)
        return code

    def _launch(self, plan: _Plan, kind: str, group: dict[str, Any], group_state: dict, loss: Tensor,
                statistic: Tensor | None, opt: KalmanOptimizer, code: Tensor | None, count: bool,
                fuse_predict: bool = False) -> None:
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
        P = group_state.get("P", plan.dots)
        flat = [x for name in ("sigma", "q", "lr", "weight_decay", "r", "alpha_r")
                for x in _split(float(group.get(name) or 0.0))]
        kinds = kinds_accumulator(opt, plan.device) if count else plan.code
        k.finish_kernel[(1,)](
            plan.dots, plan.n_layers, plan.S_all, P, group_state["R"], plan.R_floor, loss_t, stat_t,
            plan.no_code if code is None else code, plan.code, kinds, group_state["steps"],
            group_state["nonfinite_steps"], plan.coef, plan.skip, group_state["skipped_layers"],
            group_state["guard_restarts"], plan.n_none, *flat, MODE=mode,
            SYMMETRIC=support.symmetric(opt.filter) if kind == "product" else False,
            GUARD=bool(group.get("guard", True)), ONLINE_R=group["r"] is None, HAS_STAT=statistic is not None,
            COUNT=count, PREDICT_Q=count and kind == "scalar", S_DT=sd, BLOCK_L=plan.block_l, num_warps=4)
        if plan.n_chunks:
            q_hi, q_lo = _split(float(group.get("q") or 0.0))
            along_g = kind == "scalar" and getattr(opt.filter.surrogate, "direction", "gradient") == "gradient"
            a_hi, a_lo = _split(float(group.get("a") or 0.0))
            k.apply_kernel[(plan.n_chunks,)](
                plan.chunk_seg, plan.chunk_start, plan.seg_numel, plan.seg_layer, p_base, p_off, g_base, g_off,
                s0_base, s0_off, s1_base, s1_off, plan.coef, plan.skip, plan.n_chunks, wd_hi, wd_lo, q_hi, q_lo,
                plan.partials, plan.code, a_hi, a_lo, MODE=mode, HAS_WD=wd != 0, ALONG_G=along_g,
                FUSE_PREDICT=fuse_predict, ALIGNED=plan.aligned, VEC_P=vec_p, VEC_S=vec_s, S_DT=sd,
                CHUNK=plan.chunk, BLOCK=block, num_warps=warps)
