"""The multi-tensor path (``implementation="foreach"``): any device, torch operations only.

Per group and step: one pass of per-layer dot products (:ref:`derivation §5 <derivation-one-pass>`), the per-layer
coefficients for all layers at once (:mod:`kalmanopt.fast.support`), one element-wise pass of
in-place updates. Branches that the reference path takes on the host (the skip rule, the guard,
a non-finite step) are masks on the device: no host-device synchronisation on CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kalmanopt.fast import support
from kalmanopt.fast.step import report
from kalmanopt.fast.support import DOT_COLUMNS
from kalmanopt.layers import Layer
from kalmanopt.reference import ReferenceImplementation

if TYPE_CHECKING:  # pragma: no cover
    from kalmanopt.filters.composition import Composition
    from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["ForeachImplementation", "FlatLayer", "has_gradient", "ensure_state"]

_REFERENCE = ReferenceImplementation()


#: the per-layer state each surrogate creates at a layer's first update
_STATE_KEYS = {"product": ("v", "H", "S"), "diagonal": ("p",), "scalar": (), "block": ()}


def _has_state(kind: str, layer: Layer) -> bool:
    return all(key in layer.state for key in _STATE_KEYS[kind])


def has_gradient(layer: Layer) -> bool:
    """Whether any parameter of the layer has a gradient (known on the host)."""
    return any(p.grad is not None for p in layer.params)


def ensure_state(kind: str, layer: Layer, hp: dict[str, Any]) -> None:
    """Create a layer's filter state where missing, in the reference path's layout.

    Product: v, H (zeros) and S = 0, which marks a layer that has had no update yet (a real S_k
    is positive: S_k ≥ R_k > 0 after the guard). Diagonal: p = sigma. Block: u, w̄ (zeros).
    """
    state, n = layer.state, layer.numel
    device, dtype = layer.params[0].device, layer.dtype
    if kind == "product" and "v" not in state:
        state["v"] = torch.zeros(n, dtype=dtype, device=device)
        state["H"] = torch.zeros(n, dtype=dtype, device=device)
        state["S"] = torch.zeros((), dtype=dtype, device=device)
    elif kind == "diagonal" and "p" not in state:
        state["p"] = torch.full((n,), float(hp["sigma"]), dtype=dtype, device=device)
    elif kind == "block" and "u" not in state:
        state["u"] = torch.zeros(n, dtype=dtype, device=device)
        state["w_bar"] = torch.zeros(n, dtype=dtype, device=device)


def _rows(table: Tensor) -> list:
    """Per-layer coefficient rows: Python floats on the CPU (free to read there, and the fast scalar
    kernels take them), 0-dim device tensors elsewhere (no host-device synchronisation)."""
    if table.device.type == "cpu":
        return table.tolist()
    return [row.unbind(0) for row in table.unbind(0)]


def _axpy(x: Tensor, y: Tensor, c: Tensor | float) -> Tensor:
    """x += c y in place (c a float or a 0-dim tensor)."""
    return x.add_(y, alpha=c) if isinstance(c, float) else x.addcmul_(y, c)


class FlatLayer:
    """A layer's θ and g as flat vectors in the state precision.

    A single contiguous parameter already in that precision is used in place (a view);
    otherwise θ is a copy and :meth:`commit` writes it back.
    """

    def __init__(self, layer: Layer, grad_mask: Tensor | None = None) -> None:
        self.layer = layer
        params = layer.params
        self.direct = len(params) == 1 and params[0].is_contiguous() and params[0].dtype == layer.dtype
        self.theta = params[0].detach().view(-1) if self.direct else layer.theta()
        p = params[0]
        if len(params) == 1 and p.grad is not None and p.grad.is_contiguous() and p.grad.dtype == layer.dtype:
            g = p.grad.detach().view(-1)
        else:
            g = layer.grad()
        # a step whose inputs are not finite must not spread NaN into the state: zero g there
        self.g = g if grad_mask is None else torch.where(grad_mask, g, 0.0)

    def measurement(self, wd: float) -> Tensor:
        """H = g + wd θ (g itself when wd = 0)."""
        return self.g if wd == 0 else torch.add(self.g, self.theta, alpha=wd)

    def commit(self) -> None:
        """Write θ back to the parameters if it is a copy."""
        if not self.direct:
            self.layer.write(self.theta)


class ForeachImplementation:
    """Multi-tensor KOALA++ / KOALA++-NS / KOALA-V / KOALA-M / diagonal, on any device."""

    name = "foreach"
    #: runs a whole ``step`` on the device (see :func:`kalmanopt.fast.step.step_on_device`)
    device_step = True
    #: whether ``update`` detects non-finite gradients itself (the step driver checks them here)
    checks_gradients = False

    def unsupported(self, composition: Composition, group: dict[str, Any]) -> str | None:
        return support.unsupported_reason(composition, group)

    # ------------------------------------------------------------------ predict
    def predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                layers: Sequence[Layer], ok: Tensor | None = None, code: Tensor | None = None) -> None:
        """The predict phase; on a device step masked by ``ok`` (or by a step ``code``)."""
        kind, _ = support.surrogate_kind(opt.filter)
        if kind in ("product", "diagonal"):
            return  # F = I and no shared P: nothing to predict
        if ok is None and code is not None:
            ok = (code & support.CODE_SKIPS) == 0
        if kind == "scalar":
            P = group_state["P"]
            # P̂ = P + q
            P.copy_(P + group["q"] if ok is None else torch.where(ok, P + group["q"], P))
        elif kind == "block":
            self._momentum_predict(opt, group, group_state, layers, ok)

    def _momentum_predict(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
                          layers: Sequence[Layer], ok: Tensor | None) -> None:
        if ok is not None and ok.device.type == "cpu":
            if not bool(ok):  # free on the CPU
                return
            ok = None
        a = float(group["a"])
        qw = group_state["qw"]
        dist2 = []
        n_total = 0
        move = None if ok is None else ok.to(qw.dtype)
        one = torch.ones((), dtype=qw.dtype, device=qw.device)
        decay = None if ok is None else torch.where(ok, a * one, one)
        for layer in layers:
            ensure_state("block", layer, group)
            flat = FlatLayer(layer)
            u, w_bar = layer.state["u"], layer.state["w_bar"]
            # ‖w̄_ℓ − θ_ℓ‖², measured before the weights move
            diff = w_bar - flat.theta
            dist2.append(torch.dot(diff, diff).to(qw))
            n_total += layer.numel
            # θ_ℓ ← θ_ℓ + u_ℓ;  u_ℓ ← a u_ℓ
            if move is None:
                flat.theta.add_(u)
                u.mul_(a)
            else:
                flat.theta.addcmul_(u, move.to(u))
                u.mul_(decay.to(u))
            flat.commit()
        if dist2:
            support.momentum_covariance_predict(torch.stack(dist2).sum(), n_total, group_state, group, ok)

    # ------------------------------------------------------------------ update
    def update(self, opt: KalmanOptimizer, group: dict[str, Any], group_state: dict,
               layers: Sequence[Layer], loss: Tensor, statistic: Tensor | None,
               code: Tensor | None = None) -> Tensor | None:
        """The update phase; ``code`` (device step only) is non-zero when the step must be skipped."""
        if opt.track_diagnostics:  # per-layer internals come from the reference path
            _REFERENCE.update(opt, group, group_state, layers, loss, statistic)
            return code
        ok = None if code is None else (code & support.CODE_SKIPS) == 0
        if ok is not None and ok.device.type == "cpu":
            if not bool(ok):  # free on the CPU: nothing changes
                return code
            ok = None
        kind, _ = support.surrogate_kind(opt.filter)
        active = [layer for layer in layers if has_gradient(layer)]
        n_none = len(layers) - len(active)
        R = support.noise(group_state["R"], statistic, group, ok)
        wd = float(group["weight_decay"])
        created = [i for i, layer in enumerate(active) if not _has_state(kind, layer)]
        for layer in active:
            ensure_state(kind, layer, group)
        flats = [FlatLayer(layer, ok) for layer in active]
        dots = self._dots(kind, flats, wd, R)
        if kind == "product":
            S_prev = torch.stack([f.layer.state["S"] for f in flats]) if flats else R.new_zeros(0)
            coef, S, restart, skip, overflow = support.product_coefficients(dots, S_prev, R, loss, ok, group,
                                                                  support.symmetric(opt.filter))
            self._product_apply(flats, coef, S, skip, wd, float(group["q"]))
            _count(group_state, "guard_restarts", restart.sum(), ok)
        elif kind == "diagonal":
            coef, skip, overflow = support.diagonal_coefficients(dots, R, loss, ok, group)
            self._diagonal_apply(flats, coef, skip, wd)
        else:
            block = kind == "block"
            coef, skip, overflow = support.shared_coefficients(dots, group_state["P"], R, loss, ok, group, block)
            self._shared_apply(flats, coef, skip, wd, block, opt.filter.surrogate)
        _count(group_state, "skipped_layers", skip.sum() + n_none, ok)
        if created and R.device.type == "cpu":
            # as on the reference path, a layer skipped at its first update gets no state (free to
            # check on the CPU; on CUDA its state stays, marked as not updated yet)
            skipped = skip.tolist()
            for i in created:
                if skipped[i]:
                    for key in _STATE_KEYS[kind]:
                        active[i].state.pop(key, None)
        result = support.info_code(code, overflow, loss, group, ok, R.device)
        if code is None:  # the two-phase API: report here (deferred on CUDA)
            report(opt, result)
        return result

    def _dots(self, kind: str, flats: list[FlatLayer], wd: float, like: Tensor) -> Tensor:
        """The per-layer dot table ``[layers, 8]`` (columns: :data:`support.DOT_COLUMNS`)."""
        if not flats:
            return like.new_zeros(0, DOT_COLUMNS)
        zero = like.new_zeros(())
        entries: list[Tensor] = []
        for f in flats:
            H = f.measurement(wd)
            hh = torch.dot(H, H)
            gg = hh if wd == 0 else torch.dot(f.g, f.g)
            tt = zero if wd == 0 else torch.dot(f.theta, f.theta)
            row = [hh, gg, tt]
            if kind == "product":
                v_prev, H_prev = f.layer.state["v"], f.layer.state["H"]
                row += [torch.dot(H, H_prev), torch.dot(H, v_prev), torch.dot(H_prev, H_prev),
                        torch.dot(H_prev, v_prev)]
            elif kind == "diagonal":
                row += [torch.dot(f.layer.state["p"] * H, H), zero, zero, zero]
            else:
                row += [zero, zero, zero, zero]
            row.append(zero)
            entries += [e.to(like) for e in row]
        return torch.stack(entries).view(len(flats), DOT_COLUMNS)

    @staticmethod
    def _product_apply(flats: list[FlatLayer], coef: Tensor, S: Tensor, skip: Tensor, wd: float, q: float) -> None:
        if not flats:
            return
        # per layer: (a, b, c, −d, −d Q, keep)
        d = coef[:, 3]
        table = torch.stack([coef[:, 0], coef[:, 1], coef[:, 2], -d, -d * q, (~skip).to(coef)], 1)
        for f, row, S_new in zip(flats, _rows(table), S.unbind(0)):
            a, b, c, nd, ndq, keep = row
            state = f.layer.state
            v, H_prev = state["v"], state["H"]
            H = f.measurement(wd)
            # v_k = a v_{k-1} + b H_k + c H_{k-1}
            _axpy(_axpy(v.mul_(a), H, b), H_prev, c)
            # θ_k = θ_{k-1} − d (v_k + Q H_k)
            _axpy(_axpy(f.theta, v, nd), H, ndq)
            # store H_k (lerp with weight 1 or 0 selects exactly)
            if isinstance(keep, float):
                if keep:
                    H_prev.copy_(H)
            else:
                H_prev.lerp_(H, keep)
            state["S"] = S_new
            f.commit()

    @staticmethod
    def _diagonal_apply(flats: list[FlatLayer], coef: Tensor, skip: Tensor, wd: float) -> None:
        if not flats:
            return
        # per layer: (q, S, −η L / S); (0, ∞, 0) where skipped
        table = torch.stack([coef[:, 0], coef[:, 1], -coef[:, 2]], 1)
        on_cpu = table.device.type == "cpu"
        skipped = skip.tolist() if on_cpu else skip.unbind(0)
        for f, row, skip_layer in zip(flats, _rows(table), skipped):
            if on_cpu and skip_layer:
                continue  # (known for free on the CPU)
            q, S, nd = row
            p = f.layer.state["p"]
            H = f.measurement(wd)
            # p̂ = p + q
            p.add_(q)
            PH = p * H
            if not on_cpu:  # a skipped layer's p̂ H may overflow (its ‖H‖² did): zero it there
                PH = torch.where(skip_layer, 0.0, PH)
            # θ ← θ − (η L / S) p̂ H
            _axpy(f.theta, PH, nd)
            # p ← p̂ − (p̂ H)² / S, as p̂ (1 − (p̂ H / S) H) with the factor clamped at 0 (as the reference)
            p.mul_(PH.div_(S).mul_(H).neg_().add_(1.0).clamp_min_(0.0))
            f.commit()

    @staticmethod
    def _shared_apply(flats: list[FlatLayer], coef: Tensor, skip: Tensor, wd: float, block: bool,
                      surrogate: Any) -> None:
        if not flats:
            return
        along_gradient = not block and getattr(surrogate, "direction", "gradient") == "gradient"
        # w̄ ← 0.9 w̄ + 0.1 θ where updated, unchanged where skipped
        ones = torch.ones_like(coef[:, 0])
        table = torch.stack([-coef[:, 0], -coef[:, 1], torch.where(skip, ones, 0.9 * ones),
                             torch.where(skip, 0.0 * ones, 0.1 * ones)], 1)
        for f, row in zip(flats, _rows(table)):
            nd, nd_u, w_keep, w_new = row
            H = f.measurement(wd)
            # θ ← θ − η L (P₀₀ / S) H   (KOALA-V as released: along g)
            _axpy(f.theta, f.g if along_gradient else H, nd)
            if block:
                state = f.layer.state
                # u ← u − η L (P₁₀ / S) H
                _axpy(state["u"], H, nd_u)
                # w̄ ← 0.9 w̄ + 0.1 θ
                _axpy(state["w_bar"].mul_(w_keep), f.theta, w_new)
            f.commit()


def _count(group_state: dict, name: str, n: Tensor, ok: Tensor | None) -> None:
    """Add a device count to a counter (nothing on a skipped step)."""
    n = n.to(group_state[name].dtype)
    group_state[name].add_(n if ok is None else torch.where(ok, n, 0))

