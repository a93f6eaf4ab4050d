"""Figures of an :class:`~kalmanopt.analysis.compare.EKFComparison` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from kalmanopt.analysis.compare import EKFComparison

__all__ = ["plot_spectra"]


def _pick(values: Sequence[Any], count: int) -> list[int]:
    """Up to ``count`` indices spread evenly over ``values``, first and last included."""
    n = len(values)
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _nonzero(eigenvalues: Sequence[float], rank_tolerance: float) -> list[float]:
    """The eigenvalues with |λ| > rank_tolerance · max |λ|."""
    scale = max((abs(e) for e in eigenvalues), default=0.0)
    return [e for e in eigenvalues if abs(e) > rank_tolerance * scale]


def plot_spectra(result: EKFComparison | Mapping[str, Any], path: str | Path, *,
                 layers: Sequence[str] | None = None, max_steps: int = 4, rank_tolerance: float = 1e-10,
                 dpi: int = 90) -> Path:
    """Eigenvalue spectra of the exact P against the surrogate's, and the cosine over steps.

    One row per layer: on the left, eigenvalue against index (log scale, descending) of the
    exact P_{k-1} (solid) and of the surrogate's covariance (dashed, markers) at up to
    ``max_steps`` recorded steps. A log axis shows only positive eigenvalues, and those of a
    low-rank estimate are mostly rounding noise around zero: eigenvalues with
    ``|λ|`` ≤ rank_tolerance · max ``|λ|`` count as zero and are not drawn; the legend gives, per step,
    how many of the surrogate's are positive and negative, and the negative ones are drawn as
    crosses at ``|λ|``, at their place in the descending order. On the right, cos ∠(v_k, H_k P_{k-1})
    over steps.

    Args:
        result: the output of :func:`compare_with_exact_ekf`, or its ``to_dict()``.
        path: the PNG to write (folders are created).
        layers: the layers to draw (default: all, at most 4, the largest first).
        max_steps: how many recorded steps to draw per layer.
        rank_tolerance: relative size below which an eigenvalue counts as zero.
        dpi: resolution of the PNG.

    Returns:
        The path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is a dev and runner dependency
        raise ImportError("plot_spectra needs matplotlib: pip install 'kalmanopt[runner]'") from error
    if not isinstance(result, EKFComparison):
        result = EKFComparison.from_dict(result)
    if layers is None:
        order = sorted(range(len(result.layers)), key=lambda i: -result.layer_sizes[i])
        layers = [result.layers[i] for i in order[:4]]
    unknown = [name for name in layers if name not in result.layers]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; valid: {', '.join(result.layers)}")
    if not layers or not result.spectrum_steps:
        raise ValueError("nothing to plot: the comparison recorded no spectra (no steps were run)")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0.0 <= rank_tolerance < 1.0:
        raise ValueError(f"rank_tolerance must lie in [0, 1), got {rank_tolerance}")

    picked = _pick(result.spectrum_steps, max_steps)
    colors = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 3.2 * len(layers)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    for row, name in enumerate(layers):
        ax_spec, ax_cos = axes[row]
        any_negative = False
        for j, i in enumerate(picked):
            k = result.spectrum_steps[i]
            color = colors(j / max(1, len(picked) - 1) * 0.85)
            exact = _nonzero(result.exact_eigenvalues[name][i], rank_tolerance)
            positive = [e for e in exact if e > 0]
            ax_spec.plot(range(1, len(positive) + 1), positive, color=color, lw=1.6, label=f"exact P, k={k}")
            surrogate = result.surrogate_eigenvalues[name][i]
            if surrogate is None:
                continue
            nonzero = _nonzero(surrogate, rank_tolerance)
            positive = [e for e in nonzero if e > 0]
            negative = [-e for e in nonzero if e < 0]
            ax_spec.plot(range(1, len(positive) + 1), positive, color=color, ls="--", marker="o", ms=3, lw=1.0,
                         label=f"{result.preset}, k={k}: {len(positive)} > 0, {len(negative)} < 0")
            if negative:
                # negative eigenvalues sit at the end of the descending order: |λ| there, as crosses
                n = len(surrogate)
                ax_spec.plot(range(n - len(negative) + 1, n + 1), negative, color=color, ls="none", marker="x",
                             ms=5)
                any_negative = True
        ax_spec.set_yscale("log")
        ax_spec.set_xlabel("index (descending)")
        ax_spec.set_ylabel("eigenvalue")
        ax_spec.set_title(f"{name} ({result.layer_sizes[result.layers.index(name)]} parameters): spectra of P",
                          fontsize=9)
        if any_negative:
            ax_spec.plot([], [], color="0.3", ls="none", marker="x", label="|λ| of a negative eigenvalue")
        ax_spec.legend(fontsize=6.5, ncol=2)
        ax_spec.grid(alpha=0.3, which="both", lw=0.4)
        cos = [float("nan") if c is None else c for c in result.cosine[name]]
        ax_cos.plot(result.steps, cos, color="C3", lw=1.2)
        ax_cos.set_ylim(-1.05, 1.05)
        ax_cos.axhline(0.0, color="0.6", lw=0.6)
        ax_cos.set_xlabel("step k")
        ax_cos.set_ylabel("cosine")
        ax_cos.set_title(f"cos(v_k, exact H_k P_(k-1)) for {result.preset}", fontsize=9)
        ax_cos.grid(alpha=0.3, lw=0.4)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
