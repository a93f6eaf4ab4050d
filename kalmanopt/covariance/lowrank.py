"""A low-rank surrogate with memory m: KOALA++ estimated from the last m constraints.

KOALA++ estimates P_{k-2} from the single constraint H_{k-1} P̃ = v_{k-1}. With memory m the
estimator uses the last m rows, H_{k-j} P̃ = W_j (j = 1..m), W_1 = v_{k-1}. Each older product is
carried forward exactly through every later posterior,

    H_j P_i = H_j P_{i-1} + Q H_j − (H_j·u_i) u_i / S_i,   u_i = v_i + Q H_i,

so that at step k all m products are with the same P_{k-2}. Then H_k P̃ = aᵀ W + bᵀ A (A the
stacked rows) replaces α_k v_{k-1} + w_k H_{k-1} in the KOALA++ recursion:

    v_k = H_k P̃ + Q H_k − λ_k u_{k-1},   λ_k = H_k·u_{k-1} / S_{k-1}

The estimate has rank at most 2m. Where the Gram matrix A Aᵀ is ill-conditioned, or (for the
symmetric estimator) the constraints admit no symmetric solution, the oldest rows are dropped;
``rows_dropped`` counts them. With m = 1 it equals :class:`ProductSurrogate` to rounding.
Extra state per layer: the m − 1 older rows and their products (2(m − 1) vectors).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, LeastSquaresEstimator, UpdateContext
from kalmanopt.covariance.least_squares import SymmetricLeastSquares
from kalmanopt.covariance.product import GUARD_EPS
from kalmanopt.hyperparams import HyperParameter, Range

__all__ = ["LowRankSurrogate"]


#: rows are dropped while λ_min(A Aᵀ) ≤ CONDITION_RTOL · λ_max(A Aᵀ): √eps of float32 for every state
#: precision, so that a float64 run keeps and drops the same rows as the float32 run it is the oracle of
CONDITION_RTOL = float(torch.finfo(torch.float32).eps) ** 0.5


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for the symmetry check: √eps of the state precision."""
    return float(torch.finfo(dtype).eps) ** 0.5


def first_update_state(H: Tensor, R: Tensor, sigma: float, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v_{k-1}, H_{k-1}, S_{k-1}) for a layer's first update (or a guard restart).

    v_{k-1} = sigma H_k,  H_{k-1} = H_k,  S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k
    """
    v_prev = sigma * H
    S_prev = torch.dot(H, v_prev) + Q * torch.dot(H, H) + R
    return v_prev, H, S_prev


def needs_restart(S: Tensor, R: Tensor) -> bool:
    """The guard's rule: S_k not finite, or S_k ≤ GUARD_EPS · R_k (host sync: reference engine)."""
    return not bool(torch.isfinite(S)) or bool(S <= GUARD_EPS * R)


