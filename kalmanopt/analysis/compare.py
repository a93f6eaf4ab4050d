"""A preset and the exact EKF side by side: how close is the surrogate to the full covariance?

:func:`compare_with_exact_ekf` trains a model with a preset and, on the same gradient sequence,
runs the exact EKF's covariance recursion (:func:`~kalmanopt.analysis.exact_ekf.exact_ekf_update`):
at step k both see the same H_k = g_k + wd θ_{k-1} (the preset's weights and gradients) and the same
R_k. Every few steps it records, per filter (layer, or the whole model with granularity="global"),

- the eigenvalues of the exact P_{k-1}, the covariance step k's gain is built from (before Q);
- the eigenvalues of the surrogate's covariance at the same index::

    koala-v:     p I, the shared scalar (``opt.state['group0']['P']`` before step k's predict);
    koala-diag:  diag(p_{k-1});
    koala++, koala++-ns, koala++-lr: the least-squares P̃ the estimator implies for P_{k-1}: the
        solution of A P̃ = W with A = (H_k, older rows), W = (v_k, their products), the constraints
        the estimator uses at step k + 1 (``estimator.matrix(A, W)``; for the non-symmetric
        estimator, the eigenvalues of its symmetric part);
- ‖P_surrogate − P_exact‖_F / ‖P_exact‖_F;

and at every step the cosine between the surrogate's v_k ≈ H_k P_{k-1} and the exact H_k P_{k-1}
(for koala-v and koala-diag, v_k is p H_k and p ∘ H_k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from kalmanopt.analysis.exact_ekf import MAX_FILTER_PARAMETERS, exact_ekf_update
from kalmanopt.analysis.functional import LossFunction
from kalmanopt.api import create
from kalmanopt.covariance.diagonal import DiagonalSurrogate
from kalmanopt.covariance.lowrank import LowRankSurrogate
from kalmanopt.covariance.product import ProductSurrogate
from kalmanopt.covariance.scalar import ScalarSurrogate
from kalmanopt.dynamics import RandomWalk
from kalmanopt.measurement import SKIP_GRAD_NORM, LossMeasurement, loss_statistic
from kalmanopt.optimizer import KalmanOptimizer

__all__ = ["EKFComparison", "compare_with_exact_ekf", "surrogate_covariance", "SUPPORTED_PRESETS"]

#: the presets whose covariance can be set beside the exact P (random walk; no momentum state)
SUPPORTED_PRESETS = ("koala-v", "koala-diag", "koala++", "koala++-ns", "koala++-lr")

_SURROGATES = (ScalarSurrogate, DiagonalSurrogate, ProductSurrogate, LowRankSurrogate)


@dataclass
class EKFComparison:
    """What :func:`compare_with_exact_ekf` records; plain lists and dicts (``to_dict()`` is JSON-ready).

    Attributes:
        preset: the preset's name.
        granularity: ``"layer"`` or ``"global"``.
        hyperparameters: sigma, q, lr, r, alpha_r, weight_decay of the run.
        layers: the filters' names (the model's parameter names, or ``"global"``).
        layer_sizes: parameters per filter.
        steps: 1, 2, ... for every step applied.
        losses: the mean minibatch loss L_k at each step.
        R: the measurement noise R_k at each step.
        cosine: layer → per step, cos ∠(v_k, H_k P_{k-1}) (``None`` where the layer was skipped).
        spectrum_steps: the steps k at which spectra were recorded (they describe P_{k-1}).
        exact_eigenvalues: layer → per recorded step, the eigenvalues of the exact P_{k-1}, descending.
        surrogate_eigenvalues: layer → per recorded step, the eigenvalues of the surrogate's
            covariance, descending (``None`` where the layer was skipped).
        relative_error: layer → per recorded step, ‖P_surrogate − P_exact‖_F / ‖P_exact‖_F.
    """

    preset: str
    granularity: str
    hyperparameters: dict[str, Any]
    layers: list[str]
    layer_sizes: list[int]
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    R: list[float] = field(default_factory=list)
    cosine: dict[str, list[float | None]] = field(default_factory=dict)
    spectrum_steps: list[int] = field(default_factory=list)
    exact_eigenvalues: dict[str, list[list[float]]] = field(default_factory=dict)
    surrogate_eigenvalues: dict[str, list[list[float] | None]] = field(default_factory=dict)
    relative_error: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything recorded."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EKFComparison:
        """Rebuild from :meth:`to_dict` output (e.g. a JSON log)."""
        return cls(**dict(data))


def surrogate_covariance(opt: KalmanOptimizer, layer_state: Mapping[str, Tensor]) -> Tensor:
    """The n × n covariance a product surrogate's state implies: the least-squares P̃.

    After step k the state holds H_k and v_k ≈ H_k P_{k-1} (and, for the low-rank surrogate, older
    rows with their products carried to P_{k-1}). P̃ solves A P̃ = W for those rows with the
    surrogate's estimator: the P_{k-1} the estimator plugs in at step k + 1. Rows are dropped,
    oldest first, where the Gram matrix is ill-conditioned or no symmetric solution exists (as the
    low-rank surrogate does).

    Raises:
        ValueError: the optimizer's surrogate is not a product surrogate, or the layer has no state.
    """
    surrogate = opt.filter.surrogate
    if not isinstance(surrogate, (ProductSurrogate, LowRankSurrogate)):
        raise ValueError(f"surrogate_covariance needs a product surrogate (koala++, koala++-ns, koala++-lr), "
                         f"got {type(surrogate).__name__}")
    if "v" not in layer_state:
        raise ValueError("the layer has no v yet: run at least one update first")
    A, W = layer_state["H"][None], layer_state["v"][None]
    if isinstance(surrogate, LowRankSurrogate):
        rows, products = surrogate.older_rows(layer_state)
        A = torch.cat([A, rows])
        W = torch.cat([W, products])
        # the same rows the surrogate keeps, with the tolerance of the state's own precision
        tol = float(torch.finfo(layer_state["v"].dtype).eps) ** 0.5
        A, W, _ = surrogate.select_rows(A.double(), W.double(), tol=tol)
    return surrogate.estimator.matrix(A.double(), W.double())


def _eigenvalues(M: Tensor, span: Tensor | None = None) -> list[float]:
    """Eigenvalues of the symmetric part of M, descending.

    ``span``: rows spanning the range of M's symmetric part, if it is low-rank (the product
    surrogates' P̃ lives in the span of the rows H and v). The nonzero eigenvalues are then those
    of Uᵀ M U for an orthonormal basis U of the span, and the rest are exactly zero.
    """
    M_sym = 0.5 * (M + M.T)
    if span is None or span.shape[0] >= M.shape[0]:
        return torch.linalg.eigvalsh(M_sym).flip(0).tolist()
    U, _ = torch.linalg.qr(span.T.to(M))
    small = U.T @ M_sym @ U
    eig = torch.linalg.eigvalsh(0.5 * (small + small.T))
    full = torch.cat([eig, eig.new_zeros(M.shape[0] - eig.numel())])
    return torch.sort(full, descending=True).values.tolist()


def _cosine(a: Tensor, b: Tensor) -> float:
    denom = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(torch.dot(a, b)) / denom if denom > 0 else 0.0


def compare_with_exact_ekf(model: nn.Module, preset: str, batches: Iterable[tuple[Tensor, Tensor]],
                           loss_fn: LossFunction, *, record_every: int = 5,
                           max_parameters: int = MAX_FILTER_PARAMETERS, **preset_kwargs: Any) -> EKFComparison:
    """Train ``model`` with a preset and run the exact EKF's covariance on the same gradients.

    The model is trained in place by the preset (pass a copy to keep it); the exact EKF only
    tracks P, fed the preset's H_k and R_k, so the two see identical measurements. The preset is
    driven with its two-phase API (predict; forward/backward; update) and, unless
    ``implementation`` is given, with the reference path whose state layout is read here.

    Args:
        model: a small network (each filter at most ``max_parameters`` parameters).
        preset: one of :data:`SUPPORTED_PRESETS` (or a registered preset with random-walk dynamics
            and a scalar, diagonal, product or low-rank surrogate).
        batches: an iterable of (inputs, targets); one step per batch.
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses (the statistic for R comes from
            them) or their mean.
        record_every: record spectra at steps 1, 1 + record_every, ... (the cosine every step).
        max_parameters: the largest filter accepted.
        **preset_kwargs: keywords for ``kalmanopt.create`` (sigma, q, lr, r, weight_decay,
            granularity, ...).

    Returns:
        An :class:`EKFComparison` (``.to_dict()`` for JSON logs, :func:`plot_spectra` for figures).

    Example::

        result = compare_with_exact_ekf(model, "koala++", batches,
                                        lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                        record_every=10, sigma=0.1, q=0.01)
    """
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    preset_kwargs.setdefault("implementation", "reference")
    opt = create(preset, model.parameters(), **preset_kwargs)
    f = opt.filter
    if not isinstance(f.dynamics, RandomWalk) or not isinstance(f.surrogate, _SURROGATES) \
            or not isinstance(f.measurement, LossMeasurement):
        raise ValueError(f"preset {preset!r} ({f!r}) cannot be compared with the exact EKF: it needs the loss "
                         "measurement, random-walk dynamics and a scalar, diagonal, product or low-rank "
                         f"surrogate; supported presets: {', '.join(SUPPORTED_PRESETS)}")
    group = opt.param_groups[0]
    named = list(model.named_parameters())
    if group["granularity"] == "global":
        filters = [("global", [p for _, p in named])]
    else:
        filters = [(name, [p]) for name, p in named]
    for name, params in filters:
        n = sum(p.numel() for p in params)
        if n > max_parameters:
            raise ValueError(f"filter {name!r} has {n} parameters, above max_parameters={max_parameters} "
                             f"(the exact P would be {n} × {n}); use a smaller model or raise max_parameters")

    hp_names = ("sigma", "q", "lr", "r", "alpha_r", "weight_decay")
    result = EKFComparison(
        preset=preset, granularity=group["granularity"],
        hyperparameters={k: group[k] for k in hp_names if k in group},
        layers=[name for name, _ in filters], layer_sizes=[sum(p.numel() for p in ps) for _, ps in filters],
    )
    for name, _ in filters:
        result.cosine[name] = []
        result.exact_eigenvalues[name] = []
        result.surrogate_eigenvalues[name] = []
        result.relative_error[name] = []

    sigma, q = float(group["sigma"]), float(group["q"])
    measurement = LossMeasurement()
    exact_state: dict[str, Tensor] = {}
    measurement.init_state(exact_state, group, torch.float64, named[0][1].device)
    P = {name: sigma * torch.eye(n, dtype=torch.float64, device=named[0][1].device)
         for name, n in zip(result.layers, result.layer_sizes)}

    def layer_state(params: list[Tensor]) -> dict:
        return opt.state["group0"].setdefault("global", {}) if group["granularity"] == "global" \
            else opt.state[params[0]]

    k = 0
    predicted = False  # a predict stands until an update consumes it (a skipped step keeps it)
    scalar_P = sigma
    for inputs, targets in batches:
        if not predicted:
            # the scalar surrogate's P_{k-1}, before the predict of step k adds q
            scalar_P = float(opt.state["group0"]["P"]) if "P" in opt.state.get("group0", {}) else sigma
        opt.predict()
        predicted = True
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            losses = loss_fn(model(inputs), targets)
            mean = losses.mean()
            mean.backward()
        losses, mean = losses.detach(), mean.detach()
        statistic = None
        if group["r"] is None:
            statistic = loss_statistic(losses, opt.loss_statistic)
        # what the preset measures at step k: θ_{k-1}, g_k, and its diagonal p_{k-1}
        before = []
        for _, params in filters:
            if all(p.grad is None for p in params):
                before.append(None)
                continue
            theta = torch.cat([p.detach().reshape(-1).double() for p in params])
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                           for p in params])
            p_diag = layer_state(params).get("p")
            before.append((theta, g, None if p_diag is None else p_diag.detach().double().clone()))
        if not opt.update(mean, statistic):
            continue  # a skipped step (non-finite input) changes nothing on either side
        predicted = False
        k += 1
        record = (k - 1) % record_every == 0
        # R_k, the same EMA the preset runs
        R = measurement.noise(exact_state, statistic, group)
        result.steps.append(k)
        result.losses.append(float(mean))
        result.R.append(float(R))
        if record:
            result.spectrum_steps.append(k)
        for (name, params), measured in zip(filters, before):
            P_prev = P[name]
            if record:
                result.exact_eigenvalues[name].append(_eigenvalues(P_prev))
            if measured is None or float(torch.linalg.vector_norm(measured[1])) < SKIP_GRAD_NORM:
                result.cosine[name].append(None)
                if record:
                    result.surrogate_eigenvalues[name].append(None)
                    result.relative_error[name].append(None)
                continue
            theta, g, p_diag = measured
            # H_k = g_k + wd θ_{k-1}
            H, _ = measurement.measure(theta, g, mean.double(), group)
            # the surrogate's covariance at index k − 1 and its v_k ≈ H_k P_{k-1}
            P_sur, v, eigenvalues = _surrogate_at(opt, layer_state(params), H, scalar_P, p_diag, sigma,
                                                  need_matrix=record)
            # cos ∠(v_k, H_k P_{k-1})
            result.cosine[name].append(_cosine(v, P_prev @ H))
            if record:
                result.surrogate_eigenvalues[name].append(eigenvalues)
                err = torch.linalg.matrix_norm(P_sur - P_prev) / torch.linalg.matrix_norm(P_prev)
                result.relative_error[name].append(float(err))
            # the exact posterior P_k, from the same H_k and R_k
            P[name] = exact_ekf_update(P_prev, H, R.double(), q).P
    return result


def _surrogate_at(opt: KalmanOptimizer, state: Mapping[str, Tensor], H: Tensor, scalar_P: float,
                  p_diag: Tensor | None, sigma: float, need_matrix: bool
                  ) -> tuple[Tensor | None, Tensor, list[float] | None]:
    """After step k's update: the surrogate's P_{k-1} as a matrix, its v_k ≈ H_k P_{k-1}, and the
    matrix's eigenvalues, descending (matrix and eigenvalues only with ``need_matrix``)."""
    surrogate = opt.filter.surrogate
    n = H.numel()
    if isinstance(surrogate, ScalarSurrogate):
        # P_{k-1} = p I;  v_k = p H_k
        if not need_matrix:
            return None, scalar_P * H, None
        return scalar_P * torch.eye(n, dtype=torch.float64, device=H.device), scalar_P * H, [scalar_P] * n
    if isinstance(surrogate, DiagonalSurrogate):
        # P_{k-1} = diag(p_{k-1});  v_k = p_{k-1} ∘ H_k
        p = p_diag if p_diag is not None else torch.full_like(H, sigma)
        if not need_matrix:
            return None, p * H, None
        return torch.diag(p), p * H, torch.sort(p, descending=True).values.tolist()
    # product surrogates: v_k from the state; P̃ from the estimator's constraints, in span(H, v, older rows)
    v = state["v"].detach().double()
    if not need_matrix:
        return None, v, None
    span = [state["H"][None], state["v"][None]]
    if isinstance(surrogate, LowRankSurrogate):
        rows, products = surrogate.older_rows(state)
        span += [rows, products]
    P_tilde = surrogate_covariance(opt, state).double()
    return P_tilde, v, _eigenvalues(P_tilde, torch.cat(span).double())
