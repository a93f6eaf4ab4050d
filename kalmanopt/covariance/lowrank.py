"""A low-rank surrogate with memory m: KOALA++ estimated from the last m constraints.

KOALA++ estimates P_{k-2} from the single constraint H_{k-1} P̃ = v_{k-1}. With memory m the
estimator uses the last m rows, A_j P̃ = W_j (j = 1..m): A_1 = H_{k-1}, W_1 = v_{k-1}, and the
older rows A_j = H_{k-j} with their products W_j. Each older product is carried forward exactly
through every later posterior,

    H_j P_i = H_j P_{i-1} + Q H_j − (H_j·u_i) u_i / S_i,   u_i = v_i + Q H_i,

so that at step k all m products are with the same P_{k-2}. Then H_k P̃ = aᵀ W + bᵀ A (A the
stacked rows) replaces α_k v_{k-1} + w_k H_{k-1} in the KOALA++ recursion:

    v_k = H_k P̃ + Q H_k − λ_k u_{k-1},   λ_k = H_k·u_{k-1} / S_{k-1}

The estimate has rank at most 2m. Where the Gram matrix A Aᵀ is ill-conditioned, or (for the
symmetric estimator) the constraints admit no symmetric solution, the oldest rows are dropped;
``rows_dropped`` counts them. With m = 1 it equals :class:`~kalmanopt.covariance.product.ProductSurrogate`
to rounding. Extra state per layer: the m − 1 older rows ``row1`` .. ``row{m-1}`` and their products
``prod1`` .. ``prod{m-1}`` (2(m − 1) vectors), and how many of them are kept, ``rows_kept``.

As every two-pass part (:mod:`kalmanopt.contract`), the surrogate declares

- its **reductions**: the dots among H_k and the rows and products (A Aᵀ, A h, W h, A Wᵀ);
- its **coefficients**, for all layers at once: every prefix of the rows (r = m..1 newest rows) is
  tested together (a Gram matrix well conditioned, a symmetric solution admitted) and the largest
  usable r is selected per layer as a device-side mask; the m × m algebra runs batched over
  ``[layers, m, m]`` tensors (eigenvalues by Jacobi rotations, no host synchronisation);
- its **program**: v_k, the carry-forward of the kept products and the shift of the row buffers as
  linear combinations of the layer's vectors.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate, LeastSquaresEstimator
from kalmanopt.covariance.least_squares import SymmetricLeastSquares
from kalmanopt.covariance.product import GUARD_EPS
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import ScalarState, StateTable, VectorState

__all__ = ["LowRankSurrogate", "CONDITION_RTOL", "symmetric_eigen", "usable_prefixes"]


#: rows are dropped while λ_min(A Aᵀ) ≤ CONDITION_RTOL · λ_max(A Aᵀ): √eps of float32 for every state
#: precision, so that a float64 run keeps and drops the same rows as the float32 run it is the oracle of
CONDITION_RTOL = float(torch.finfo(torch.float32).eps) ** 0.5


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for the symmetry check: √eps of the state precision."""
    return float(torch.finfo(dtype).eps) ** 0.5


def _sweeps(n: int) -> int:
    """Cyclic Jacobi sweeps for n × n: one rotation diagonalises 2 × 2; convergence is quadratic beyond."""
    return 0 if n <= 1 else 1 if n == 2 else 4 + n // 2


