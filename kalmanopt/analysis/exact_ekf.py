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

from typing import Any, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

from kalmanopt.composition import Composition
from kalmanopt.covariance.base import CovarianceSurrogate, Gain, UpdateContext
from kalmanopt.dynamics import RandomWalk
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.measurement import LossMeasurement
from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["ExactUpdate", "exact_ekf_update", "ExactEKF", "FullCovarianceSurrogate", "GRANULARITIES",
           "MAX_FILTER_PARAMETERS"]

#: how parameters are grouped into filters (as in KalmanOptimizer)
GRANULARITIES = ("layer", "global")

#: the largest filter (parameters per block of P) :class:`ExactEKF` accepts unless told otherwise
MAX_FILTER_PARAMETERS = 5000

_SIGMA = HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I")


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


class FullCovarianceSurrogate(CovarianceSurrogate):
    """The exact EKF's covariance: the full P of each layer (n × n), for small models only.

    Written per layer (:meth:`gain`), so it runs on the reference engine: a teaching oracle, not a
    fast part. P lives in ``dtype`` (float64 by default: this is a reference) whatever the parameters'.
    """

    state_dim = 1
    hyperparameters = (_SIGMA,)

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dtype = dtype

    def options(self) -> dict[str, object]:
        return {"dtype": self.dtype}

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        if "P" not in layer_state:
            # P_0 = sigma I
            layer_state["P"] = float(hp["sigma"]) * torch.eye(H.numel(), dtype=self.dtype, device=H.device)
        # P̂, S, K = P̂Hᵀ/S and the posterior P = (I − K H) P̂
        update = exact_ekf_update(layer_state["P"], H, R.to(self.dtype), float(ctx.Q[0]))
        layer_state["P"] = update.P
        S = update.S.to(H.dtype)
        return Gain(direction=update.direction.to(H.dtype), coefficients=(1.0 / S).reshape(1), S=S)


class ExactEKF(KalmanOptimizer):
    r"""The exact EKF over the weights, full P per filter: the oracle for the surrogates.

    A :class:`~kalmanopt.KalmanOptimizer` running the composition loss measurement + random walk +
    :class:`FullCovarianceSurrogate`, on the reference engine, with the same two ways to drive it::

        for k = 1, 2, ...
            R_k = r, or α_r R_{k-1} + (1 − α_r) s_k      (s_k the loss statistic, R_0 = 1)
            for each filter ℓ (a parameter tensor, or the whole group) with ‖g_ℓ‖ ≥ 1e-9:
                H_ℓ = g_ℓ + wd θ_ℓ,   L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
                P̂_ℓ = P_ℓ + q I;   S_ℓ = H_ℓ P̂_ℓ H_ℓᵀ + R_k;   K_ℓ = P̂_ℓ H_ℓᵀ / S_ℓ
                θ_ℓ ← θ_ℓ − η L_ℓ K_ℓ;   P_ℓ ← (I − K_ℓ H_ℓ) P̂_ℓ

    A non-finite loss or gradient raises (``strict=True``) and changes nothing; the innovation is
    not clamped (``guard=False``), as the textbook filter.

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
        self.max_parameters = int(max_parameters)
        composition = Composition(LossMeasurement(), RandomWalk(), FullCovarianceSurrogate(dtype), name="exact-ekf")
        super().__init__(params, composition, loss_statistic=loss_statistic, strict=True, sigma=sigma, q=q, lr=lr,
                         r=r, alpha_r=alpha_r, weight_decay=weight_decay, granularity=granularity,
                         implementation="reference", guard=False)

    @property
    def dtype(self) -> torch.dtype:
        """The precision of P."""
        return self.filter.surrogate.dtype

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its values and filter sizes are checked before it is added."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        for name, params in self._filters(index):
            n = sum(p.numel() for p in params)
            if n > self.max_parameters:
                self.param_groups.pop()
                raise ValueError(f"filter {name} has {n} parameters, above max_parameters="
                                 f"{self.max_parameters} (P would be {n} × {n}); use a smaller model, "
                                 "granularity='layer', or raise max_parameters")

    def _filters(self, index: int) -> list[tuple[str, list[Tensor]]]:
        """The filters of group ``index``: (name, parameters), per tensor or one for the group."""
        params = self.param_groups[index]["params"]
        if self.param_groups[index]["granularity"] == "global":
            return [(f"group{index}/global", list(params))] if params else []
        return [(f"group{index}/param{i}", [p]) for i, p in enumerate(params)]

    def covariances(self) -> dict[str, Tensor]:
        """The current P of every filter, by name (``"group0/param1"`` or ``"group0/global"``); P_0 = sigma I
        for a filter that has not been updated yet."""
        out = {}
        for index, group in enumerate(self.param_groups):
            for layer in self.layers(index):
                P = layer.state.get("P")
                if P is None:
                    P = float(group["sigma"]) * torch.eye(layer.numel, dtype=self.dtype,
                                                          device=layer.params[0].device)
                out[layer.name] = P
        return out
