"""The KOALA family as compositions of parts, one short definition each (:ref:`docs/design.md <design-parts>`).

Like ``optax.adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``, each
preset names its measurement model, dynamics and covariance surrogate. Keyword names follow the
authors' released code, so their scripts port by changing one import.
"""

from __future__ import annotations

from kalmanopt.composition import Composition
from kalmanopt.covariance.adaptive import AdaptiveDiagonalSurrogate
from kalmanopt.covariance.block import BlockSurrogate
from kalmanopt.covariance.diagonal import DiagonalSurrogate
from kalmanopt.covariance.eigenbasis import EigenbasisSurrogate
from kalmanopt.covariance.factored import FactoredSurrogate
from kalmanopt.covariance.kronecker import KroneckerSurrogate
from kalmanopt.covariance.least_squares import SymmetricLeastSquares, VanillaLeastSquares
from kalmanopt.covariance.lowrank import LowRankSurrogate
from kalmanopt.covariance.product import ProductSurrogate
from kalmanopt.covariance.scalar import ScalarSurrogate
from kalmanopt.dynamics import Momentum, RandomWalk
from kalmanopt.dynamics_decay import DecayingRandomWalk
from kalmanopt.gradient_measurement import GradientMeasurement
from kalmanopt.measurement import LossMeasurement
from kalmanopt.registry import register_part, register_preset

__all__ = ["koala_v", "koala_m", "koala_pp", "koala_pp_ns", "koala_diag", "koala_factored", "koala_kron",
           "KOALA_KRON_DEFAULTS", "koala_pp_lr", "koala_adam",
           "koala_adam_riccati", "koala_adam_innovation", "KOALA_ADAM_DEFAULTS", "koala_adam_eigen",
           "KOALA_ADAM_EIGEN_DEFAULTS"]

# The built-in parts, by the names `compose` and config files use.
register_part("measurement", "loss", LossMeasurement)
register_part("dynamics", "random_walk", RandomWalk)
register_part("dynamics", "momentum", Momentum)
register_part("surrogate", "scalar", ScalarSurrogate)
register_part("surrogate", "block", BlockSurrogate)
register_part("surrogate", "diagonal", DiagonalSurrogate)
register_part("surrogate", "product", ProductSurrogate)
register_part("surrogate", "lowrank", LowRankSurrogate)
register_part("measurement", "gradient", GradientMeasurement)
register_part("dynamics", "decaying_random_walk", DecayingRandomWalk)
register_part("surrogate", "adaptive_diagonal", AdaptiveDiagonalSurrogate)
register_part("surrogate", "factored", FactoredSurrogate)
register_part("surrogate", "kronecker", KroneckerSurrogate)
register_part("surrogate", "eigenbasis", EigenbasisSurrogate)
register_part("estimator", "vanilla", VanillaLeastSquares)
register_part("estimator", "symmetric", SymmetricLeastSquares)


@register_preset("koala-v")
def koala_v() -> Composition:
    """KOALA-V (AAAI 2022): scalar covariance, random walk; steps along the raw gradient as released."""
    return Composition(LossMeasurement(), RandomWalk(), ScalarSurrogate(direction="gradient"), name="koala-v")


@register_preset("koala-m")
def koala_m() -> Composition:
    """KOALA-M (AAAI 2022): momentum state (θ, u) with a shared 2×2 covariance block."""
    return Composition(LossMeasurement(), Momentum(), BlockSurrogate(), name="koala-m")


@register_preset("koala++")
def koala_pp() -> Composition:
    """KOALA++ (NeurIPS 2025): gradient-covariance product v_k with the symmetric least-squares estimate."""
    return Composition(LossMeasurement(), RandomWalk(), ProductSurrogate(SymmetricLeastSquares()), name="koala++")


@register_preset("koala++-ns")
def koala_pp_ns() -> Composition:
    """KOALA++ with the vanilla (non-symmetric) least-squares estimate: the paper's "NS" ablation."""
    return Composition(LossMeasurement(), RandomWalk(), ProductSurrogate(VanillaLeastSquares()), name="koala++-ns")


