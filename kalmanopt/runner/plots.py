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

from kalmanopt.analysis import plot_spectra
from kalmanopt.runner.results import group_runs
from kalmanopt.runner.storage import atomic_write_bytes

__all__ = ["plot_all", "plot_curves", "plot_diagnostics", "plot_layer_diagnostics", "plot_distance",
           "plot_curvature", "DIAGNOSTIC_QUANTITIES"]

#: per-layer diagnostics: key in the records -> (title, y label, y scale, valid range)
#: ``"magnitude"`` quantities have either sign: their magnitude is drawn on a log axis, and records
#: where the value was negative are marked apart (▽), instead of a symlog axis flipping sign.
DIAGNOSTIC_QUANTITIES: dict[str, tuple[str, str, str, tuple[float, float]]] = {
    "S": ("innovation variance $S_k$", "$S_k$ (loss$^2$)", "log", (0.0, math.inf)),
    "gain_scale": ("gain scale $\\eta L_\\ell / S_k$", "$\\eta L_\\ell / S_k$ (1 / loss)", "log", (0.0, math.inf)),
    "lambda": ("$|\\lambda_k|$ (▽: negative)", "$|\\lambda_k|$", "magnitude", (0.0, math.inf)),
    "alpha": ("$|\\alpha_k|$ (▽: negative)", "$|\\alpha_k|$", "magnitude", (0.0, math.inf)),
    "w": ("$|w_k|$ (▽: negative)", "$|w_k|$", "magnitude", (0.0, math.inf)),
    "angle_Hv": ("angle between $H_k$ and $v_k$", "angle (degrees)", "linear", (0.0, 180.0)),
    "rows_kept": ("low-rank rows kept", "rows", "linear", (0.0, math.inf)),
}

_THIRD_PANEL = {
    "val_accuracy": ("val_error", "validation error", "error (%)", 100.0, "linear"),
    "val_perplexity": ("val_perplexity", "validation perplexity", "perplexity", 1.0, "log"),
    "distance_to_optimum": ("distance_to_optimum", "distance to optimum", "$\\|\\theta - \\theta^*\\|$", 1.0, "log"),
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


def _band(ax: Any, series: dict[str, dict[float, float]], label: str, color: Any, log: bool = False,
          valid: tuple[float, float] = (-math.inf, math.inf), negative: dict[str, dict[float, bool]] | None = None
          ) -> None:
    """Mean over runs with a ±1 std band, at the x values every run has; the band is clipped to ``valid``.

    With ``log``, mean and band are taken of log values (a geometric mean with a ×/÷ band), so a
    band on a log axis never reaches zero. ``negative`` (run -> x -> whether the signed value was
    negative) marks with ▽ the x values where most runs were negative.
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
    low, high = np.clip(low, *valid), np.clip(high, *valid)
    ax.plot(xs, mean, color=color, label=label, lw=1.6)
    if len(values) > 1:
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
    if negative:
        marks = [i for i, x in enumerate(xs)
                 if sum(negative.get(run, {}).get(x, False) for run in series) * 2 > len(series)]
        if marks:
            ax.plot([xs[i] for i in marks], [mean[i] for i in marks], linestyle="none", marker="v", ms=4,
                    color=color, markerfacecolor="none")


def _legend(fig: Any, axes: Any, fontsize: int = 8) -> None:
    """One legend for the whole figure, beside the panels (every panel draws the same lines)."""
    handles, labels = [], []
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=fontsize,
                   ncol=max(1, math.ceil(len(handles) / 20)), title="optimizer", title_fontsize=fontsize)


def _x_label(x_key: str) -> str:
    return {"epoch": "epoch", "step": "optimizer step"}.get(x_key, x_key)


def _finish(ax: Any, title: str, x_key: str, ylabel: str, scale: str) -> None:
    """Title, axis labels, grid and the y scale; a log scale over less than a decade becomes linear,
    where it would show one or two tick labels."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(_x_label(x_key))
    ax.set_ylabel(ylabel)
    if scale in ("log", "magnitude"):
        data = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]])
        data = data[np.isfinite(data) & (data > 0)]
        if len(data) and data.max() / data.min() >= 10.0:
            ax.set_yscale("log")
    elif scale == "count":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = ax.get_ylim()
        ax.set_ylim(0.0, max(high, 1.0))
    ax.grid(True, alpha=0.3)


