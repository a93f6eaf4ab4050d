"""Covariance surrogates (what stands for P) and least-squares estimators."""

from kalmanopt.covariance.base import CovarianceSurrogate, Gain, LeastSquaresEstimator, UpdateContext
from kalmanopt.covariance.block import BlockSurrogate
from kalmanopt.covariance.diagonal import DiagonalSurrogate
from kalmanopt.covariance.factored import FactoredSurrogate
from kalmanopt.covariance.kronecker import KroneckerSurrogate
from kalmanopt.covariance.least_squares import SymmetricLeastSquares, VanillaLeastSquares
from kalmanopt.covariance.lowrank import LowRankSurrogate
from kalmanopt.covariance.product import ProductSurrogate
from kalmanopt.covariance.scalar import ScalarSurrogate

__all__ = [
    "CovarianceSurrogate", "Gain", "LeastSquaresEstimator", "UpdateContext", "ScalarSurrogate",
    "BlockSurrogate", "DiagonalSurrogate", "ProductSurrogate", "LowRankSurrogate",
    "VanillaLeastSquares", "SymmetricLeastSquares", "FactoredSurrogate", "KroneckerSurrogate",
]
