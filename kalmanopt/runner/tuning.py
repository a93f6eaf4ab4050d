"""``kalmanopt tune``: one protocol for every optimizer — a learning-rate sweep, a pick, seeds at the pick.

Every optimizer of the config sweeps ``lr`` over at least :data:`MIN_POINTS` values (its ``grid``,
typically ``lr = {logspace = [low, high, n]}``; other swept keywords such as ``weight_decay`` are
swept with it). The protocol:

1. **Sweep**: every setting of every optimizer's grid at the first seed of ``seeds``.
2. **Pick**, per optimizer, on the final validation loss (:func:`pick`): a diverged run (or any run
   without a finite validation loss) loses; losses within :data:`TIE_TOLERANCE` (relative) of the
   best are ties, broken toward the middle of the lr sweep; a best ``lr`` on the sweep's edge is
   **refused** (the optimum may lie outside the sweep), with a warning in ``tuning.md``, and that
   optimizer gets no seeds.
3. **Seeds**: the picked setting at every seed of ``seeds`` (the sweep's run at the first seed is
   the same run, and is not trained twice).

Both stages train into one output folder through :func:`~kalmanopt.runner.experiment.run_experiment`,
so every run is saved as it finishes and the same command resumes (by run id) after Ctrl-C. Beside
the runner's files it writes ``tuning.md`` (per optimizer: the swept values with their losses, the
pick, mean ± std over the seeds at the pick), ``tuning.json`` (the same as data) and ``tuning.png``
(the learning curves at the picks, mean and band over seeds).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalmanopt.runner.config import ExperimentConfig, RunSpec
from kalmanopt.runner.errors import Problems
from kalmanopt.runner.experiment import default_out_dir, run_experiment
from kalmanopt.runner.health import HEALTHY
from kalmanopt.runner.optimizers import OptimizerSpec
from kalmanopt.runner.plots import plot_curves
from kalmanopt.runner.results import FIGURES, json_safe, primary_figure
from kalmanopt.runner.storage import atomic_write
from kalmanopt.runner.training import MetricsLog

__all__ = ["MIN_POINTS", "TIE_TOLERANCE", "TUNING_SEEDS", "Tuned", "TuningOutcome", "pick", "check_tunable",
           "sweep_runs", "seed_runs", "tuning_table", "run_tuning"]

logger = logging.getLogger("kalmanopt.runner")

#: the fewest learning rates an optimizer's sweep may hold (the protocol's budget)
MIN_POINTS = 5

#: validation losses within this relative distance of the best are ties (broken toward the sweep's middle)
TIE_TOLERANCE = 1e-3

#: the seeds at the pick when the config names none
TUNING_SEEDS = [0, 1, 2]

#: the figure the pick is made on (lower is better)
PICKED_ON = "val_loss"


def _loss(record: dict[str, Any] | None) -> float:
    """The record's final validation loss; infinite for a missing, diverged or non-finite one."""
    if record is None or record.get("status") == "diverged":
        return math.inf
    value = record.get(PICKED_ON)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def pick(points: list[tuple[dict[str, Any], float]], key: str = "lr") -> tuple[dict[str, Any] | None, str]:
    """The setting picked from a sweep, or None with the reason.

    Args:
        points: (setting, final validation loss) for every setting of the sweep; a diverged run's
            loss is ``inf`` or NaN (it loses).
        key: the swept keyword whose edges refuse a pick.

    Returns:
        ``(setting, "")``, or ``(None, reason)`` when every run diverged or the best ``key`` lies on
        the edge of the sweep (its smallest or largest value).
    """
    finite = [(s, loss) for s, loss in points if math.isfinite(loss)]
    if not finite:
        return None, "every run of the sweep diverged (no finite validation loss): no pick"
    values = sorted({s[key] for s, _ in points})
    best = min(loss for _, loss in finite)
    tied = [s for s, loss in finite if loss <= best + TIE_TOLERANCE * abs(best)]
    middle = (len(values) - 1) / 2
    chosen = min(tied, key=lambda s: abs(values.index(s[key]) - middle))  # (min keeps the first of equals)
    position = values.index(chosen[key])
    if len(values) > 1 and position in (0, len(values) - 1):
        side, beyond = ("lower", "below") if position == 0 else ("upper", "above")
        return None, (f"the best {key} {chosen[key]:g} lies on the sweep's {side} edge, so the optimum may lie "
                      f"outside it: no pick (extend the sweep {beyond} {chosen[key]:g} and run again)")
    return chosen, ""


@dataclass
class Tuned:
    """One optimizer's tuning.

    Attributes:
        spec: the optimizer.
        sweep: (setting, its sweep record or None while not finished) per setting of the grid.
        setting: the pick, or None (see ``note``).
        note: why there is no pick, or that the sweep is not finished; empty otherwise.
        seeds: the records of the runs at the pick, by seed order (those finished).
    """

    spec: OptimizerSpec
    sweep: list[tuple[dict[str, Any], dict[str, Any] | None]]
    setting: dict[str, Any] | None = None
    note: str = ""
    seeds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TuningOutcome:
    """What :func:`run_tuning` did: the folder, each optimizer's tuning, the files written, whether it was stopped."""

    out: Path
    tuned: list[Tuned]
    files: list[Path]
    interrupted: bool
    trained: int
    skipped: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)
    writer: bool = True


