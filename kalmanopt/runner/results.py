"""``results.json``, ``results.csv`` and ``summary.md``: the runs, flat, and one row per optimizer."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["json_safe", "FIGURES", "save_results", "load_results", "summary_table", "group_runs", "primary_figure"]

#: the figures the summary reports, in order: key -> (column title, scale, lower is better)
FIGURES: dict[str, tuple[str, float, bool]] = {
    "val_accuracy": ("val accuracy (%)", 100.0, False),
    "val_perplexity": ("val perplexity", 1.0, True),
    "distance_to_optimum": ("distance to optimum", 1.0, True),
    "val_loss": ("val loss", 1.0, True),
    "final_train_loss": ("final train loss", 1.0, True),
    "hessian_top_eigenvalue": ("top Hessian eigenvalue", 1.0, True),
    "seconds": ("seconds", 1.0, True),
    "seconds_per_step": ("ms / step", 1000.0, True),
}


def json_safe(value: Any) -> Any:
    """NaN and infinities become ``null`` in JSON (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key == "hyperparameters":
            row.update({f"hp_{k}": v for k, v in value.items()})
        elif key == "counters":
            row.update({f"counter_{k}": v for k, v in value.items()})
        elif isinstance(value, (dict, list)):
            row[key] = json.dumps(value)
        else:
            row[key] = value
    return row


def save_results(out: str | Path, records: list[dict[str, Any]]) -> None:
    """Write ``results.json`` (a list of runs) and ``results.csv`` (the same, one flat row each).

    The JSON is written to a temporary file and renamed, so an interrupted write never leaves a
    torn file behind.
    """
    out = Path(out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps([json_safe(r) for r in records], indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    rows = [_flat(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The runs in ``out/results.json`` (empty if there is none); ``null`` figures come back as NaN."""
    path = Path(out) / "results.json"
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []
    for record in records:
        for key in FIGURES:
            if key in record and record[key] is None:
                record[key] = math.nan
    return records


def primary_figure(records: list[dict[str, Any]]) -> str:
    """The figure that ranks optimizers: accuracy, perplexity, distance to the optimum, else val loss."""
    for key in ("val_accuracy", "val_perplexity", "distance_to_optimum"):
        if any(key in r for r in records):
            return key
    return "val_loss"


def _varying(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per optimizer label, the hyper-parameters that take more than one value among its runs."""
    values: dict[str, dict[str, set[str]]] = {}
    for r in records:
        for k, v in r["hyperparameters"].items():
            values.setdefault(r["optimizer"], {}).setdefault(k, set()).add(json.dumps(v))
    return {label: {k for k, vs in hps.items() if len(vs) > 1} for label, hps in values.items()}


def group_runs(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by optimizer label and, inside a swept grid, by the swept values (``koala++ lr=0.5``)."""
    varying = _varying(records)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        swept = sorted(varying.get(r["optimizer"], ()))
        name = " ".join([r["optimizer"]] + [f"{k}={r['hyperparameters'][k]}" for k in swept])
        groups.setdefault(name, []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(records: list[dict[str, Any]], title: str = "") -> str:
    """Markdown: one row per optimizer (and swept setting), mean ± std over seeds, best first."""
    if not records:
        return f"# {title or 'Summary'}\n\nNo finished runs.\n"
    primary = primary_figure(records)
    _, _, lower_better = FIGURES[primary]
    figures = [k for k in FIGURES if any(k in r for r in records)]
    groups = group_runs(records)

    def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple[int, float]:
        mean, _ = _mean_std([float(r.get(primary, math.nan)) for r in item[1]])
        if not math.isfinite(mean):
            return (1, 0.0)
        return (0, mean if lower_better else -mean)

    header = ["optimizer", "seeds"] + [FIGURES[k][0] for k in figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in sorted(groups.items(), key=rank):
        cells = [f"`{name}`", str(len(runs))]
        for key in figures:
            scale = FIGURES[key][1]
            mean, std = _mean_std([float(r.get(key, math.nan)) * scale for r in runs])
            cells.append("diverged" if not math.isfinite(mean) else f"{_fmt(mean)} ± {_fmt(std, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    diverged = sum(r.get("status") == "diverged" for r in records)
    first = records[0]
    notes = [f"Task `{first.get('task')}`, model `{first.get('model')}`; {len(records)} runs; "
             f"mean ± standard deviation over seeds; ranked by {FIGURES[primary][0]} "
             f"({'lower' if lower_better else 'higher'} is better)."]
    if diverged:
        notes.append(f"{diverged} run(s) diverged (non-finite training loss); their rows read `diverged`.")
    return f"# {title or 'Summary'}\n\n" + " ".join(notes) + "\n\n" + "\n".join(lines) + "\n"


def _fmt(x: float, digits: int = 4) -> str:
    """``digits`` significant digits, no exponent between 1e-3 and 1e5."""
    if x == 0:
        return "0"
    if not 1e-3 <= abs(x) < 1e5:
        return f"{x:.{max(digits - 1, 1)}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"
