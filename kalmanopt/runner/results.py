"""``results.json``, ``results.csv`` and ``summary.md``: the runs, flat, and one row per optimizer."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from kalmanopt.runner.config import SCHEDULES
from kalmanopt.runner.errors import ConfigError
from kalmanopt.runner.health import HEALTHY, THRESHOLDS
from kalmanopt.runner.storage import atomic_write, atomic_write_with

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

    Both are written to a temporary file, synced and renamed (:func:`atomic_write`), so a kill
    at any moment leaves the previous file or the new one, never a torn one.
    """
    out = Path(out)
    atomic_write(out / "results.json", json.dumps([json_safe(r) for r in records], indent=1) + "\n")
    rows = [_flat(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def write_csv(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})

    atomic_write_with(out / "results.csv", write_csv, newline="")


def load_results(out: str | Path) -> list[dict[str, Any]]:
    """The runs in ``out/results.json`` (empty if there is none); ``null`` figures come back as NaN.

    Raises:
        ConfigError: the file exists but cannot be read or is not a list of runs (torn by a
            crash, edited by hand); nothing is changed, so the earlier runs stay recoverable.
    """
    path = Path(out) / "results.json"
    if not path.exists():
        return []
    problem = None
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = str(exc)
    else:
        if not isinstance(records, list) or not all(isinstance(r, dict) and "run_id" in r for r in records):
            problem = "it is not a list of runs with a run_id each"
    if problem is not None:
        raise ConfigError(f"{str(path)!r} is unreadable ({problem}); nothing was changed or deleted: repair or "
                          f"move that file away (its runs will then be trained again), or pass another --out")
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


#: the Kalman counters shown in the summary: key -> column title
COUNTER_COLUMNS = {"skipped_layers": "skipped layers", "guard_restarts": "guard restarts",
                   "nonfinite_steps": "non-finite steps"}


def _distinct(records: list[dict[str, Any]], key: str, missing: str = "unknown") -> str:
    """The distinct values of a provenance entry over the runs; ``missing`` where none has one."""
    values = list(dict.fromkeys(str((r.get("provenance") or {}).get(key)) for r in records))
    values = [v for v in values if v not in ("None", "")] or [missing]
    return " / ".join(values)


def _provenance_lines(records: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """The head of the summary: what was run, on what, how long."""
    first = records[0]
    mode = config.get("mode") or (first.get("provenance") or {}).get("mode", "full")
    steps = config.get("steps_per_run") or first.get("steps")
    if config.get("epochs") is not None:
        length = f"{config['epochs']} epochs ({steps} steps per run)"
    else:
        length = f"{steps} steps per run"
    seeds = sorted({r["seed"] for r in records})
    what = [f"**Mode**: {'quick (`--quick`: a smoke test, not a result)' if mode == 'quick' else 'full'}",
            f"**Length**: {length}" + (f", batch {config['batch_size']}" if config.get("batch_size") else ""),
            f"**Seeds**: {', '.join(map(str, seeds))}"]
    schedule = config.get("schedule")
    if schedule:
        keys = SCHEDULES.get(schedule.get("kind"), ())
        shown = {k: v for k, v in schedule.items() if k in keys and (k != "warmup" or v)}
        what.append(f"**Schedule**: {schedule.get('kind')}" + "".join(f", {k} {v:g}" if isinstance(v, float)
                                                                       else f", {k} {v}" for k, v in shown.items()))
    if config.get("autocast") not in (None, "none"):
        what.append(f"**Autocast**: {config['autocast']} (on CUDA only)")
    wall = sum(float(r.get("seconds", 0.0)) for r in records)
    commit = _distinct(records, "git_commit")
    where = [f"**Device**: {_distinct(records, 'device')} ({_distinct(records, 'device_name')})",
             f"**Versions**: torch {_distinct(records, 'torch')}, "
             f"triton {_distinct(records, 'triton', 'not installed')}, "
             f"kalmanopt {_distinct(records, 'kalmanopt')}, Python {_distinct(records, 'python')}",
             f"**Commit**: {commit if commit != 'unknown' else 'not a git checkout'}",
             f"**Wall time**: {wall:.1f} s of training in {len(records)} runs"]
    return ["; ".join(what) + ".", "", "; ".join(where) + "."]


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if not math.isfinite(mean):
        return "n/a"
    return _fmt(mean) if len(values) == 1 else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _hyperparameter_text(record: dict[str, Any]) -> str:
    hps = record.get("resolved_hyperparameters") or record.get("hyperparameters") or {}
    skip = {"track_diagnostics", "initial_lr"}
    text = ", ".join(f"{k}={v}" for k, v in hps.items() if k not in skip)
    if record.get("clip_grad_norm") is not None:
        text += f", clip_grad_norm={record['clip_grad_norm']}"
    if record.get("others"):
        text += ", others: " + ", ".join(f"{k}={v}" for k, v in record["others"].items())
    return text


def summary_table(records: list[dict[str, Any]], title: str = "", config: dict[str, Any] | None = None) -> str:
    """Markdown: what was run and on what, then one row per optimizer (and swept setting), mean ± std
    over seeds; healthy rows first, best first; then each optimizer as built and the unhealthy runs."""
    if not records:
        return f"# {title or 'Summary'}\n\nNo finished runs.\n"
    config = config or {}
    primary = primary_figure(records)
    _, _, lower_better = FIGURES[primary]
    figures = [k for k in FIGURES if any(k in r for r in records)]
    counters = [k for k in COUNTER_COLUMNS if any(k in (r.get("counters") or {}) for r in records)]
    groups = group_runs(records)

    def unhealthy(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in runs if r.get("status", HEALTHY) != HEALTHY]

    def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple[int, int, float]:
        mean, _ = _mean_std([float(r.get(primary, math.nan)) for r in item[1]])
        bad = 1 if unhealthy(item[1]) else 0
        if not math.isfinite(mean):
            return (bad, 1, 0.0)
        return (bad, 0, mean if lower_better else -mean)

    header = ["optimizer", "seeds", "health"] + [FIGURES[k][0] for k in figures] + ["engine"] + \
        [COUNTER_COLUMNS[k] for k in counters]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in sorted(groups.items(), key=rank):
        bad = unhealthy(runs)
        if bad:
            statuses = sorted({r["status"] for r in bad}, key=lambda s: s)
            health = "**" + ", ".join(f"{s} {sum(r['status'] == s for r in runs)}/{len(runs)}" for s in statuses) + "**"
        else:
            health = "ok"
        cells = [f"`{name}`", str(len(runs)), health]
        for key in figures:
            scale = FIGURES[key][1]
            cells.append(_cell([float(r.get(key, math.nan)) * scale for r in runs]))
        cells.append(" / ".join(dict.fromkeys(str(r.get("engine", "?")) for r in runs)))
        for key in counters:
            values = [float((r.get("counters") or {}).get(key, math.nan)) for r in runs]
            cells.append("—" if all(math.isnan(v) for v in values) else _cell(values))
        lines.append("| " + " | ".join(cells) + " |")
    first = records[0]
    every = config.get("diagnostics_every") or config.get("log_every")
    notes = [f"Task `{first.get('task')}`, model `{first.get('model')}`; {len(records)} runs; "
             + ("mean ± standard deviation over seeds; " if any(len(r) > 1 for r in groups.values()) else "")
             + f"ranked by {FIGURES[primary][0]} ({'lower' if lower_better else 'higher'} is better), "
             "healthy rows first."]
    if "seconds_per_step" in figures:
        timing = "ms / step: the training steps on the engine named (validation and logging excluded)"
        if every and config.get("diagnostics", True) and counters:
            timing += (f"; Kalman diagnostics were recorded every {every} steps (on the same engine), "
                       "and those steps are excluded")
        notes.append(timing + ".")
    if counters:
        notes.append("Counters: mean per run over the whole run.")
    body = [f"# {title or 'Summary'}", "", *_provenance_lines(records, config), "", " ".join(notes), "", *lines]
    body += ["", "## Optimizers as built", "", "| optimizer | method | engine | hyper-parameters (from param_groups) |",
             "|---|---|---|---|"]
    for name, runs in sorted(groups.items(), key=rank):
        r = runs[0]
        body.append(f"| `{name}` | {r.get('method', '')} | {r.get('engine', '?')} | {_hyperparameter_text(r)} |")
    bad_runs = [r for runs in groups.values() for r in unhealthy(runs)]
    if bad_runs:
        body += ["", "## Unhealthy runs", ""]
        name_of = {r["run_id"]: name for name, runs in groups.items() for r in runs}
        for r in bad_runs:
            body.append(f"- `{name_of[r['run_id']]}` seed {r['seed']}: **{r['status']}**: "
                        f"{r.get('status_reason') or 'no reason recorded'}")
        body += ["", "Health thresholds: degenerate when skipped layer updates or guard restarts exceed "
                 f"{100 * THRESHOLDS['skipped_fraction']:g} % of the layer updates or non-finite steps "
                 f"{100 * THRESHOLDS['nonfinite_fraction']:g} % of the steps; stalled when the accuracy is at "
                 f"most {THRESHOLDS['chance_factor']:g} × chance or the final training loss is above "
                 f"{THRESHOLDS['initial_loss_fraction']:g} × the first minibatch's (docs/runner.md)."]
    return "\n".join(body) + "\n"


def _fmt(x: float, digits: int = 4) -> str:
    """``digits`` significant digits, no exponent between 1e-3 and 1e5."""
    if x == 0:
        return "0"
    if not 1e-3 <= abs(x) < 1e5:
        return f"{x:.{max(digits - 1, 1)}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"
