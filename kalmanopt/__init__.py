"""kalmanopt: Kalman-filter optimizers for PyTorch, built from swappable parts.

Training is cast as state estimation: the weights are the hidden state, each minibatch loss a
noisy measurement. A filter is a composition of a measurement model, dynamics and a covariance
surrogate (with a least-squares estimator for the product surrogates); KOALA-V, KOALA-M and
KOALA++ are presets.

    >>> import torch, kalmanopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = kalmanopt.create("koala++", model.parameters(), sigma=0.1, q=0.1, lr=1.0)
"""

from kalmanopt import filters as filters  # registers the built-in parts and presets
from kalmanopt import optim as optim  # a torch.optim.Optimizer class per preset (kalmanopt.optim.KoalaPP)
from kalmanopt.api import create, find_kalman_optimizer, observe, preset_keywords
from kalmanopt.composition import Composition
from kalmanopt.covariance import (
    BlockSurrogate,
    CovarianceSurrogate,
    DiagonalSurrogate,
    FactoredSurrogate,
    Gain,
    KroneckerSurrogate,
    LeastSquaresEstimator,
    LowRankSurrogate,
    ProductSurrogate,
    ScalarSurrogate,
    SymmetricLeastSquares,
    UpdateContext,
    VanillaLeastSquares,
)
from kalmanopt.dynamics import Dynamics, Momentum, RandomWalk
from kalmanopt.hyperparams import HyperParameter, Range
from kalmanopt.measurement import LossMeasurement, MeasurementModel, loss_statistic
from kalmanopt.optimizer import KalmanOptimizer, NonFiniteError
from kalmanopt.registry import compose, get_part, get_preset, parts, presets, register_part, register_preset

__version__ = "0.1.0"

__all__ = [
    "create", "presets", "preset_keywords", "compose", "register_part", "register_preset", "get_part",
    "get_preset", "parts", "observe", "find_kalman_optimizer", "optim",
    "KalmanOptimizer", "NonFiniteError", "Composition", "MeasurementModel",
    "LossMeasurement", "loss_statistic", "Dynamics", "RandomWalk", "Momentum", "CovarianceSurrogate",
    "LeastSquaresEstimator", "Gain", "UpdateContext", "ScalarSurrogate", "BlockSurrogate",
    "DiagonalSurrogate", "ProductSurrogate", "LowRankSurrogate", "VanillaLeastSquares",
    "SymmetricLeastSquares", "FactoredSurrogate", "KroneckerSurrogate", "HyperParameter", "Range", "__version__",
]
