"""A factored diagonal covariance: one variance per parameter, kept as a row and a column factor.

For a layer read as an m × n matrix (:func:`kalmanopt.state.matricised_shape`) the diagonal covariance
P = diag(p) is kept as the row means r (m) and the column means c (n) of p, as Adafactor keeps Adam's
second moment::

    p_ij = r_i c_j / mean(r)                                    (expand: a rank-one, positive p)
    p̂ = p + q;  S = Σ p̂ ∘ H² + R;  K = (p̂ ∘ H) / S               (the diagonal Kalman update)
    p⁺ = p̂ ∘ (1 − p̂ ∘ H² / S)                                   (the posterior, element-wise in [0, p̂])
    r ← rowmean(p⁺),  c ← colmean(p⁺)                           (the projection back onto the family)

The projection keeps the row and column totals of p⁺ exactly (and the total), and is the rank-one
p that minimises the generalised Kullback–Leibler divergence to p⁺ (Adafactor's Lemma; Lee and Seung's
I-divergence). The state is O(m + n) per weight; the expanded p̂ lives in a workspace vector during the
step. A vector or scalar parameter is a column (m, 1): r is then p itself, the diagonal rule exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.matrix import MatrixBlock, MatrixStage
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import FactorState, StateTable, VectorState

__all__ = ["FactoredSurrogate"]


def expand(block: MatrixBlock) -> None:
    """p̂_ij = r_i c_j / mean(r) + q, into the workspace ``p``."""
    r, c = block.factors["row"], block.factors["col"]
    q = float(block.hp["q"])
    scale = r.mean(-1).clamp_min(torch.finfo(r.dtype).tiny)
    rows, cols = (r / scale[:, None])[:, :, None], c[:, None, :]
    buf = block.buffers.get("p")
    if buf is None:
        block.out["p"] = rows * cols + q
    else:  # (in place, one pass)
        block.out["p"] = torch.addcmul(rows.new_full((), q), rows, cols, out=buf)


def project(block: MatrixBlock) -> None:
    """r ← rowmean(p⁺), c ← colmean(p⁺) (p⁺ in the workspace ``p`` after the element-wise pass)."""
    p = block.x["p"]
    block.new_factors["row"] = p.mean(-1)
    block.new_factors["col"] = p.mean(-2)


class FactoredSurrogate(CovarianceSurrogate):
    """P = diag(p) with p kept as row and column means (see the module's docstring)."""

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial variance of every parameter"),
    )

    def state_table(self) -> StateTable:
        # r_0 = c_0 = sigma, so that p_0 = sigma everywhere
        return StateTable(
            vectors=(VectorState("p", 0.0, "p̂ = r cᵀ / mean(r) + q during a step (workspace)", workspace=True),),
            factors=(FactorState("row", "rows", init="sigma", doc="the row means r of p"),
                     FactorState("col", "cols", init="sigma", doc="the column means c of p")))

    def matrix_stages(self, hp: Mapping[str, Any]) -> tuple[MatrixStage, ...]:
        return (MatrixStage("expand", expand, "before", reads=(), writes=("p",), factors=("row", "col")),
                MatrixStage("project", project, "after", reads=("p",), factors=("row", "col")))

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        # Σ p̂ H²
        return (Reduction("pHH", State("p") * Vec("H") * Vec("H")),)

    def coefficients(self, b: Any) -> None:
        # S = Σ p̂ ∘ H² + R;  K = (p̂ ∘ H) / S
        S = b.red["pHH"] + b.R
        b.S = S
        b.coef["S"] = S
        b.gain = [1.0 / S]

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        p, H, PH = State("p"), Vec("H"), Vec("PH")
        return [
            Assign(PH, p * H),
            # p⁺ = p̂ ∘ (1 − (p̂ ∘ H / S) ∘ H), clamped at 0 where rounding takes the factor below it
            Assign(p, p * (1.0 - (PH / Coef("S")) * H).clamp_min(0.0)),
        ]

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        return Vec("PH")