def check_tunable(config: ExperimentConfig) -> None:
    """Raise one ConfigError naming every optimizer that does not sweep ``lr`` over :data:`MIN_POINTS` values."""
    problems = Problems()
    if config.distributed != "none":
        problems.add(f"kalmanopt tune runs in one process; distributed = {config.distributed!r} is for "
                     "kalmanopt run (set distributed = \"none\")")
    for spec in config.optimizers:
        values = spec.grid.get("lr")
        if not isinstance(values, list) or len(values) < MIN_POINTS:
            got = f"grid.lr = {values!r}" if values is not None else \
                (f"a fixed lr = {spec.keywords['lr']!r}" if "lr" in spec.keywords else "no lr")
            problems.add(f"optimizer {spec.label!r}: the tuning protocol sweeps lr over at least {MIN_POINTS} values; "
                         f"got {got}; give lr = {{logspace = [low, high, {MIN_POINTS}]}}")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            problems.add(f"optimizer {spec.label!r}: the swept lr values must be positive numbers, got {values!r}")
    problems.raise_if_any()


def sweep_runs(config: ExperimentConfig) -> list[RunSpec]:
    """Every setting of every optimizer at the first seed."""
    seed = config.seeds[0]
    return [RunSpec(config.run_id(spec, setting, seed), spec, setting, seed)
            for spec in config.optimizers for setting in spec.settings()]


def seed_runs(config: ExperimentConfig, tuned: list[Tuned]) -> list[RunSpec]:
    """The picked setting of each optimizer that has one, at every seed."""
    return [RunSpec(config.run_id(t.spec, t.setting, seed), t.spec, t.setting, seed)
            for t in tuned if t.setting is not None for seed in config.seeds]


def _tune(config: ExperimentConfig, records: list[dict[str, Any]]) -> list[Tuned]:
    """Each optimizer's sweep read from ``records``, and its pick where the sweep is finished."""
    by_id = {r["run_id"]: r for r in records}
    tuned = []
    for spec in config.optimizers:
        sweep = [(s, by_id.get(config.run_id(spec, s, config.seeds[0]))) for s in spec.settings()]
        t = Tuned(spec, sweep)
        missing = sum(r is None for _, r in sweep)
        if missing:
            t.note = f"the sweep is not finished ({missing} of {len(sweep)} runs missing): no pick yet"
        else:
            t.setting, t.note = pick([(s, _loss(r)) for s, r in sweep])
        if t.setting is not None:
            t.seeds = [by_id[i] for i in (config.run_id(spec, t.setting, seed) for seed in config.seeds) if i in by_id]
        tuned.append(t)
    return tuned


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "diverged"


def _setting_text(setting: dict[str, Any], grid: dict[str, Any]) -> str:
    return ", ".join(f"{k} {setting[k]:g}" if isinstance(setting[k], float) else f"{k} {setting[k]}" for k in grid)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], scale: float = 1.0) -> str:
    mean, std = _mean_std([v * scale for v in values])
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4g} ± {std:.2g}" if len(values) > 1 else f"{mean:.4g}"


def tuning_table(config: ExperimentConfig, tuned: list[Tuned]) -> str:
    """``tuning.md``: the protocol, then per optimizer its sweep, pick and the mean ± std over seeds."""
    records = [r for t in tuned for r in t.seeds] or [r for t in tuned for _, r in t.sweep if r is not None]
    primary = primary_figure(records) if records else PICKED_ON
    figures = list(dict.fromkeys([PICKED_ON, primary]))
    length = f"{config.epochs} epochs" if config.epochs is not None else f"{config.steps} steps"
    lines = [f"# Tuning: {config.name} ({config.task} / {config.model})", "",
             f"Protocol: every optimizer sweeps its grid ({length} per run) at seed {config.seeds[0]}; the pick is "
             f"the lowest final validation loss (diverged runs lose; losses within {TIE_TOLERANCE:g} (relative) "
             "of the best are ties, broken toward the middle of the lr sweep; a best lr on the sweep's edge is "
             f"refused); then the pick runs at seeds {', '.join(map(str, config.seeds))}."
             + (" Mode: quick (`--quick`: a smoke test, not a result)." if config.mode == "quick" else ""), "",
             "| optimizer | settings | sweep: setting → val loss (**pick**) | pick | seeds | "
             + " | ".join(f"{FIGURES[f][0]} (mean ± std)" for f in figures) + " |",
             "|---|---|---|---|---|" + "---|" * len(figures)]
    for t in tuned:
        points = []
        for setting, record in t.sweep:
            text = f"{_setting_text(setting, t.spec.grid)}: {_fmt(_loss(record)) if record else 'not run'}"
            points.append(f"**{text}**" if setting == t.setting else text)
        chosen = _setting_text(t.setting, t.spec.grid) if t.setting is not None else "none"
        cells = [f"`{t.spec.label}`", str(len(t.sweep)), " · ".join(points), chosen, str(len(t.seeds))]
        for key in figures:
            cells.append(_cell([float(r.get(key, math.nan)) for r in t.seeds], FIGURES[key][1])
                         if t.seeds else "—")
        lines.append("| " + " | ".join(cells) + " |")
    budgets = sorted({len(t.sweep) for t in tuned})
    warnings = [f"- `{t.spec.label}`: {t.note}" for t in tuned if t.note]
    warnings += [f"- `{t.spec.label}`: {len(t.seeds)} of {len(config.seeds)} seeds at the pick finished"
                 for t in tuned if t.setting is not None and len(t.seeds) < len(config.seeds)]
    warnings += [f"- `{t.spec.label}` seed {r['seed']} at the pick: **{r['status']}** ({r.get('status_reason', '')})"
                 for t in tuned for r in t.seeds if r.get("status", HEALTHY) != HEALTHY]
    if len(budgets) > 1:
        warnings.append(f"- the optimizers' sweeps differ in size ({', '.join(map(str, budgets))} settings): "
                        "the budgets are not equal")
    if warnings:
        lines += ["", "## Warnings", "", *warnings]
    lines += ["", "Every run is in results.json and summary.md; tuning.png draws the curves at the picks."]
    return "\n".join(lines) + "\n"


