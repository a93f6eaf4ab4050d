"""A diagonal covariance driven by per-coordinate gradient measurements (the Kalman reading of Adam).

Paired with :class:`~kalmanopt.gradient_measurement.GradientMeasurement`, each coordinate i of a
layer is its own scalar filter (docs/derivation.md, section "koala-adam"). Per step k = t − 1,
with the fading-memory gains c₁ = (1 − β₁)/(1 − β₁ᵗ), c₂ = (1 − β₂)/(1 − β₂ᵗ):

    e   = (H − m)²  (noise="innovation")   or   H²  (noise="second_moment")
    m  ← m + c₁ (H − m)                          the filtered gradient (momentum)
    v  ← v + c₂ (e − v)                          the per-coordinate noise estimate
    v̄  = mean_ℓ(v) + ε²,   λ = max((v + ε²) / v̄, λ_min)
                                                 the information of the step, per coordinate
                                                 (Σ_ℓ v is carried as a layer scalar, Σv_k =
                                                 (1 − c₂) Σv_{k−1} + c₂ Σe: no pass reads v for it)
    p̂  = p + q
    p  ← p̂ / (1 + p̂ λ)                          covariance="riccati": the filter's own recursion
    p̂* = min((λ p̂² + q) / (λ (2 p̂ − q)), 2 p̂),  p ← p̂* / (1 + p̂* λ)
                                                 covariance="newton": one (damped) Newton step on the
                                                 steady-state Riccati equation λ p̂² − q λ p̂ − q = 0
    θ  ← θ − η / √(q v̄) · p ∘ m

In the steady state, for q λ ≪ 1, p ≈ √(q/λ) and the step is η m / √(v + ε²): Adam's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kalmanopt.covariance.base import CovarianceSurrogate
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.program import Assign, Coef, Expr, Reduction, State, Vec
from kalmanopt.state import ScalarState, StateTable, VectorState

__all__ = ["AdaptiveDiagonalSurrogate", "COVARIANCE_UPDATES", "NOISE_ESTIMATES", "LAMBDA_MIN", "fading_gain",
           "information", "steady_root", "posterior"]

#: the floor of the relative information λ: a coordinate whose noise is below 1e-8 of its layer's mean
#: is treated as having that much (p stays below 1/(2 λ_min), so p̂² cannot overflow float32)
LAMBDA_MIN = 1e-8



# The per-coordinate filter's formulas, written once for both its readers: the element-wise programs below
# (on :mod:`kalmanopt.program` expressions) and the torch code of parts that run this filter in another
# basis (:mod:`kalmanopt.covariance.eigenbasis`). Each takes expressions or tensors alike.
def fading_gain(beta: float, t: Tensor) -> Tensor:
    """The fading-memory gain (1 − β)/(1 − βᵗ) of update t (1 at the first: no prior)."""
    return (1.0 - beta) / (1.0 - torch.pow(beta, t))


def information(v: Any, eps2: Any, inv_vbar: Any) -> Any:
    """λ = max((v + ε²) / v̄, λ_min): the information of a measurement, relative to its layer's mean noise."""
    return ((v + eps2) * inv_vbar).clamp_min(LAMBDA_MIN)


def steady_root(lam: Any, q: Any) -> Any:
    """p̂, the root of λ p̂² − q λ p̂ − q = 0: the prior variance at the fixed point of the recursion."""
    return 0.5 * q + (0.25 * q * q + q / lam).sqrt()


def posterior(p_hat: Any, lam: Any) -> Any:
    """p = p̂ / (1 + p̂ λ): the posterior variance after a measurement with information λ."""
    return p_hat / (1.0 + p_hat * lam)


#: how the diagonal covariance follows the Riccati recursion
COVARIANCE_UPDATES = ("newton", "riccati", "steady")
#: what the per-coordinate noise estimate averages
NOISE_ESTIMATES = ("second_moment", "innovation")