def skip_layer(ctx: UpdateContext, H: Tensor, S: Tensor, diagnostics: dict[str, Tensor]) -> Gain:
    """A zero gain that leaves the layer's state as it was (counted as a skipped layer)."""
    ctx.count("skipped_layers")
    return Gain(direction=torch.zeros_like(H), coefficients=H.new_zeros(1), S=S, diagnostics=diagnostics)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos ∠(a, b), 0 where either vector is zero."""
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return torch.where(denom > 0, torch.dot(a, b) / denom.clamp_min(torch.finfo(a.dtype).tiny), 0.0)


class LowRankSurrogate(CovarianceSurrogate):
    """KOALA++ with an m-row least-squares estimate of P_{k-2} (rank ≤ 2m)."""

    state_dim = 1
    needs_estimator = True
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I"),
    )

    def __init__(self, estimator: LeastSquaresEstimator | None = None, memory: int = 2) -> None:
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        self.estimator = estimator if estimator is not None else SymmetricLeastSquares()
        self.memory = memory

    def options(self) -> dict[str, object]:
        return {"estimator": self.estimator, "memory": self.memory}

    def gain(self, ctx: UpdateContext, layer_state: dict, H: Tensor, g: Tensor, R: Tensor,
             hp: Mapping[str, Any]) -> Gain:
        Q = ctx.Q[0]
        first = "v" not in layer_state
        if first:
            v_prev, H_prev, S_prev = first_update_state(H, R, hp["sigma"], Q)
            rows, products = H.new_zeros(0, H.numel()), H.new_zeros(0, H.numel())
        else:
            v_prev, H_prev, S_prev = layer_state["v"], layer_state["H"], layer_state["S"]
            kept = int(layer_state["rows_kept"])
            rows, products = layer_state["rows"][:kept], layer_state["products"][:kept]
        # A = [H_{k-1}; older rows],  W = [v_{k-1}; their products with P_{k-2}]
        A = torch.cat([H_prev[None], rows])
        W = torch.cat([v_prev[None], products])
        v, S, A, W, diag = self._step(ctx, H, A, W, S_prev, R, Q)
        if hp.get("guard", True) and needs_restart(S, R):
            ctx.count("guard_restarts")
            first = True
            v_prev, H_prev, S_prev = first_update_state(H, R, hp["sigma"], Q)
            v, S, A, W, diag = self._step(ctx, H, H_prev[None], v_prev[None], S_prev, R, Q)
            if needs_restart(S, R):  # the restart fails too (overflow or rounding): skip, change nothing
                return skip_layer(ctx, H, S, diag)
        u_prev = W[0] + Q * A[0]
        # carry the kept rows forward to P_{k-1}: W_j ← W_j + Q A_j − (A_j·u_{k-1}) u_{k-1} / S_{k-1}
        W = W + Q * A - torch.outer(A @ u_prev, u_prev) / S_prev
        # a first update (or restart) uses the stand-in row H_{k-1} = H_k, whose carried product
        # equals v_k exactly: keeping it would duplicate next step's H_{k-1} row and force a drop
        keep = 0 if first else min(self.memory - 1, A.shape[0])
        self._store(layer_state, v, H, S, A[:keep], W[:keep])
        diag["rows_kept"] = torch.tensor(float(A.shape[0]), dtype=H.dtype, device=H.device)
        return Gain(direction=v + Q * H, coefficients=(1.0 / S).reshape(1), S=S, diagnostics=diag)

    def _step(self, ctx: UpdateContext, H: Tensor, A: Tensor, W: Tensor, S_prev: Tensor, R: Tensor,
              Q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The recursion with the m-row estimate; returns (v_k, S_k, kept A, kept W, diagnostics)."""
        A, W, gram_inverse = self._usable_rows(ctx, A, W)
        # H_k P̃ = aᵀ W + bᵀ A
        a, b = self.estimator.coefficients(A, W, H, gram_inverse)
        HP = a @ W + b @ A
        # u_{k-1} = v_{k-1} + Q H_{k-1};  λ_k = H_k·u_{k-1} / S_{k-1}
        u_prev = W[0] + Q * A[0]
        lam = torch.dot(H, u_prev) / S_prev
        # v_k = H_k P̃ + Q H_k − λ_k u_{k-1}
        v = HP + Q * H - lam * u_prev
        # S_k = (v_k + Q H_k)·H_k + R_k
        S = torch.dot(v + Q * H, H) + R
        diag = {"lambda": lam, "alpha": a[0], "w": b[0], "cos_Hv": _cosine(H, v)}
        return v, S, A, W, diag

    def _usable_rows(self, ctx: UpdateContext, A: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`select_rows`, counting the dropped rows in the diagnostics."""
        kept_A, kept_W, gram_inverse = self.select_rows(A, W)
        ctx.count("rows_dropped", A.shape[0] - kept_A.shape[0])
        return kept_A, kept_W, gram_inverse

    def select_rows(self, A: Tensor, W: Tensor, tol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Drop the oldest rows until A Aᵀ is well conditioned and the estimator admits W.

        Returns the kept rows, their products and (A Aᵀ)⁻¹ of the kept rows. ``tol`` is the
        symmetry tolerance (default: √eps of the rows' precision).
        """
        tol = _tolerance(A.dtype) if tol is None else tol
        while True:
            gram = A @ A.T
            eig = torch.linalg.eigvalsh(gram)
            conditioned = bool(eig[0] > CONDITION_RTOL * eig[-1])
            if A.shape[0] == 1 or (conditioned and self.estimator.admits(A, W, tol)):
                return A, W, torch.linalg.inv(gram)
            A, W = A[:-1], W[:-1]

    def _store(self, layer_state: dict, v: Tensor, H: Tensor, S: Tensor, rows: Tensor, products: Tensor) -> None:
        """Store v_k, H_k, S_k and the older rows (fixed-size buffers, so checkpoints keep shape)."""
        layer_state["v"], layer_state["H"], layer_state["S"] = v, H.clone(), S
        slots = self.memory - 1
        buf_rows = H.new_zeros(slots, H.numel())
        buf_products = H.new_zeros(slots, H.numel())
        buf_rows[: rows.shape[0]] = rows
        buf_products[: products.shape[0]] = products
        layer_state["rows"], layer_state["products"] = buf_rows, buf_products
        layer_state["rows_kept"] = torch.tensor(rows.shape[0], device=H.device)
