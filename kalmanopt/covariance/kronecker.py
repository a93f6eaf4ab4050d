"""A Kronecker-factored covariance: P ≈ A ⊗ B per weight matrix, updated from the scalar loss measurement.

A layer is read as an m × n matrix G (:func:`kalmanopt.state.matricised_shape`); P = A ⊗ B acts on it as
P vec(G) = vec(A G B) (A: m × m over the rows, B: n × n over the columns, both symmetric positive
definite). The Kalman update of the loss measurement, with the random walk's P̂ = P + q I::

    predict:   Â ⊗ B̂ ≈ A ⊗ B + q I                  (the projection below, with Q = q I)
    gain:      D = Â H B̂ = P̂ Hᵀ;   S = ⟨H, D⟩ + R;   K = D / S   (a two-sided preconditioned gradient)
    correct:   θ ← θ − η L K
    posterior: P⁺ = P̂ − vec(D) vec(D)ᵀ / S,  projected back onto A ⊗ B:
               A⁺ = Â − D B̂ Dᵀ / (S ‖B̂‖²),    B⁺ = (⟨A⁺, Â⟩ B̂ − Dᵀ A⁺ D / S) / ‖A⁺‖²

The projection is one sweep of alternating least squares for the nearest Kronecker product in the
Frobenius norm (Van Loan and Pitsianis), started at the prior (Â, B̂), which P⁺ differs from by a rank-one
term: A⁺ is the best X for ‖P⁺ − X ⊗ B̂‖, B⁺ the best Y for ‖P⁺ − A⁺ ⊗ Y‖. Each is a weighted partial
trace of the positive semi-definite P⁺, so it stays positive semi-definite; the predict adds a positive
multiple of I before the next use. The pair is rescaled to equal mean diagonals (A ⊗ B unchanged).

Cost per step: D = Â H B̂ is m²n + mn² multiply-adds; the posterior as much again, every ``refresh``
steps (between refreshes the factors hold, neither absorbing the predict nor the posterior). A side
larger than ``max_dim``, and every side of a vector or scalar parameter, keeps a diagonal factor (the
matrix products become broadcasts, the projections their diagonals): the diagonal rule.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.matrix import MatrixBlock, MatrixStage, add_identity, frobenius2, is_dense, left, right, trace
from kalmanopt.program import Assign, Expr, Reduction, State, Vec
from kalmanopt.state import FactorState, StateTable, VectorState

__all__ = ["KroneckerSurrogate", "nearest_left", "nearest_right"]


def _inner(X: Tensor, Y: Tensor) -> Tensor:
    """⟨X, Y⟩_F per layer, for factors of one form."""
    return (X * Y).sum(dim=(-2, -1)) if is_dense(X) else (X * Y).sum(-1)


def _sandwich_rows(D: Tensor, B: Tensor, like: Tensor) -> Tensor:
    """D B Dᵀ (m × m) per layer, or its diagonal where the row factor ``like`` is one."""
    DB = right(D, B)
    return DB @ D.transpose(-1, -2) if is_dense(like) else (DB * D).sum(-1)


def _sandwich_cols(D: Tensor, A: Tensor, like: Tensor) -> Tensor:
    """Dᵀ A D (n × n) per layer, or its diagonal where the column factor ``like`` is one."""
    AD = left(A, D)
    return D.transpose(-1, -2) @ AD if is_dense(like) else (D * AD).sum(-2)


def _symmetric(X: Tensor) -> Tensor:
    return (X + X.transpose(-1, -2)) * 0.5 if is_dense(X) else X


def nearest_left(A: Tensor, B: Tensor, q: Tensor | float, D: Tensor | None = None,
                 S: Tensor | None = None) -> Tensor:
    """argmin_X ‖A ⊗ B + q I − D Dᵀ/S − X ⊗ B‖_F = A + q tr(B)/‖B‖² I − D B Dᵀ / (S ‖B‖²), per layer, for
    symmetric A and B (the factors always are: without D the result is A plus a multiple of I, symmetric as it
    stands; with D it is symmetrised against rounding)."""
    norm = frobenius2(B)
    X = add_identity(A, q * trace(B) / norm)
    if D is None:
        return X
    Ds = D * S.rsqrt()[:, None, None]
    X = X - _sandwich_rows(Ds, B, A) / norm.reshape((-1,) + (1,) * (A.dim() - 1))
    return _symmetric(X)


def nearest_right(X: Tensor, A: Tensor, B: Tensor, q: Tensor | float, D: Tensor | None = None,
                  S: Tensor | None = None) -> Tensor:
    """argmin_Y ‖A ⊗ B + q I − D Dᵀ/S − X ⊗ Y‖_F = (⟨X, A⟩ B + q tr(X) I − Dᵀ X D / S) / ‖X‖², per layer, for
    symmetric X, A and B (symmetrised against rounding only where D enters, as :func:`nearest_left`)."""
    norm = frobenius2(X)
    shape = (-1,) + (1,) * (B.dim() - 1)
    Y = add_identity(B * _inner(X, A).reshape(shape), q * trace(X))
    if D is None:
        return Y / norm.reshape(shape)
    Ds = D * S.rsqrt()[:, None, None]
    Y = Y - _sandwich_cols(Ds, X, B)
    return _symmetric(Y / norm.reshape(shape))


def _balanced(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(α A, B / α) with equal mean diagonals (A ⊗ B unchanged): keeps both factors in range."""
    a = trace(A) / A.shape[-1]
    b = trace(B) / B.shape[-1]
    alpha = (b / a).sqrt()
    return A * alpha.reshape((-1,) + (1,) * (A.dim() - 1)), B / alpha.reshape((-1,) + (1,) * (B.dim() - 1))


