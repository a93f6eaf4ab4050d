"""The per-coordinate gradient filter in the eigenbasis of a Kronecker-factored noise covariance.

The adaptive diagonal (:mod:`kalmanopt.covariance.adaptive`) treats the gradient measurement's noise as
uncorrelated between the coordinates of a layer: its covariance Λ (mn × mn for an m × n weight) is taken to be
diagonal, and each coordinate is filtered alone. Here Λ is modelled as a Kronecker product, Λ ≈ Λ_L ⊗ Λ_R
(rows and columns), whose factors are estimated by fading-memory averages of the measurement,

    L ← β₃ L + (1 − β₃) H Hᵀ   (m × m),      R ← β₃ R + (1 − β₃) Hᵀ H   (n × n),

and the filter moves to the basis that diagonalises it: with L = U_L Σ_L U_Lᵀ and R = U_R Σ_R U_Rᵀ, the
coordinates X̃ = U_Lᵀ X U_R. The random walk's process noise q I and the decay F = (1 − η λ) I are the same in
every orthonormal basis, so the filter in the rotated coordinates is the same filter with a measurement noise
that is (nearer to) diagonal, the case the adaptive diagonal is exact for. There it runs unchanged, at its
steady state (``covariance="steady"``):

    H̃ = U_Lᵀ H U_R
    m̃ ← m̃ + c₁ (H̃ − m̃),   ṽ ← ṽ + c₂ (H̃² − ṽ)                   the filtered gradient and the noise, rotated
    v̄ = mean(ṽ) + ε²,   λ = max((ṽ + ε²)/v̄, λ_min),   p̃ = p̂/(1 + p̂ λ),  p̂ the steady root
    D = U_L (p̃ ∘ m̃) U_Rᵀ / √(q v̄),   θ ← (1 − η λ_wd) θ − η D      (the gain, back in the parameters' basis)

The basis is refreshed every ``refresh`` updates (an eigendecomposition of L and R); between refreshes it
holds. At a refresh the filter's state is carried into the new basis U′: m̃ exactly, m̃′ = O_L m̃ O_Rᵀ with
O = U′ᵀ U, and the diagonal noise estimate by the diagonal of its congruence, ṽ′ = (O_L ∘ O_L) ṽ (O_R ∘ O_R)ᵀ
(each column of O ∘ O sums to one, so Σ ṽ is kept). The first update computes the basis from its own
measurement: a single gradient H = U S Vᵀ is then diagonal in it (H̃ = S), and the first step is U Vᵀ up to
the steady state's scale, the orthogonalised gradient.

A side longer than ``max_dim``, and every side of a vector or a scalar parameter, keeps the identity as its
basis (its factor is not accumulated): a bias or a norm's weight is filtered exactly as ``koala-adam-steady``
filters it. Cost per update: six m × n matrix products per dense side (the rotations in and out, the factor's
average); every ``refresh`` updates an eigendecomposition per dense side. The basis is a stage with an
interval, so an optimizer with this surrogate steps eagerly (no captured CUDA graph).

State per layer: m̃ and ṽ (two vectors of the layer's size, as Adam), the factors L, R, U_L, U_R
(``noise_rows``, ``noise_cols``, ``basis_rows``, ``basis_cols``: m² + n² each pair, dense sides
only), the update count k; the workspace D.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.adaptive import AdaptiveDiagonalSurrogate, fading_gain, information, posterior, steady_root
from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.matrix import MatrixBlock, MatrixStage, is_dense
from kalmanopt.program import Assign, Expr, Reduction, State
from kalmanopt.state import FactorState, ScalarState, StateTable, VectorState

__all__ = ["EigenbasisSurrogate", "rotate", "rotate_back", "carry_vector", "carry_diagonal"]


def _t(Q: Tensor) -> Tensor:
    return Q.transpose(-1, -2)


def rotate(X: Tensor, UL: Tensor, UR: Tensor) -> Tensor:
    """U_Lᵀ X U_R per layer (``[b, m, n]``); a side whose basis is kept as a diagonal is the identity."""
    if is_dense(UL):
        X = _t(UL) @ X
    return X @ UR if is_dense(UR) else X


def rotate_back(X: Tensor, UL: Tensor, UR: Tensor) -> Tensor:
    """U_L X U_Rᵀ per layer: the inverse of :func:`rotate`."""
    if is_dense(UL):
        X = UL @ X
    return X @ _t(UR) if is_dense(UR) else X


def carry_vector(m: Tensor, OL: Tensor | None, OR: Tensor | None) -> Tensor:
    """O_L m O_Rᵀ: a vector's coordinates in the new basis, for O = U′ᵀ U per side (None: the identity)."""
    if OL is not None:
        m = OL @ m
    return m @ _t(OR) if OR is not None else m