def _document(config: ExperimentConfig, tuned: list[Tuned]) -> dict[str, Any]:
    """``tuning.json``: the protocol and each optimizer's sweep, pick and seeds, as data."""
    def run(record: dict[str, Any]) -> dict[str, Any]:
        return {k: record.get(k) for k in ("run_id", "seed", "status", *FIGURES) if k in record}

    optimizers = []
    for t in tuned:
        losses = [float(r.get(PICKED_ON, math.nan)) for r in t.seeds]
        mean, std = _mean_std(losses)
        optimizers.append({
            "label": t.spec.label, "method": t.spec.describe(), "swept": sorted(t.spec.grid),
            "sweep": [{"setting": s, "val_loss": _loss(r) if r else None, **(run(r) if r else {})} for s, r in t.sweep],
            "pick": t.setting, "note": t.note, "seeds": [run(r) for r in t.seeds],
            "val_loss_mean": mean, "val_loss_std": std})
    protocol = {"picked_on": PICKED_ON, "sweep_seed": config.seeds[0], "seeds": config.seeds,
                "tie_tolerance": TIE_TOLERANCE, "min_points": MIN_POINTS, "edge": "refused",
                "mode": config.mode, "epochs": config.epochs, "steps": config.steps}
    return json_safe({"name": config.name, "task": config.task, "model": config.model, "protocol": protocol,
                      "optimizers": optimizers})


def _write(out: Path, config: ExperimentConfig, tuned: list[Tuned]) -> list[Path]:
    atomic_write(out / "tuning.md", tuning_table(config, tuned))
    atomic_write(out / "tuning.json", json.dumps(_document(config, tuned), indent=1) + "\n")
    files = [out / "tuning.md", out / "tuning.json"]
    at_pick = [r for t in tuned for r in t.seeds]
    if at_pick:
        x_key = "epoch" if config.epochs is not None else "step"
        plot = plot_curves(MetricsLog.read(out / "metrics.jsonl"), at_pick, out / "tuning.png", x_key,
                           f"{config.name}: the picks, {len(config.seeds)} seeds")
        files += [plot] if plot is not None else []
    return files


def run_tuning(config: ExperimentConfig, out: str | Path | None = None, *, progress: bool = False) -> TuningOutcome:
    """Run the protocol of the module docstring for ``config`` into ``out`` (resuming what is there).

    Raises:
        ConfigError: an optimizer does not sweep lr over :data:`MIN_POINTS` values, or what
            :func:`~kalmanopt.runner.experiment.run_experiment` raises.
    """
    check_tunable(config)
    out = Path(out) if out is not None else default_out_dir(config)
    sweep = sweep_runs(config)
    logger.info("tune %s: sweep of %d run(s) at seed %d", config.name, len(sweep), config.seeds[0])
    first = run_experiment(config, out, progress=progress, runs=sweep)
    tuned = _tune(config, first.records)
    trained, seconds, records = first.trained, first.seconds, first.records
    interrupted = first.interrupted
    if not interrupted:
        for t in tuned:
            logger.info("tune %s: %s", t.spec.label, f"pick {_setting_text(t.setting, t.spec.grid)}"
                        if t.setting is not None else t.note)
        extra = [r for r in seed_runs(config, tuned) if r.run_id not in {s.run_id for s in sweep}]
        if extra:
            logger.info("tune %s: %d run(s) at the picks, seeds %s", config.name, len(extra),
                        ", ".join(map(str, config.seeds)))
            second = run_experiment(config, out, progress=progress, runs=sweep + extra)
            tuned = _tune(config, second.records)
            trained, seconds, records = trained + second.trained, seconds + second.seconds, second.records
            interrupted = second.interrupted
    files = _write(out, config, tuned)
    return TuningOutcome(out, tuned, files, interrupted, trained, len(records) - trained, seconds, records)