class AdaptiveDiagonalSurrogate(CovarianceSurrogate):
    """P = diag(p) per layer, updated by one gradient measurement per coordinate with noise v.

    State per layer: m (the filtered gradient), v (the noise estimate), p (the normalised
    covariance; not kept by ``covariance="steady"``), k (the number of updates, for the
    fading-memory gains) and vsum (Σ v over the layer).

    Args:
        covariance: ``"newton"`` (default): one Newton step per update on the steady-state Riccati
            equation, warm-started from the last solution (Kleinman's iteration); ``"riccati"``:
            the filter's own covariance recursion; ``"steady"``: the steady state of the recursion
            at each step's information λ (the steady-state, or frozen-gain, filter: it assumes λ
            moves slowly against the covariance's convergence; ``sigma`` is not read, there is no
            covariance state).
        noise: ``"second_moment"`` (default): v averages H² (Adam's second moment);
            ``"innovation"``: v averages the squared innovation (H − m)² of the gradient filter
            (AdaBelief's "belief").

    Raises:
        ValueError: an unknown ``covariance`` or ``noise``, with the valid choices.
    """

    state_dim = 1
    hyperparameters = (
        HyperParameter("sigma", 0.1, Range(0.0, low_open=True), "initial normalised variance of every parameter"),
        HyperParameter("beta1", 0.9, Range(0.0, 1.0, high_open=True),
                       "forgetting factor of the gradient filter (momentum): gain (1 − β₁)/(1 − β₁ᵗ)"),
        HyperParameter("beta2", 0.99, Range(0.0, 1.0, high_open=True),
                       "forgetting factor of the per-coordinate noise estimate: gain (1 − β₂)/(1 − β₂ᵗ)"),
        HyperParameter("eps", 1e-8, Range(0.0, low_open=True),
                       "floor of the per-coordinate noise's standard deviation (v + ε²)"),
    )

    def __init__(self, covariance: str = "newton", noise: str = "second_moment") -> None:
        if covariance not in COVARIANCE_UPDATES:
            raise ValueError(f"unknown covariance update {covariance!r}; "
                             f"valid choices: {', '.join(COVARIANCE_UPDATES)}")
        if noise not in NOISE_ESTIMATES:
            raise ValueError(f"unknown noise estimate {noise!r}; valid choices: {', '.join(NOISE_ESTIMATES)}")
        self.covariance = covariance
        self.noise = noise

    def options(self) -> dict[str, object]:
        return {"covariance": self.covariance, "noise": self.noise}

    # ------------------------------------------------------------------ the two-pass contract
    def state_table(self) -> StateTable:
        vectors = (VectorState("m", 0.0, "the filtered gradient m (momentum)"),
                   VectorState("v", 0.0, "the per-coordinate noise estimate v"))
        if self.covariance != "steady":
            vectors += (VectorState("p", "sigma", "the normalised variance of each parameter"),)
        return StateTable(vectors=vectors,
                          scalars=(ScalarState("k", 0.0, "the number of updates of the layer"),
                                   ScalarState("vsum", 0.0, "Σ v over the layer, carried by its recursion")))

    def _sample(self) -> Expr:
        H = Vec("H")
        if self.noise == "innovation":
            # e = (H − m_{k-1})²: the squared innovation of the gradient filter
            return (H - State("m")) * (H - State("m"))
        # e = H²
        return H * H

    def reductions(self, hp: Mapping[str, Any], diagnostics: bool = False) -> tuple[Reduction, ...]:
        # Σ e (for the second moment Σ H² is the measurement's "hh"); Σ v_{k-1} is layer state
        return (Reduction("esum", self._sample()),) if self.noise == "innovation" else ()

    def coefficients(self, b: Any) -> None:
        hp = b.hp
        beta1, beta2, q, eps = float(hp["beta1"]), float(hp["beta2"]), float(hp["q"]), float(hp["eps"])
        k = b.layer["k"]
        t = k + 1.0
        # fading-memory gains: c = (1 − β)/(1 − βᵗ) (1 at the first update: no prior)
        c1 = fading_gain(beta1, t)
        c2 = fading_gain(beta2, t)
        esum = b.red["esum"] if self.noise == "innovation" else b.red["hh"]
        n = b.numel.to(c2)
        # v̄ = mean(v_k) + ε², from Σ v_k = (1 − c₂) Σ v_{k-1} + c₂ Σ e (the sum of the program's v update)
        vsum = (1.0 - c2) * b.layer["vsum"] + c2 * esum
        vbar = vsum / n.clamp_min(1.0) + eps * eps
        b.coef.update(c1=c1, c2=c2, inv_vbar=1.0 / vbar, eps2=torch.full_like(vbar, eps * eps),
                      q=torch.full_like(vbar, q))
        b.new_layer["k"] = t
        b.new_layer["vsum"] = vsum
        b.S = vbar
        # θ ← θ − η / √(q v̄) · p ∘ m  (q = 0: no process noise, the steady state is p = 0: no step)
        b.gain = [torch.rsqrt(q * vbar) if q > 0.0 else torch.zeros_like(vbar)]
        if b.diagnostics:
            b.info.update({"c1": c1, "c2": c2})

    def program(self, hp: Mapping[str, Any]) -> list[Assign]:
        H, m, v, p = Vec("H"), State("m"), State("v"), State("p")
        e, lam, p_hat, q = Vec("e"), Vec("lam"), Vec("p_hat"), Coef("q")
        program = [
            # e: the noise sample of this step (before m moves)
            Assign(e, self._sample()),
            # m_k = (1 − c₁) m_{k-1} + c₁ H_k
            Assign(m, (1.0 - Coef("c1")) * m + Coef("c1") * H),
            # v_k = (1 − c₂) v_{k-1} + c₂ e
            Assign(v, (1.0 - Coef("c2")) * v + Coef("c2") * e),
            # λ = max((v_k + ε²) / v̄, λ_min)
            Assign(lam, information(v, Coef("eps2"), Coef("inv_vbar"))),
        ]
        if self.covariance == "steady":
            # the root of λ p̂² − q λ p̂ − q = 0 (p̂ = p + q at the fixed point of the recursion);
            # p = p̂ / (1 + p̂ λ), a temporary: nothing of the covariance is stored
            program.append(Assign(p_hat, steady_root(lam, q)))
            program.append(Assign(Vec("p"), posterior(p_hat, lam)))
            return program
        # p̂ = p + q
        program.append(Assign(p_hat, p + q))
        if self.covariance == "newton":
            # one Newton step on λ p̂² − q λ p̂ − q = 0 (2 p̂ − q ≥ q > 0 since p ≥ 0; the floor only
            # guards q = 0, where p̂ may reach 0)
            p_star, newton = Vec("p_star"), Vec("newton")
            program.append(Assign(newton, (lam * p_hat * p_hat + q) / (lam * (2.0 * p_hat - q)).clamp_min(1e-30)))
            # damped: at most doubling p̂ per update (from below, Newton overshoots the root by up to
            # q / (2 λ p̂), a step ∝ 1/|H| for a coordinate with a tiny gradient); min(a, b) = a − max(a − b, 0)
            program.append(Assign(p_star, newton - (newton - 2.0 * p_hat).clamp_min(0.0)))
            p_hat = p_star
        # p = p̂ / (1 + p̂ λ): the posterior of a measurement with information λ
        program.append(Assign(p, posterior(p_hat, lam)))
        return program

    def direction(self, hp: Mapping[str, Any]) -> Expr:
        # P m (the gain times the innovation, up to the per-layer scale η / √(q v̄))
        return (Vec("p") if self.covariance == "steady" else State("p")) * State("m")