def carry_diagonal(v: Tensor, OL: Tensor | None, OR: Tensor | None) -> Tensor:
    """The diagonal of O diag(v) Oᵀ for O = O_L ⊗ O_R: (O_L ∘ O_L) v (O_R ∘ O_R)ᵀ (None: the identity)."""
    if OL is not None:
        v = OL.square() @ v
    return v @ _t(OR.square()) if OR is not None else v


def _average_outer(F: Tensor, X: Tensor, beta: float, side: str) -> Tensor:
    """β F + (1 − β) X Xᵀ (rows) or β F + (1 − β) Xᵀ X (columns), symmetrised against rounding."""
    outer = X @ _t(X) if side == "rows" else _t(X) @ X
    new = beta * F + (1.0 - beta) * outer
    return 0.5 * (new + _t(new))


def _eigenvectors(F: Tensor) -> Tensor:
    """An orthonormal eigenbasis of each symmetric factor; a factor that is not finite gives the identity (its
    layer's step is skipped and the basis is not committed)."""
    finite = torch.isfinite(F).flatten(1).all(1)[:, None, None]
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device).expand_as(F)
    return torch.linalg.eigh(torch.where(finite, F, eye)).eigenvectors


def noise_factors(block: MatrixBlock) -> None:
    """L, R ← fading-memory averages of H Hᵀ and Hᵀ H (dense sides only)."""
    H = block.x["H"]
    beta = float(block.hp["beta3"])
    for name, side in (("noise_rows", "rows"), ("noise_cols", "cols")):
        if is_dense(block.factors[name]):
            block.new_factors[name] = _average_outer(block.factors[name], H, beta, side)


def basis(block: MatrixBlock) -> None:
    """U_L, U_R ← eigenvectors of L and R; m̃ and ṽ carried into the new basis (for this step's filter)."""
    m, v = block.x["m"], block.x["v"]
    O = {}
    for factor, name in (("noise_rows", "basis_rows"), ("noise_cols", "basis_cols")):
        old = block.factors[name]
        if not is_dense(old):
            O[name] = None
            continue
        new = _eigenvectors(block.factors[factor])
        O[name] = _t(new) @ old
        block.new_factors[name] = new
    OL, OR = O["basis_rows"], O["basis_cols"]
    block.carry["m"] = carry_vector(m, OL, OR)
    block.carry["v"] = carry_diagonal(v, OL, OR)


def filter_step(block: MatrixBlock) -> None:
    """The adaptive diagonal's steady-state update in the eigenbasis, and its step D in the parameters' basis."""
    hp = block.hp
    UL, UR = block.factors["basis_rows"], block.factors["basis_cols"]
    m = block.carry.pop("m", block.x["m"])
    v = block.carry.pop("v", block.x["v"])
    t = block.scalars["k"] + 1.0
    c1 = block.per_layer(fading_gain(float(hp["beta1"]), t))
    c2 = block.per_layer(fading_gain(float(hp["beta2"]), t))
    q, eps2 = float(hp["q"]), float(hp["eps"]) ** 2
    H = rotate(block.x["H"], UL, UR)
    m = m + c1 * (H - m)
    v = v + c2 * (H * H - v)
    vbar = v.mean(dim=(-2, -1), keepdim=True) + eps2
    lam = information(v, eps2, 1.0 / vbar)
    p = posterior(steady_root(lam, q), lam)
    scale = torch.rsqrt(q * vbar) if q > 0.0 else torch.zeros_like(vbar)
    block.out["D"] = rotate_back(p * m, UL, UR) * scale
    block.carry.update(m_new=m, v_new=v, m_old=block.x["m"], v_old=block.x["v"])


