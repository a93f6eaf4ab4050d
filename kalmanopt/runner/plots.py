"""PNG plots of a grid: learning curves (mean with a band over seeds) and the filters' diagnostics.

Everything is read back from ``metrics.jsonl`` and ``results.json``, so a finished folder can be
re-plotted (``kalmanopt plot DIR``). Figures are built with matplotlib's object API
(``matplotlib.figure.Figure``), which needs no display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kalmanopt.runner.results import group_runs

__all__ = ["plot_all", "plot_curves", "plot_diagnostics", "plot_layer_diagnostics", "plot_distance",
           "plot_curvature", "DIAGNOSTIC_QUANTITIES"]

#: per-layer diagnostics: key in the records -> (title, y scale)
DIAGNOSTIC_QUANTITIES: dict[str, tuple[str, str]] = {
    "S": ("innovation variance $S_k$", "log"),
    "gain_scale": ("gain scale $\\eta L_\\ell / S_k$", "log"),
    "lambda": ("$\\lambda_k$", "symlog"),
    "alpha": ("$\\alpha_k$", "symlog"),
    "w": ("$w_k$", "symlog"),
    "angle_Hv": ("angle between $H_k$ and $v_k$ (degrees)", "linear"),
    "rows_kept": ("low-rank rows kept", "linear"),
}

_THIRD_PANEL = {
    "val_accuracy": ("val_error", "validation error (%)", 100.0, "linear"),
    "val_perplexity": ("val_perplexity", "validation perplexity", 1.0, "log"),
    "distance_to_optimum": ("distance_to_optimum", "distance to optimum $\\|\\theta - \\theta^*\\|$", 1.0, "log"),
}


def _figure(rows: int, cols: int, width: float = 4.6, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(names)
    if len(names) <= 10:
        return {name: colormaps["tab10"](i) for i, name in enumerate(names)}
    if len(names) <= 20:
        return {name: colormaps["tab20"](i) for i, name in enumerate(names)}
    return {name: colormaps["turbo"](i / (len(names) - 1)) for i, name in enumerate(names)}


def _group_of(records: list[dict[str, Any]]) -> dict[str, str]:
    return {r["run_id"]: name for name, runs in group_runs(records).items() for r in runs}


def _band(ax: Any, series: dict[str, dict[float, float]], label: str, color: Any, log: bool = False) -> None:
    """Mean over runs with a ±1 std band, at the x values every run has.

    With ``log``, mean and band are taken of log values (a geometric mean with a ×/÷ band), so a
    band on a log axis never reaches zero.
    """
    xs = sorted(set.intersection(*(set(s) for s in series.values()))) if series else []
    if not xs:
        return
    values = np.array([[s[x] for x in xs] for s in series.values()], dtype=float)
    if log:
        values = np.log(np.maximum(values, 1e-300))
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
    low, high = mean - std, mean + std
    if log:
        mean, low, high = np.exp(mean), np.exp(low), np.exp(high)
    ax.plot(xs, mean, color=color, label=label, lw=1.6)
    if len(values) > 1:
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)


def _legend(fig: Any, axes: Any, fontsize: int = 8) -> None:
    """A legend in the first panel, or beside the figure when there are many lines."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        for row in axes:
            for ax in row:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    break
            if handles:
                break
    if len(handles) <= 8:
        axes[0][0].legend(handles, labels, fontsize=fontsize)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=fontsize, ncol=math.ceil(len(handles) / 16))


def _finish(ax: Any, title: str, xlabel: str, scale: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=1e-3)
    elif scale != "linear":
        ax.set_yscale(scale)
    ax.grid(True, alpha=0.3)