def _loss_unit(records: list[dict[str, Any]]) -> str:
    """The unit of the loss: nats for cross-entropy tasks, squared units for least squares."""
    return "" if records and records[0].get("task") == "quadratic" else " (nats)"


def plot_curves(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                x_key: str = "epoch", title: str = "") -> Path | None:
    """Training loss, validation loss and validation error (or perplexity, or distance) per optimizer.

    One line per optimizer: the mean over seeds, with a band of ±1 standard deviation (as Figure 1
    of the KOALA++ paper); one legend for the figure.
    """
    group_of = _group_of(records)
    evals = [m for m in metrics if m.get("kind") == "eval" and m.get("run_id") in group_of]
    if not evals:
        return None
    third = next((v for k, v in _THIRD_PANEL.items() if k in evals[0]), None)
    unit = _loss_unit(records)
    panels = [("train_loss", "training loss (mean since the last validation)", "loss" + unit, 1.0, "log"),
              ("val_loss", "validation loss", "loss" + unit, 1.0, "log")]
    if third is not None:
        panels.append(third)
    fig, axes = _figure(1, len(panels))
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for ax, (key, label, ylabel, scale, yscale) in zip(axes[0], panels):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in evals:
                if group_of[m["run_id"]] == name and m.get(key) is not None and math.isfinite(m[key]):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = m[key] * scale
            valid = (0.0, 100.0) if key == "val_error" else (0.0, math.inf)
            _band(ax, series, name, colors[name], log=yscale == "log", valid=valid)
        _finish(ax, label, x_key, ylabel, yscale)
    _legend(fig, axes, 8)
    if title:
        fig.suptitle(title)
    _save(fig, path, 110)
    return Path(path)


