"""Analysis tools on ``torch.func``: per-sample gradients, Hessians, and the exact EKF.

For small models these give the quantities the Kalman optimizers approximate:

- :func:`per_sample_gradients`, :func:`gradient_covariance`: ∇ℓ_i for each sample (``vmap(grad)``)
  and their empirical covariance;
- :func:`hessian_vector_product`, :func:`hessian`: ∇²L v (``jvp`` over ``grad``) and the full
  Hessian of tiny models;
- :class:`ExactEKF`, :func:`exact_ekf_update`: the extended Kalman filter with the full P;
- :func:`compare_with_exact_ekf`, :func:`plot_spectra`: a preset beside the exact EKF on the
  same gradients, the spectra of both covariances and the cosine of v_k with H_k P_{k-1}.
"""

from kalmanopt.analysis.compare import SUPPORTED_PRESETS, EKFComparison, compare_with_exact_ekf, surrogate_covariance
from kalmanopt.analysis.exact_ekf import ExactEKF, ExactUpdate, exact_ekf_update
from kalmanopt.analysis.functional import (
    flatten,
    gradient_covariance,
    hessian,
    hessian_vector_product,
    per_sample_gradients,
    unflatten,
)
from kalmanopt.analysis.plotting import plot_spectra

__all__ = [
    "per_sample_gradients", "gradient_covariance", "hessian_vector_product", "hessian", "flatten", "unflatten",
    "ExactEKF", "ExactUpdate", "exact_ekf_update", "compare_with_exact_ekf", "EKFComparison",
    "surrogate_covariance", "SUPPORTED_PRESETS", "plot_spectra",
]
