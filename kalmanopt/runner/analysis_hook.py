"""Exact curvature, gradient noise and the exact EKF for small models, from :mod:`kalmanopt.analysis`.

Turned on by ``[analysis] enabled = true`` in a config. Two things happen:

- during every run, at step 0 and every ``every`` steps, on a fixed batch of ``samples`` training
  examples: the largest Hessian eigenvalue (power iteration on ``torch.func`` Hessian-vector
  products), the trace of the per-sample gradient covariance (``vmap(grad)``) and the gradient
  norm; logged as ``"analysis"`` records and plotted in ``curvature.png``;
- after the grid, for each Kalman preset the exact EKF can stand beside (random-walk dynamics;
  :data:`kalmanopt.analysis.SUPPORTED_PRESETS`), its first seed is re-run for ``ekf_steps`` steps
  beside the exact EKF on the same gradients; the eigenvalues of the exact P and of the
  surrogate's implied covariance (Figure 3 of the KOALA++ paper) go to ``ekf-<label>.json`` and
  ``spectra-<label>.png``.

Both apply only where the model is small enough: at most ``max_params`` parameters in all for the
curvature, and per layer for the exact EKF (its P is n × n).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kalmanopt.analysis import (
    SUPPORTED_PRESETS,
    compare_with_exact_ekf,
    gradient_covariance,
    hessian_vector_product,
    per_sample_gradients,
    plot_spectra,
)
from kalmanopt.runner.config import ANALYSIS_DEFAULTS, ExperimentConfig
from kalmanopt.runner.tasks import Dataset, Task

__all__ = ["ANALYSIS_DEFAULTS", "analysis_options", "make_analysis_hook", "run_ekf_comparisons"]

def analysis_options(config: ExperimentConfig) -> dict[str, Any]:
    """The ``[analysis]`` table with defaults filled in."""
    return {**ANALYSIS_DEFAULTS, **config.analysis}


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def make_analysis_hook(config: ExperimentConfig, task: Task, data: Dataset
                       ) -> Callable[[nn.Module, torch.optim.Optimizer, int], dict[str, Any] | None]:
    """The per-run curvature probe ``(model, optimizer, step) -> record or None``."""
    options = analysis_options(config)
    n = min(int(options["samples"]), len(data.train_targets))
    generator = torch.Generator().manual_seed(12345)
    if task.kind == "language":
        inputs, targets = next(task.batches(data, n, generator))
    else:
        inputs = task.prepare(data.train_inputs[:n], data, generator, train=False)
        targets = data.train_targets[:n]

    def probe(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any] | None:
        size = sum(p.numel() for p in model.parameters())
        if size > int(options["max_params"]):
            return None
        was_training = model.training
        if _has_batch_norm(model):
            model.eval()  # batch norm in training mode mixes samples: no per-sample gradients
        try:
            params = {name: p.detach() for name, p in model.named_parameters()}
            grads = per_sample_gradients(model, params, inputs, targets, task.per_sample_loss, flat=True)
            noise = float(torch.trace(gradient_covariance(grads)))
            gradient_norm = float(grads.mean(dim=0).norm())
            # power iteration on v ↦ ∇²L v
            vector = torch.randn(size, generator=torch.Generator().manual_seed(step), dtype=grads.dtype)
            vector = (vector / vector.norm()).to(grads.device)
            eigenvalue = math.nan
            for _ in range(int(options["power_iterations"])):
                hv = hessian_vector_product(model, params, inputs, targets, task.per_sample_loss, vector)
                eigenvalue = float(torch.dot(vector, hv))
                norm = float(hv.norm())
                if norm == 0.0 or not math.isfinite(norm):
                    break
                vector = hv / norm
        finally:
            model.train(was_training)
        return {"hessian_top_eigenvalue": eigenvalue, "gradient_noise_trace": noise, "gradient_norm": gradient_norm}

    return probe


def run_ekf_comparisons(config: ExperimentConfig, task: Task, data: Dataset, out: Path,
                        labels_done: set[str]) -> list[Path]:
    """Re-run each supported preset's first seed beside the exact EKF; write JSON and spectra plots.

    Args:
        labels_done: optimizer labels (file-name safe) whose ``ekf-<label>.json`` already exists (resume skips them).

    Returns:
        The PNG files written.
    """
    options = analysis_options(config)
    written = []
    keys = ("sigma", "q", "lr", "r", "alpha_r", "weight_decay", "granularity", "memory")
    for spec in config.optimizers:
        safe = "".join(c if c.isalnum() or c in "+-_." else "_" for c in spec.label)
        if spec.family != "preset" or spec.name not in SUPPORTED_PRESETS or safe in labels_done:
            continue
        setting = spec.settings()[0]
        seed = config.seeds[0]
        torch.manual_seed(seed)
        model = task.build_model(config.model, data, config.model_options).to(config.resolved_device())
        largest = max(p.numel() for p in model.parameters())
        if largest > int(options["max_params"]):
            continue
        generator = torch.Generator().manual_seed(seed)
        epochs = itertools.chain.from_iterable(task.batches(data, config.batch_size, generator)
                                               for _ in itertools.count())
        batches = itertools.islice(epochs, int(options["ekf_steps"]))
        result = compare_with_exact_ekf(model, spec.name, batches, task.per_sample_loss,
                                        record_every=int(options["ekf_record_every"]),
                                        max_parameters=int(options["max_params"]),
                                        **{k: v for k, v in setting.items() if k in keys})
        (out / f"ekf-{safe}.json").write_text(json.dumps(result.to_dict()) + "\n", encoding="utf-8")
        written.append(plot_spectra(result, out / f"spectra-{safe}.png"))
    return written
