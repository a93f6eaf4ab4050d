"""The exact extended Kalman filter with the full covariance P, for small models.

With H_k = ∇L_k(θ_{k-1}) + wd θ (a row vector), L_k the measured loss and random-walk dynamics
(F = I), one step is

    predict   P̂_k = P_{k-1} + Q I
    innovate  S_k = H_k P̂_k H_kᵀ + R_k
    gain      K_k = P̂_k H_kᵀ / S_k
    update    θ_k = θ_{k-1} − η_k L_k K_k
    posterior P_k = (I − K_k H_k) P̂_k

P is n × n per filter, so this is for models of at most a few thousand parameters per filter. It
is the oracle the surrogates of the presets approximate: the measurement model is the presets'
:class:`~kalmanopt.measurement.LossMeasurement` (weight decay folded into H and L, R fixed or an
EMA of a loss statistic), and the filter runs per layer (block-diagonal P, one block per parameter
tensor) or globally (one P over the whole group), as ``granularity`` says.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from kalmanopt.composition import LEARNING_RATE
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.measurement import LOSS_STATISTICS, SKIP_GRAD_NORM, LossMeasurement, split_losses
from kalmanopt.optimizer import step_loss

__all__ = ["ExactUpdate", "exact_ekf_update", "ExactEKF", "GRANULARITIES", "MAX_FILTER_PARAMETERS"]

#: how parameters are grouped into filters (as in KalmanOptimizer)
GRANULARITIES = ("layer", "global")

#: the largest filter (parameters per block of P) :class:`ExactEKF` accepts unless told otherwise
MAX_FILTER_PARAMETERS = 5000

_SIGMA = HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I")
_Q = HyperParameter("q", 0.1, Range(0.0), "process noise Q added to the covariance each step")


class ExactUpdate(NamedTuple):
    """One exact EKF step of the covariance.

    Attributes:
        P: the posterior P_k = (I − K_k H_k) P̂_k (n × n, symmetric).
        direction: P̂_k H_kᵀ, so that the gain is K_k = direction / S_k.
        S: the innovation variance S_k = H_k P̂_k H_kᵀ + R_k.
    """

    P: Tensor
    direction: Tensor
    S: Tensor


def exact_ekf_update(P: Tensor, H: Tensor, R: Tensor | float, q: float) -> ExactUpdate:
    """The covariance recursion of the exact EKF for one scalar measurement (F = I).

    Args:
        P: P_{k-1}, symmetric n × n.
        H: H_k, a vector of n entries.
        R: the measurement noise R_k.
        q: the process noise, Q = q I.

    Returns:
        :class:`ExactUpdate` with P_k, P̂_k H_kᵀ and S_k. The posterior is computed as
        P̂ − (P̂Hᵀ)(P̂Hᵀ)ᵀ / S, which equals (I − K H) P̂ for symmetric P̂ and keeps P symmetric.
    """
    n = H.numel()
    if P.shape != (n, n):
        raise ValueError(f"P must be {n} × {n} to match H of {n} entries, got shape {tuple(P.shape)}")
    H = H.to(P)
    # P̂_k = P_{k-1} + Q I
    P_hat = P.clone()
    P_hat.diagonal().add_(q)
    # P̂_k H_kᵀ
    PH = P_hat @ H
    # S_k = H_k P̂_k H_kᵀ + R_k
    R = R.to(P) if isinstance(R, Tensor) else torch.tensor(float(R), dtype=P.dtype, device=P.device)
    S = torch.dot(H, PH) + R
    # P_k = (I − K_k H_k) P̂_k = P̂_k − (P̂_k H_kᵀ)(P̂_k H_kᵀ)ᵀ / S_k   (K_k = P̂_k H_kᵀ / S_k)
    P_post = P_hat - torch.outer(PH, PH) / S
    # remove the rounding asymmetry
    P_post = 0.5 * (P_post + P_post.T)
    return ExactUpdate(P=P_post, direction=PH, S=S)


class ExactEKF(Optimizer):
    r"""The exact EKF over the weights, full P per filter: the oracle for the surrogates.

    Same measurement model and the same two ways to drive it as :class:`kalmanopt.KalmanOptimizer`
    with random-walk dynamics::

        for k = 1, 2, ...
            R_k = r, or α_r R_{k-1} + (1 − α_r) s_k      (s_k the loss statistic, R_0 = 1)
            for each filter ℓ (a parameter tensor, or the whole group) with ‖g_ℓ‖ ≥ 1e-9:
                H_ℓ = g_ℓ + wd θ_ℓ,   L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
                P̂_ℓ = P_ℓ + q I;   S_ℓ = H_ℓ P̂_ℓ H_ℓᵀ + R_k;   K_ℓ = P̂_ℓ H_ℓᵀ / S_ℓ
                θ_ℓ ← θ_ℓ − η L_ℓ K_ℓ;   P_ℓ ← (I − K_ℓ H_ℓ) P̂_ℓ

    Args:
        params: parameters or parameter groups.
        sigma: P_0 = sigma I.
        q: process noise, Q = q I.
        lr: η.
        r: fixed R, or ``None`` for the online estimate from the loss statistic.
        alpha_r: smoothing of the online R.
        weight_decay: folded into H and L as in the presets.
        granularity: ``"layer"`` (block-diagonal P, one block per tensor) or ``"global"``.
        loss_statistic: ``"second_moment"`` or ``"variance"`` of the per-sample losses.
        dtype: the precision of P (float64 by default: this is a reference).
        max_parameters: the largest filter accepted (P is max_parameters² entries).

    Example::

        opt = ExactEKF(model.parameters(), sigma=0.1, q=0.0, r=0.1)
        losses = F.mse_loss(model(x), y, reduction="none").mean(dim=1)
        opt.zero_grad(); losses.mean().backward(); opt.step(loss=losses)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *, sigma: float = 0.1, q: float = 0.1,
                 lr: float = 1.0, r: float | None = None, alpha_r: float = 0.9, weight_decay: float = 0.0,
                 granularity: str = "layer", loss_statistic: str = "second_moment",
                 dtype: torch.dtype = torch.float64, max_parameters: int = MAX_FILTER_PARAMETERS) -> None:
        if loss_statistic not in LOSS_STATISTICS:
            raise ValueError(f"unknown loss_statistic {loss_statistic!r}; valid choices: {', '.join(LOSS_STATISTICS)}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.measurement = LossMeasurement()
        self.specs = {spec.name: spec for spec in (*self.measurement.hyperparameters, _SIGMA, _Q, LEARNING_RATE)}
        self.loss_statistic = loss_statistic
        self.dtype = dtype
        self.max_parameters = int(max_parameters)
        defaults = dict(sigma=sigma, q=q, lr=lr, r=r, alpha_r=alpha_r, weight_decay=weight_decay,
                        granularity=granularity)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values and filter sizes are checked before it is added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for name, spec in self.specs.items():
                spec.check(group[name])
            if group["granularity"] not in GRANULARITIES:
                raise ValueError(f"unknown granularity {group['granularity']!r}; valid choices: "
                                 f"{', '.join(GRANULARITIES)}")
            for name, params in self._filters(len(self.param_groups) - 1):
                n = sum(p.numel() for p in params)
                if n > self.max_parameters:
                    raise ValueError(f"filter {name} has {n} parameters, above max_parameters="
                                     f"{self.max_parameters} (P would be {n} × {n}); use a smaller model, "
                                     "granularity='layer', or raise max_parameters")
        except Exception:
            self.param_groups.pop()
            raise

    def _filters(self, index: int) -> list[tuple[str, list[Tensor]]]:
        """The filters of group ``index``: (name, parameters), per tensor or one for the group."""
        params = self.param_groups[index]["params"]
        if self.param_groups[index]["granularity"] == "global":
            return [(f"group{index}/global", list(params))] if params else []
        return [(f"group{index}/param{i}", [p]) for i, p in enumerate(params)]

    def _filter_state(self, index: int, name: str, params: list[Tensor]) -> dict:
        """The state of one filter (P), created on first use: P_0 = sigma I."""
        group_state = self._group_state(index)
        if self.param_groups[index]["granularity"] == "global":
            state = group_state.setdefault("global", {})
        else:
            state = self.state[params[0]]
        if "P" not in state:
            n = sum(p.numel() for p in params)
            sigma = self.param_groups[index]["sigma"]
            state["P"] = sigma * torch.eye(n, dtype=self.dtype, device=params[0].device)
        return state

    def _group_state(self, index: int) -> dict:
        state = self.state[f"group{index}"]
        if not state:
            params = self.param_groups[index]["params"]
            device = params[0].device if params else torch.device("cpu")
            self.measurement.init_state(state, self.param_groups[index], self.dtype, device)
        return state

    def covariances(self) -> dict[str, Tensor]:
        """The current P of every filter, by name (``"group0/param1"`` or ``"group0/global"``)."""
        out = {}
        for index in range(len(self.param_groups)):
            for name, params in self._filters(index):
                out[name] = self._filter_state(index, name, params)["P"]
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | None = None) -> Tensor | None:
        """One EKF step for the gradients in ``.grad``.

        Args:
            closure: re-evaluates the model and returns the per-sample or mean loss (it should
                call ``backward``); optional when ``loss`` is given.
            loss: the per-sample losses (the statistic for R comes from them) or their mean.

        Raises:
            FloatingPointError: a non-finite loss or gradient (nothing is changed).
        """
        loss = step_loss(closure, loss, type(self).__name__)
        losses = torch.as_tensor(loss).detach()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not bool(torch.isfinite(losses).all()) or not all(bool(torch.isfinite(g).all()) for g in grads):
            raise FloatingPointError("non-finite loss or gradient: the ExactEKF step was not applied")
        mean, statistic = split_losses(losses, self.loss_statistic,
                                       any(group["r"] is None for group in self.param_groups))
        for index, group in enumerate(self.param_groups):
            self._update_group(index, group, mean, statistic)
        return loss

    def _update_group(self, index: int, group: dict[str, Any], loss: Tensor, statistic: Tensor | None) -> None:
        group_state = self._group_state(index)
        # R_k: fixed, or α_r R_{k-1} + (1 − α_r) s_k, once per step before any filter
        R = self.measurement.noise(group_state, statistic, group)
        for name, params in self._filters(index):
            if all(p.grad is None for p in params):
                continue
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.dtype)
                           for p in params])
            # a filter with ‖g_ℓ‖₂ < 1e-9 is skipped, as in the presets
            if bool(torch.linalg.vector_norm(g) < SKIP_GRAD_NORM):
                continue
            state = self._filter_state(index, name, params)
            theta = torch.cat([p.detach().reshape(-1).to(self.dtype) for p in params])
            # H_ℓ = g_ℓ + wd θ_ℓ;  L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
            H, L = self.measurement.measure(theta, g, loss.to(self.dtype), group)
            # P̂, S, K = P̂Hᵀ/S and the posterior P = (I − K H) P̂
            update = exact_ekf_update(state["P"], H, R.to(self.dtype), group["q"])
            state["P"] = update.P
            # θ_ℓ ← θ_ℓ − η L_ℓ K_ℓ
            theta = theta - group["lr"] * L * update.direction / update.S
            offset = 0
            for p in params:
                p.copy_(theta[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