@register_preset("koala-diag")
def koala_diag() -> Composition:
    """Diagonal covariance, random walk: one variance per parameter."""
    return Composition(LossMeasurement(), RandomWalk(), DiagonalSurrogate(), name="koala-diag")


@register_preset("koala-factored")
def koala_factored() -> Composition:
    """Diagonal covariance kept as row and column factors (Adafactor's factoring): O(m + n) state per weight."""
    return Composition(LossMeasurement(), RandomWalk(), FactoredSurrogate(), name="koala-factored")


#: the defaults of ``koala-kron`` that differ from its parts' (the factors absorb every 10th step's posterior)
KOALA_KRON_DEFAULTS = {"refresh": 10}


@register_preset("koala-kron")
def koala_kron() -> Composition:
    """Kronecker-factored covariance P ≈ A ⊗ B per weight matrix: a two-sided preconditioned gradient A H B."""
    return Composition(LossMeasurement(), RandomWalk(), KroneckerSurrogate(), name="koala-kron",
                       defaults=KOALA_KRON_DEFAULTS)


@register_preset("koala++-lr")
def koala_pp_lr(memory: int = 2) -> Composition:
    """KOALA++ with a low-rank estimate from the last `memory` constraints (memory=1 is KOALA++)."""
    return Composition(LossMeasurement(), RandomWalk(),
                       LowRankSurrogate(SymmetricLeastSquares(), memory=memory), name="koala++-lr")


#: the defaults of the gradient-measurement presets (docs/research.md: the CPU ablation that chose them)
KOALA_ADAM_DEFAULTS = {"lr": 1e-3, "q": 1e-3, "sigma": 0.03, "weight_decay": 0.1}


def _gradient_filter(name: str, covariance: str, noise: str) -> Composition:
    return Composition(GradientMeasurement(), DecayingRandomWalk(),
                       AdaptiveDiagonalSurrogate(covariance=covariance, noise=noise), name=name,
                       defaults=KOALA_ADAM_DEFAULTS)


@register_preset("koala-adam")
def koala_adam() -> Composition:
    """Per-coordinate gradient measurements, a diagonal covariance at its Riccati steady state (Newton), decay."""
    return _gradient_filter("koala-adam", "newton", "second_moment")


@register_preset("koala-adam-riccati")
def koala_adam_riccati() -> Composition:
    """``koala-adam`` with the filter's own covariance recursion instead of the steady state."""
    return _gradient_filter("koala-adam-riccati", "riccati", "second_moment")


@register_preset("koala-adam-steady")
def koala_adam_steady() -> Composition:
    """``koala-adam`` with the covariance at its steady state each step: no covariance state, Adam's traffic."""
    return _gradient_filter("koala-adam-steady", "steady", "second_moment")


@register_preset("koala-adam-innovation")
def koala_adam_innovation() -> Composition:
    """``koala-adam`` with the noise estimated from the gradient filter's innovations (AdaBelief's reading)."""
    return _gradient_filter("koala-adam-innovation", "newton", "innovation")


#: the defaults of ``koala-adam-eigen``: those of the gradient-measurement presets (it keeps no covariance, so
#: no ``sigma``); the basis is refreshed every 10th update
KOALA_ADAM_EIGEN_DEFAULTS = {"lr": 1e-3, "q": 1e-3, "weight_decay": 0.1}


@register_preset("koala-adam-eigen")
def koala_adam_eigen() -> Composition:
    """``koala-adam-steady`` in the eigenbasis of a Kronecker-factored gradient noise (rows ⊗ columns)."""
    return Composition(GradientMeasurement(), DecayingRandomWalk(), EigenbasisSurrogate(), name="koala-adam-eigen",
                       defaults=KOALA_ADAM_EIGEN_DEFAULTS)