def commit(block: MatrixBlock) -> None:
    """m̃, ṽ ← this step's, where the layer took the update (a skipped step keeps them)."""
    keep = block.per_layer(block.keep)
    block.out["m"] = torch.where(keep, block.carry["m_new"], block.carry["m_old"])
    block.out["v"] = torch.where(keep, block.carry["v_new"], block.carry["v_old"])


class EigenbasisSurrogate(CovarianceSurrogate):
    """The per-coordinate gradient filter in the eigenbasis of a Kronecker-factored noise (module docstring).

    Pair it with :class:`~kalmanopt.gradient_measurement.GradientMeasurement` and
    :class:`~kalmanopt.dynamics_decay.DecayingRandomWalk`: ``koala-adam-eigen``.
    """

    state_dim = 1
    # the adaptive diagonal's own (β₁, β₂, ε: the filter that runs in the eigenbasis), then the basis'
    hyperparameters = tuple(h for h in AdaptiveDiagonalSurrogate.hyperparameters if h.name != "sigma") + (
        HyperParameter("beta3", 0.95, Range(0.0, 1.0, high_open=True),
                       "forgetting factor of the noise's Kronecker factors L = E[H Hᵀ], R = E[Hᵀ H]"),
        HyperParameter("refresh", 10, Range(1.0), "the eigenbasis is recomputed every k-th update"),
        HyperParameter("max_dim", 1024, Range(1.0), "a side longer than this keeps the identity as its basis"),
    )

    def state_table(self) -> StateTable:
        def factor(name: str, side: str, init: float, doc: str) -> FactorState:
            return FactorState(name, side, square=True, init=init, max_size="max_dim", doc=doc)

        return StateTable(
            vectors=(VectorState("m", 0.0, "the filtered gradient m̃, in the eigenbasis"),
                     VectorState("v", 0.0, "the per-coordinate noise estimate ṽ, in the eigenbasis"),
                     VectorState("D", 0.0, "the step U_L (p̃ ∘ m̃) U_Rᵀ / √(q v̄) (workspace)", workspace=True)),
            scalars=(ScalarState("k", 0.0, "the number of updates of the layer"),),
            factors=(factor("noise_rows", "rows", 0.0, "the rows' noise factor L = E[H Hᵀ] (m × m)"),
                     factor("noise_cols", "cols", 0.0, "the columns' noise factor R = E[Hᵀ H] (n × n)"),
                     factor("basis_rows", "rows", 1.0, "the rows' eigenbasis U_L (m × m; the identity at first)"),
                     factor("basis_cols", "cols", 1.0, "the columns' eigenbasis U_R (n × n; the identity at first)")))

    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        noise, bases = ("noise_rows", "noise_cols"), ("basis_rows", "basis_cols")
        return (MatrixStage("noise factors", noise_factors, "before", reads=("H",), factors=noise),
                MatrixStage("basis", basis, "before", reads=("m", "v"), factors=noise + bases, every="refresh"),
                MatrixStage("filter", filter_step, "before", reads=("H", "m", "v"), writes=("D",), factors=bases,
                            scalars=("k",)),
                MatrixStage("commit", commit, "after", reads=(), writes=("m", "v")))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        return ()

    def coefficients(self, b: Any) -> None:
        # the step's scale is in D (the stage computes v̄ in the eigenbasis); the gain's column is 1
        ones = torch.ones_like(b.red["hh"])
        b.new_layer["k"] = b.layer["k"] + 1.0
        b.S = ones
        b.gain = [ones if float(b.hp["q"]) > 0.0 else torch.zeros_like(ones)]

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        return []

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return State("D")