def plot_curves(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                x_key: str = "epoch", title: str = "") -> Path | None:
    """Training loss, validation loss and validation error (or perplexity, or distance) per optimizer.

    One line per optimizer: the mean over seeds, with a band of ±1 standard deviation (as Figure 1
    of the KOALA++ paper).
    """
    group_of = _group_of(records)
    evals = [m for m in metrics if m.get("kind") == "eval" and m.get("run_id") in group_of]
    if not evals:
        return None
    third = next((v for k, v in _THIRD_PANEL.items() if k in evals[0]), None)
    panels = [("train_loss", "training loss", 1.0, "log"), ("val_loss", "validation loss", 1.0, "log")]
    if third is not None:
        panels.append(third)
    fig, axes = _figure(1, len(panels))
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for ax, (key, label, scale, yscale) in zip(axes[0], panels):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in evals:
                if group_of[m["run_id"]] == name and m.get(key) is not None and math.isfinite(m[key]):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = m[key] * scale
            _band(ax, series, name, colors[name], log=yscale == "log")
        _finish(ax, label, x_key, yscale)
    _legend(fig, axes, 8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def _layer_values(record: dict[str, Any], quantity: str) -> list[float]:
    values = []
    for entry in record.get("layers", {}).values():
        if quantity == "angle_Hv":
            if "cos_Hv" in entry:
                values.append(math.degrees(math.acos(max(-1.0, min(1.0, entry["cos_Hv"])))))
        elif quantity in entry:
            values.append(entry[quantity])
    return [v for v in values if v is not None and math.isfinite(v)]


def plot_diagnostics(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                     x_key: str = "step") -> Path | None:
    """The filters' internals compared across optimizers: per step, the median over layers.

    Panels: S_k, the gain scale, λ_k, α_k, w_k, the angle between H_k and v_k (KOALA++ paper,
    Figure 4), the low-rank rows kept, and the cumulative count of skipped layers; each line is the
    mean over seeds with a ±1 std band.
    """
    group_of = _group_of(records)
    diags = [m for m in metrics if m.get("kind") == "diagnostics" and m.get("run_id") in group_of]
    if not diags:
        return None
    quantities = [q for q in DIAGNOSTIC_QUANTITIES if any(_layer_values(d, q) for d in diags)]
    panels = quantities + ["skipped_layers"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols)
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for index, quantity in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for d in diags:
                if group_of[d["run_id"]] != name:
                    continue
                if quantity == "skipped_layers":
                    value = float(d["counters"].get("skipped_layers", 0))
                else:
                    values = _layer_values(d, quantity)
                    if not values:
                        continue
                    value = float(np.median(values))
                series.setdefault(d["run_id"], {})[round(d[x_key], 6)] = value
            log = quantity != "skipped_layers" and DIAGNOSTIC_QUANTITIES[quantity][1] == "log"
            _band(ax, series, name, colors[name], log=log)
        if quantity == "skipped_layers":
            _finish(ax, "skipped layers (cumulative)", x_key, "linear")
        else:
            title, scale = DIAGNOSTIC_QUANTITIES[quantity]
            _finish(ax, title + " (median over layers)", x_key, scale)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    _legend(fig, axes, 8)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_layer_diagnostics(metrics: list[dict[str, Any]], run_id: str, path: str | Path, title: str,
                           x_key: str = "step", max_layers: int = 12) -> Path | None:
    """One run's internals, one line per layer (at most ``max_layers``, evenly chosen)."""
    diags = [m for m in metrics if m.get("kind") == "diagnostics" and m.get("run_id") == run_id]
    if not diags:
        return None
    layers = list(dict.fromkeys(k for d in diags for k in d.get("layers", {})))
    if len(layers) > max_layers:
        layers = [layers[round(i * (len(layers) - 1) / (max_layers - 1))] for i in range(max_layers)]
    quantities = [q for q in DIAGNOSTIC_QUANTITIES if any(_layer_values(d, q) for d in diags)]
    if not quantities:
        return None
    cols = min(3, len(quantities))
    rows = math.ceil(len(quantities) / cols)
    fig, axes = _figure(rows, cols)
    colors = _colors(layers)
    for index, quantity in enumerate(quantities):
        ax = axes[index // cols][index % cols]
        for layer in layers:
            xs, ys = [], []
            for d in diags:
                entry = d.get("layers", {}).get(layer)
                if entry is None:
                    continue
                values = _layer_values({"layers": {layer: entry}}, quantity)
                if values:
                    xs.append(d[x_key])
                    ys.append(values[0])
            if xs:
                ax.plot(xs, ys, color=colors[layer], label=layer, lw=1.2)
        title_q, scale = DIAGNOSTIC_QUANTITIES[quantity]
        _finish(ax, title_q, x_key, scale)
    for index in range(len(quantities), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    _legend(fig, axes, 7)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_distance(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                  x_key: str = "step") -> Path | None:
    """Distance to the known optimum ‖θ − θ*‖ and excess training loss (the ``quadratic`` task)."""
    group_of = _group_of(records)
    evals = [m for m in metrics if m.get("kind") == "eval" and m.get("run_id") in group_of
             and "distance_to_optimum" in m]
    if not evals:
        return None
    fig, axes = _figure(1, 2)
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for ax, (key, label) in zip(axes[0], (("distance_to_optimum", "distance to optimum $\\|\\theta-\\theta^*\\|$"),
                                          ("excess_train_loss", "excess training loss $L(\\theta) - L(\\theta^*)$"))):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in evals:
                value = m.get(key)
                if group_of[m["run_id"]] == name and value is not None and math.isfinite(value):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = max(value, 1e-12)
            _band(ax, series, name, colors[name], log=True)
        _finish(ax, label, x_key, "log")
    _legend(fig, axes, 8)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_curvature(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                   x_key: str = "step") -> Path | None:
    """Exact curvature along training: the largest Hessian eigenvalue and the gradient noise.

    Reads the ``"analysis"`` records (``[analysis] enabled = true``): per optimizer, the mean over
    seeds with a ±1 std band of the top eigenvalue of ∇²L and of the trace of the per-sample
    gradient covariance, both on a fixed training batch.
    """
    group_of = _group_of(records)
    analyses = [m for m in metrics if m.get("kind") == "analysis" and m.get("run_id") in group_of]
    if not analyses:
        return None
    panels = (("hessian_top_eigenvalue", "largest Hessian eigenvalue", "linear"),
              ("gradient_noise_trace", "trace of the per-sample gradient covariance", "log"),
              ("gradient_norm", "gradient norm", "log"))
    fig, axes = _figure(1, len(panels))
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for ax, (key, label, scale) in zip(axes[0], panels):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in analyses:
                value = m.get(key)
                if group_of[m["run_id"]] == name and value is not None and math.isfinite(value):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = value
            _band(ax, series, name, colors[name], log=scale == "log")
        _finish(ax, label, x_key, scale)
        low, high = ax.get_ylim()
        if scale == "linear" and high - low < 1e-3 * max(abs(low), abs(high)):
            ax.set_ylim(min(0.0, 1.2 * low), max(0.0, 1.2 * high))  # a constant curvature (a quadratic)
    _legend(fig, axes, 8)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_all(out: str | Path, metrics: list[dict[str, Any]], records: list[dict[str, Any]], x_key: str = "epoch",
             title: str = "") -> list[Path]:
    """Every plot the grid's records support, written into ``out``; returns the files written."""
    out = Path(out)
    written = [plot_curves(metrics, records, out / "curves.png", x_key, title),
               plot_diagnostics(metrics, records, out / "diagnostics.png"),
               plot_distance(metrics, records, out / "distance_to_optimum.png", x_key),
               plot_curvature(metrics, records, out / "curvature.png", x_key)]
    for name, runs in group_runs(records).items():
        first = min(runs, key=lambda r: r["seed"])
        safe = "".join(c if c.isalnum() or c in "+-_." else "_" for c in name)
        written.append(plot_layer_diagnostics(metrics, first["run_id"], out / f"diagnostics-{safe}.png",
                                              f"{name}, seed {first['seed']}: per-layer internals"))
    written += plot_spectra_files(out)
    return [p for p in written if p is not None]


def plot_spectra_files(out: str | Path) -> list[Path]:
    """``spectra-<label>.png`` for every ``ekf-<label>.json`` of the exact-EKF comparison in ``out``."""
    import json

    from kalmanopt.analysis import plot_spectra

    written = []
    for path in sorted(Path(out).glob("ekf-*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a comparison cut short; the run writes it again on resume
        target = path.with_name("spectra-" + path.stem[len("ekf-"):] + ".png")
        written.append(plot_spectra(result, target))
    return written