def predict(block: MatrixBlock) -> None:
    """Â ⊗ B̂ ≈ A ⊗ B + q I, and D = Â H B̂ into the workspace ``D`` (Â, B̂ kept for ``posterior``)."""
    A, B = block.factors["A"], block.factors["B"]
    q = float(block.hp["q"])
    A_hat = nearest_left(A, B, q)
    B_hat = nearest_right(A_hat, A, B, q)
    D = right(left(A_hat, block.x["H"]), B_hat, out=block.buffers.get("D"))  # (in place where it can)
    block.carry.update(A_hat=A_hat, B_hat=B_hat, D=D)
    block.out["D"] = D


def posterior(block: MatrixBlock) -> None:
    """A⁺, B⁺: the posterior P̂ − vec(D) vec(D)ᵀ / S projected back onto A ⊗ B."""
    A_hat, B_hat, D = block.carry["A_hat"], block.carry["B_hat"], block.carry["D"]
    S = block.coef["S"]
    A_new = nearest_left(A_hat, B_hat, 0.0, D, S)
    B_new = nearest_right(A_new, A_hat, B_hat, 0.0, D, S)
    block.new_factors["A"], block.new_factors["B"] = _balanced(A_new, B_new)


class KroneckerSurrogate(CovarianceSurrogate):
    """P = A ⊗ B per layer read as a matrix (see the module's docstring)."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial covariance P_0 = sigma I (A_0 = sigma I, "
                       "B_0 = I)"),
        HyperParameter("max_dim", 1024, Range(1.0), "a side longer than this keeps a diagonal factor"),
        HyperParameter("refresh", 1, Range(1.0), "the factors absorb the predict and posterior every k-th step"),
    )

    def state_table(self) -> StateTable:
        return StateTable(
            vectors=(VectorState("D", 0.0, "D = Â H B̂ = P̂ Hᵀ during a step (workspace)", workspace=True),),
            factors=(FactorState("A", "rows", square=True, init="sigma", max_size="max_dim",
                                 doc="the row factor A (m × m, or its diagonal)"),
                     FactorState("B", "cols", square=True, init=1.0, max_size="max_dim",
                                 doc="the column factor B (n × n, or its diagonal)")))

    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        return (MatrixStage("predict", predict, "before", reads=("H",), writes=("D",), factors=("A", "B")),
                MatrixStage("posterior", posterior, "after", reads=(), factors=("A", "B"), coefficients=("S",),
                            every="refresh"))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        # H P̂ Hᵀ = ⟨H, D⟩
        return (Reduction("HD", Vec("H") * State("D")),)

    def coefficients(self, b: Any) -> None:
        # S = ⟨H, D⟩ + R;  K = D / S
        S = b.red["HD"] + b.R
        b.S = S
        b.coef["S"] = S
        b.gain = [1.0 / S]

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        return []

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return State("D")