def _save(fig: Any, path: str | Path, dpi: int) -> None:
    """Write the PNG atomically (a kill leaves the old figure or the new one)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _layer_values(record: dict[str, Any], quantity: str, signed: bool = False) -> list[float]:
    """One value per layer; magnitudes for the signed quantities unless ``signed``."""
    values = []
    for entry in record.get("layers", {}).values():
        if quantity == "angle_Hv":
            if "cos_Hv" in entry and entry["cos_Hv"] is not None:
                values.append(math.degrees(math.acos(max(-1.0, min(1.0, entry["cos_Hv"])))))
        elif quantity in entry and entry[quantity] is not None:
            value = entry[quantity]
            values.append(value if signed or DIAGNOSTIC_QUANTITIES[quantity][2] != "magnitude" else abs(value))
    return [v for v in values if math.isfinite(v)]


def _diagnostic_panel(ax: Any, quantity: str, runs: dict[str, list[dict[str, Any]]], colors: dict[str, Any],
                      x_key: str, per_layer: str | None = None) -> None:
    """One quantity: per line (an optimizer's runs, or one layer), the median over layers (or the layer)."""
    _, _, scale, valid = DIAGNOSTIC_QUANTITIES[quantity]
    for name, diags in runs.items():
        series: dict[str, dict[float, float]] = {}
        negative: dict[str, dict[float, bool]] = {}
        for d in diags:
            record = d if per_layer is None else {"layers": {per_layer: d.get("layers", {}).get(per_layer, {})}}
            values = _layer_values(record, quantity)
            if not values:
                continue
            x = round(d[x_key], 6)
            series.setdefault(d["run_id"], {})[x] = float(np.median(values))
            if scale == "magnitude":
                signed = _layer_values(record, quantity, signed=True)
                negative.setdefault(d["run_id"], {})[x] = float(np.median(signed)) < 0
        positive = scale in ("log", "magnitude")
        if positive:
            series = {run: {x: v for x, v in s.items() if v > 0} for run, s in series.items()}
        _band(ax, series, name, colors[name], log=positive, valid=valid, negative=negative or None)


def plot_diagnostics(metrics: list[dict[str, Any]], records: list[dict[str, Any]], path: str | Path,
                     x_key: str = "step") -> Path | None:
    """The filters' internals compared across optimizers: per step, the median over layers.

    Panels: S_k, the gain scale, ``|λ_k|``, ``|α_k|``, ``|w_k|`` (magnitudes on log axes; ▽ where the value
    was negative), the angle between H_k and v_k (KOALA++ paper, Figure 4), the low-rank rows
    kept, and the cumulative count of skipped layers; each line is the mean over seeds with a
    ±1 std band, clipped to the quantity's valid range.
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
    names = [n for n in names if any(group_of[d["run_id"]] == n for d in diags)]
    colors = _colors(names)
    runs = {name: [d for d in diags if group_of[d["run_id"]] == name] for name in names}
    for index, quantity in enumerate(panels):
        ax = axes[index // cols][index % cols]
        if quantity == "skipped_layers":
            for name in names:
                series: dict[str, dict[float, float]] = {}
                for d in runs[name]:
                    series.setdefault(d["run_id"], {})[round(d[x_key], 6)] = \
                        float(d["counters"].get("skipped_layers", 0))
                _band(ax, series, name, colors[name], valid=(0.0, math.inf))
            _finish(ax, "skipped layer updates (cumulative)", x_key, "layer updates skipped", "count")
        else:
            _diagnostic_panel(ax, quantity, runs, colors, x_key)
            title, ylabel, scale, _ = DIAGNOSTIC_QUANTITIES[quantity]
            _finish(ax, title + ", median over layers", x_key, ylabel, scale)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    _legend(fig, axes, 8)
    fig.suptitle("Kalman filters' internals (mean over seeds, ±1 std)")
    _save(fig, path, 100)
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
            _diagnostic_panel(ax, quantity, {layer: diags}, colors, x_key, per_layer=layer)
        title_q, ylabel, scale, _ = DIAGNOSTIC_QUANTITIES[quantity]
        _finish(ax, title_q, x_key, ylabel, scale)
    for index in range(len(quantities), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    _legend(fig, axes, 7)
    fig.legends[-1].set_title("layer")
    fig.suptitle(title)
    _save(fig, path, 100)
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
    for ax, (key, label, ylabel) in zip(axes[0], (
            ("distance_to_optimum", "distance to the optimum", "$\\|\\theta-\\theta^*\\|$"),
            ("excess_train_loss", "excess training loss", "$L(\\theta) - L(\\theta^*)$"))):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in evals:
                value = m.get(key)
                if group_of[m["run_id"]] == name and value is not None and math.isfinite(value):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = max(value, 1e-12)
            _band(ax, series, name, colors[name], log=True, valid=(0.0, math.inf))
        _finish(ax, label, x_key, ylabel, "log")
    _legend(fig, axes, 8)
    _save(fig, path, 110)
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
    panels = (("hessian_top_eigenvalue", "largest Hessian eigenvalue", "$\\lambda_{max}(\\nabla^2 L)$", "linear"),
              ("gradient_noise_trace", "per-sample gradient covariance", "trace", "log"),
              ("gradient_norm", "gradient norm", "$\\|\\nabla L\\|$", "log"))
    fig, axes = _figure(1, len(panels))
    names = list(dict.fromkeys(group_of[r["run_id"]] for r in records))
    colors = _colors(names)
    for ax, (key, label, ylabel, scale) in zip(axes[0], panels):
        for name in names:
            series: dict[str, dict[float, float]] = {}
            for m in analyses:
                value = m.get(key)
                if group_of[m["run_id"]] == name and value is not None and math.isfinite(value):
                    series.setdefault(m["run_id"], {})[round(m[x_key], 6)] = value
            _band(ax, series, name, colors[name], log=scale == "log",
                  valid=(-math.inf if key == "hessian_top_eigenvalue" else 0.0, math.inf))
        _finish(ax, label, x_key, ylabel, scale)
        low, high = ax.get_ylim()
        if scale == "linear" and high - low < 1e-3 * max(abs(low), abs(high)):
            ax.set_ylim(min(0.0, 1.2 * low), max(0.0, 1.2 * high))  # a constant curvature (a quadratic)
    _legend(fig, axes, 8)
    _save(fig, path, 100)
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

    written = []
    for path in sorted(Path(out).glob("ekf-*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a comparison cut short; the run writes it again on resume
        target = path.with_name("spectra-" + path.stem[len("ekf-"):] + ".png")
        written.append(plot_spectra(result, target))
    return written