def symmetric_eigen(G: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of symmetric ``[..., n, n]`` matrices: G = V diag(λ) Vᵀ.

    Cyclic Jacobi rotations, a fixed number of sweeps (accurate to rounding for the small n of a
    surrogate's memory), in plain tensor operations: no host synchronisation, any device (unlike
    ``torch.linalg.eigh``, which synchronises on CUDA). Eigenvalues are not sorted. A non-finite
    entry gives non-finite eigenvalues.
    """
    n = G.shape[-1]
    A = G.clone()
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    V = eye.expand_as(G)
    for _ in range(_sweeps(n)):
        for p in range(n - 1):
            for q in range(p + 1, n):
                # the rotation J that zeroes (Jᵀ A J)_pq: tan 2θ = 2 A_pq / (A_qq − A_pp), |θ| ≤ π/4
                d = A[..., q, q] - A[..., p, p]
                sign = torch.where(d >= 0, 1.0, -1.0).to(G.dtype)
                theta = 0.5 * torch.atan2(2.0 * sign * A[..., p, q], sign * d)
                c, s = torch.cos(theta), torch.sin(theta)
                # J = I + (c − 1)(e_p e_pᵀ + e_q e_qᵀ) + s (e_p e_qᵀ − e_q e_pᵀ)
                diagonal = eye[p, :, None] * eye[p] + eye[q, :, None] * eye[q]
                skew = eye[p, :, None] * eye[q] - eye[q, :, None] * eye[p]
                J = eye + (c - 1.0)[..., None, None] * diagonal + s[..., None, None] * skew
                A = J.mT @ A @ J
                V = V @ J
    return torch.diagonal(A, dim1=-2, dim2=-1), V


def usable_prefixes(AA: Tensor, AW: Tensor, available: Tensor, estimator: LeastSquaresEstimator,
                    tol: float) -> tuple[Tensor, Tensor]:
    """Which prefixes of the rows are usable, and the inverse Gram matrix of each, for N row sets at once.

    Args:
        AA: the Gram matrices A Aᵀ, ``[N, n, n]`` (row 1 the newest).
        AW: A Wᵀ, ``[N, n, n]``.
        available: how many rows each set has, ``[N]`` (1..n).
        estimator: decides whether the constraints of a prefix admit a solution of its kind.
        tol: the relative tolerance of that decision.

    Returns:
        ``valid`` ``[N, n]``: prefix r = j + 1 is usable (r ≤ available, and r = 1 or its Gram matrix
        has λ_min > CONDITION_RTOL · λ_max and the estimator admits it); and ``inverse``
        ``[N, n, n, n]``: (A_r A_rᵀ)⁻¹ of prefix r = j + 1 in the leading r × r block, zeros elsewhere.
    """
    n = AA.shape[-1]
    idx = torch.arange(n, device=AA.device)
    sizes = idx + 1
    # inside[j] is the r × r leading block of prefix r = j + 1
    inside = (idx[None, :, None] < sizes[:, None, None]) & (idx[None, None, :] < sizes[:, None, None])
    eye = torch.eye(n, dtype=AA.dtype, device=AA.device)
    # prefix r, padded to n × n with ‖A_1‖² on the diagonal: a value between its λ_min and λ_max
    # (a diagonal entry of the block), so the padding changes neither
    padded = torch.where(inside, AA[:, None], eye * AA[:, None, :1, :1])
    lam, V = symmetric_eigen(padded)
    conditioned = lam.amin(-1) > CONDITION_RTOL * lam.amax(-1)
    admitted = estimator.admits_from_dots(torch.where(inside, AW[:, None], 0.0), tol)
    valid = (sizes <= available[:, None]) & ((sizes == 1) | (conditioned & admitted))
    # (A_r A_rᵀ)⁻¹ = V diag(1/λ) Vᵀ
    inverse = (V / lam[..., None, :]) @ V.mT
    return valid, torch.where(inside, inverse, 0.0)


class LowRankSurrogate(CovarianceSurrogate):
    """KOALA++ with an m-row least-squares estimate of P_{k-2} (rank ≤ 2m).

    State per layer: v (v_{k-1}), H (H_{k-1}), S (S_{k-1}; 0 marks a layer with no update yet), the
    older rows ``row{j}`` = H_{k-1-j} and their products ``prod{j}`` with P_{k-2} (j = 1..m − 1), and
    ``rows_kept``, how many of those are in use.
    """

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

    def contract_gap(self) -> str | None:
        gap = super().contract_gap()
        if gap is not None:
            return gap
        kind = type(self.estimator)
        if kind.coefficients_from_dots is LeastSquaresEstimator.coefficients_from_dots:
            return f"its estimator {kind.__name__} has no batched coefficients_from_dots()"
        if kind.admits is not LeastSquaresEstimator.admits \
                and kind.admits_from_dots is LeastSquaresEstimator.admits_from_dots:
            return f"its estimator {kind.__name__} defines admits() but no batched admits_from_dots()"
        return None

    # ------------------------------------------------------------------ the rows and their products
    def rows(self) -> list[Vec]:
        """A_1 .. A_m: H_{k-1} (``H``), then the older rows ``row1`` .. ``row{m-1}``."""
        return [State("H")] + [State(f"row{j}") for j in range(1, self.memory)]

    def products(self) -> list[Vec]:
        """W_1 .. W_m: v_{k-1} (``v``), then the older rows' products ``prod1`` .. ``prod{m-1}``."""
        return [State("v")] + [State(f"prod{j}") for j in range(1, self.memory)]

    def older_rows(self, layer_state: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The kept older rows and their products of a layer's state, stacked ``[rows_kept, n]`` each."""
        kept = int(layer_state["rows_kept"])
        n = layer_state["H"].numel()
        rows = [layer_state[f"row{j}"] for j in range(1, kept + 1)]
        products = [layer_state[f"prod{j}"] for j in range(1, kept + 1)]
        empty = layer_state["H"].new_zeros(0, n)
        return (torch.stack(rows) if rows else empty), (torch.stack(products) if products else empty)

    # ------------------------------------------------------------------ the two-pass contract
    def state_table(self) -> StateTable:
        m = self.memory
        older = tuple(VectorState(f"row{j}", 0.0, f"H_{{k-1-{j}}}, an older row (0 where not kept)")
                      for j in range(1, m))
        products = tuple(VectorState(f"prod{j}", 0.0, f"row{j} P_{{k-2}}, its product carried forward")
                         for j in range(1, m))
        return StateTable(vectors=(VectorState("v", 0.0, "v_{k-1} = H_{k-1} P_{k-2}"),
                                   VectorState("H", 0.0, "H_{k-1}")) + older + products,
                          scalars=(ScalarState("S", 0.0, "S_{k-1} (0: no update yet)"),
                                   ScalarState("rows_kept", 0.0, "how many older rows are kept (0..m-1)")))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        H, A, W = Vec("H"), self.rows(), self.products()
        m = self.memory
        out = []
        # A Aᵀ (upper triangle), A h, W h, A Wᵀ (‖H_k‖² is the measurement's "hh")
        out += [Reduction(f"aa{i + 1}_{j + 1}", A[i] * A[j]) for i in range(m) for j in range(i, m)]
        out += [Reduction(f"ha{i + 1}", H * A[i]) for i in range(m)]
        out += [Reduction(f"hw{i + 1}", H * W[i]) for i in range(m)]
        out += [Reduction(f"aw{i + 1}_{j + 1}", A[i] * W[j]) for i in range(m) for j in range(m)]
        if diagnostics:  # W Wᵀ, for cos ∠(H_k, v_k)
            out += [Reduction(f"ww{i + 1}_{j + 1}", W[i] * W[j]) for i in range(m) for j in range(i, m)]
        return tuple(out)

    def _stand_in(self, hh: Tensor, sigma: float, with_ww: bool) -> tuple[Tensor, ...]:
        """The dots of a first update's rows, A = [H_k], W = [σ H_k] (the other rows unused, zero)."""
        m = self.memory
        one = (torch.arange(m, device=hh.device) == 0).to(hh.dtype)  # (made on the device: no host copy)
        outer = (one[:, None] * one[None, :]) * hh[:, None, None]
        vector = one * hh[:, None]
        # A Aᵀ, A Wᵀ, A h, W h (, W Wᵀ)
        dots = (outer, sigma * outer, vector, sigma * vector)
        return dots + ((sigma * sigma * outer,) if with_ww else ())

    def _dots(self, red: Mapping[str, Tensor], first: Tensor, hh: Tensor, sigma: float) -> tuple[Tensor, ...]:
        """(A Aᵀ, A Wᵀ, A h, W h) of every layer, and W Wᵀ with the diagnostics; a first update's are the stand-in's."""
        m = self.memory

        def matrix(prefix: str, symmetric: bool) -> Tensor:
            def name(i: int, j: int) -> str:
                i, j = (min(i, j), max(i, j)) if symmetric else (i, j)
                return f"{prefix}{i + 1}_{j + 1}"

            return torch.stack([torch.stack([red[name(i, j)] for j in range(m)], -1) for i in range(m)], -2)

        dots = (matrix("aa", True), matrix("aw", False), torch.stack([red[f"ha{i + 1}"] for i in range(m)], -1),
                torch.stack([red[f"hw{i + 1}"] for i in range(m)], -1))
        if "ww1_1" in red:
            dots += (matrix("ww", True),)
        stand_in = self._stand_in(hh, sigma, len(dots) == 5)
        return tuple(torch.where(first.reshape((-1,) + (1,) * (d.dim() - 1)), s, d) for d, s in zip(dots, stand_in))

    def _estimate(self, AA: Tensor, AW: Tensor, Ah: Tensor, Wh: Tensor, WW: Tensor | None, available: Tensor,
                  S_before: Tensor, hh: Tensor, q: float, R: Tensor, tol: float) -> dict[str, Tensor]:
        """One step of the recursion for N row sets at once (the largest usable prefix of each)."""
        m = self.memory
        valid, inverses = usable_prefixes(AA, AW, available, self.estimator, tol)
        sizes = torch.arange(1, m + 1, device=AA.device)
        r = (valid.to(torch.int64) * sizes).amax(-1)               # the largest usable prefix (≥ 1)
        inverse = inverses[torch.arange(r.numel(), device=r.device), r - 1]
        use = sizes <= r[:, None]                                  # [N, m]: the rows of the prefix
        use2 = use[:, :, None] & use[:, None, :]
        # H_k P̃ = aᵀ W + bᵀ A from the kept rows
        a, b = self.estimator.coefficients_from_dots(inverse, torch.where(use, Ah, 0.0), torch.where(use, Wh, 0.0),
                                                     torch.where(use2, AW, 0.0))
        a, b = torch.where(use, a, 0.0), torch.where(use, b, 0.0)
        # λ_k = H_k·u_{k-1} / S_{k-1},  u_{k-1} = W_1 + Q A_1
        hu = Wh[:, 0] + q * Ah[:, 0]
        lam = hu / S_before
        # v_k = aᵀ W + bᵀ A + Q H_k − λ_k u_{k-1}  =  Σ α_j W_j + Σ β_j A_j + Q H_k
        alpha = a.clone()
        beta = b.clone()
        alpha[:, 0] = a[:, 0] - lam
        beta[:, 0] = b[:, 0] - q * lam
        vH = (alpha * Wh).sum(-1) + (beta * Ah).sum(-1) + q * hh
        # S_k = (v_k + Q H_k)·H_k + R_k
        S = vH + q * hh + R
        # the carry-forward of row j to P_{k-1}: W_j + Q A_j − e_j u_{k-1},  e_j = A_j·u_{k-1} / S_{k-1}
        e = (AW[:, :, 0] + q * AA[:, :, 0]) / S_before[:, None]
        out = {"r": r, "a": a, "b": b, "alpha": alpha, "beta": beta, "lam": lam, "S": S, "e": e}
        if WW is not None:
            # ‖v_k‖² = αᵀ W Wᵀ α + βᵀ A Aᵀ β + Q² ‖H_k‖² + 2 βᵀ A Wᵀ α + 2 Q (α·W h + β·A h)
            quad = lambda M, x, y: (x[:, :, None] * M * y[:, None, :]).sum((-1, -2))  # noqa: E731
            vv = (quad(WW, alpha, alpha) + quad(AA, beta, beta) + q * q * hh + 2.0 * quad(AW, beta, alpha)
                  + 2.0 * q * ((alpha * Wh).sum(-1) + (beta * Ah).sum(-1))).clamp_min(0.0)
            denom = torch.sqrt(vv * hh)
            tiny = torch.finfo(hh.dtype).tiny
            out["cos_Hv"] = torch.where(denom > 0, (vH / denom.clamp_min(tiny)).clamp(-1.0, 1.0),
                                        torch.zeros_like(hh))
        return out

    def coefficients(self, b: Any) -> None:
        hp, red, m = b.hp, b.red, self.memory
        sigma, q, R = float(hp["sigma"]), float(hp["q"]), b.R
        hh = red["hh"]
        n = hh.shape[0]
        S_prev = b.layer["S"]
        first = S_prev == 0
        tol = _tolerance(hh.dtype)
        # the rows available: H_{k-1} and the kept older rows; a first update has the stand-in row only
        kept = b.layer["rows_kept"].round().to(torch.int64).clamp(0, m - 1)
        available = torch.where(first, 1, kept + 1)
        dots = self._dots(red, first, hh, sigma)
        # S_{k-1}; on a first update (and a restart) S_{k-1} = (v_{k-1} + Q H_{k-1})·H_{k-1} + R_k
        S_fresh = sigma * hh + q * hh + R
        S_before = torch.where(first, S_fresh, S_prev)
        # the step from the layer's rows and (for the guard) from the first-update state, in one batch
        stand_in = self._stand_in(hh, sigma, len(dots) == 5)
        AA, AW, Ah, Wh, *WW = (torch.cat([d, s]) for d, s in zip(dots, stand_in))
        est = self._estimate(AA, AW, Ah, Wh, WW[0] if WW else None, torch.cat([available, torch.ones_like(available)]),
                             torch.cat([S_before, S_fresh]), hh.repeat(2), q, R, tol)
        step = {k: v[:n] for k, v in est.items()}
        fresh_step = {k: v[n:] for k, v in est.items()}
        skip_before = b.skip
        b.count("rows_dropped", torch.where(skip_before, 0, available - step["r"]).sum())
        restart = torch.zeros_like(first)
        if hp.get("guard", True):
            # the guard: restart from the first-update state where S_k is not finite or S_k ≤ eps R_k
            S = step["S"]
            restart = ~torch.isfinite(S) | (S <= GUARD_EPS * R)
            b.count("guard_restarts", (restart & ~skip_before).sum())
            # where even the restart gives no usable S_k, the layer is skipped unchanged
            S_restart = fresh_step["S"]
            b.skip = b.skip | (restart & (~torch.isfinite(S_restart) | (S_restart <= GUARD_EPS * R)))
        chosen = {k: torch.where(restart.reshape((n,) + (1,) * (v.dim() - 1)), fresh_step[k], v)
                  for k, v in step.items()}
        folded = first | restart
        S = chosen["S"]
        # v_k = Σ α_j W_j + Σ β_j A_j + Q H_k; on the stand-in W_1 = σ H_k, A_1 = H_k: all of it along H_k
        alpha, beta = chosen["alpha"], chosen["beta"]
        along_H = q + sigma * alpha[:, 0] + beta[:, 0]
        zero = torch.zeros_like(hh)
        for j in range(m):
            b.coef[f"cw{j + 1}"] = torch.where(folded, zero, alpha[:, j])
            b.coef[f"ca{j + 1}"] = torch.where(folded, zero, beta[:, j])
        b.coef["ch"] = torch.where(folded, along_H, torch.full_like(hh, q))
        b.coef["q"] = torch.full_like(hh, q)
        # the rows kept for step k + 1: H_{k-1} and the older rows of the prefix, at most m − 1; none after
        # the stand-in (its carried product equals v_k: keeping it would duplicate next step's H_{k-1})
        keep = torch.where(folded, 0, chosen["r"].clamp_max(m - 1))
        e = chosen["e"]
        for j in range(1, m):
            k = (keep >= j).to(hh.dtype)
            b.coef[f"keep{j}"] = k
            b.coef[f"keep_q{j}"] = k * q
            b.coef[f"keep_e{j}"] = k * e[:, j - 1]
        if m > 1:
            b.coef["carry1"] = b.coef["keep1"] * (1.0 - e[:, 0])
        b.new_layer["S"] = S
        b.new_layer["rows_kept"] = keep.to(hh.dtype)
        b.S = S
        # K = P̂ Hᵀ / S_k = (v_k + Q H_k) / S_k
        b.gain = [1.0 / S]
        if b.diagnostics:
            b.info.update({"lambda": chosen["lam"], "alpha": chosen["a"][:, 0], "w": chosen["b"][:, 0],
                           "rows_kept": chosen["r"].to(hh.dtype)})
            if "cos_Hv" in chosen:
                b.info["cos_Hv"] = chosen["cos_Hv"]

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        m = self.memory
        H, A, W = Vec("H"), self.rows(), self.products()
        # v_k = Σ_j (cw_j W_j + ca_j A_j) + ch H_k
        v_new: Expr = Coef("ch") * H
        for j in range(m):
            v_new = v_new + Coef(f"cw{j + 1}") * W[j] + Coef(f"ca{j + 1}") * A[j]
        if m == 1:
            return [Assign(W[0], v_new), Assign(A[0], H)]
        u = Vec("u_prev")
        program = [
            # u_{k-1} = v_{k-1} + Q H_{k-1} (read by the carry-forward after v is overwritten)
            Assign(u, W[0] + Coef("q") * A[0]),
            Assign(W[0], v_new),
        ]
        # shift the older rows by one, oldest first, carrying each kept product to P_{k-1}:
        #   row_j ← keep_j A_j,  prod_j ← keep_j (W_j + Q A_j − e_j u_{k-1})
        for j in range(m - 1, 1, -1):
            program.append(Assign(A[j], Coef(f"keep{j}") * A[j - 1]))
            program.append(Assign(W[j], Coef(f"keep{j}") * W[j - 1] + Coef(f"keep_q{j}") * A[j - 1]
                                  - Coef(f"keep_e{j}") * u))
        # row_1 ← keep_1 H_{k-1},  prod_1 ← keep_1 (v_{k-1} + Q H_{k-1} − e_1 u_{k-1}) = keep_1 (1 − e_1) u_{k-1}
        program.append(Assign(A[1], Coef("keep1") * A[0]))
        program.append(Assign(W[1], Coef("carry1") * u))
        # store H_k
        program.append(Assign(A[0], H))
        return program

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        # P̂ Hᵀ = v_k + Q H_k
        return State("v") + Coef("q") * Vec("H")

    # ------------------------------------------------------------------ per layer (analysis, teaching)
    def select_rows(self, A: Tensor, W: Tensor, tol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Drop the oldest rows until A Aᵀ is well conditioned and the estimator admits W (one layer).

        The rule of the batched step (:func:`usable_prefixes`), on one row set; reads the result on the
        host. Returns the kept rows, their products and (A Aᵀ)⁻¹ of the kept rows. ``tol`` is the
        symmetry tolerance (default: √eps of the rows' precision).
        """
        tol = _tolerance(A.dtype) if tol is None else tol
        available = torch.tensor([A.shape[0]], device=A.device)
        valid, inverses = usable_prefixes((A @ A.T)[None], (A @ W.T)[None], available, self.estimator, tol)
        r = int(torch.nonzero(valid[0]).max()) + 1
        return A[:r], W[:r], inverses[0, r - 1, :r, :r]
