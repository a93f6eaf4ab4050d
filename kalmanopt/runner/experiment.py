"""Run a whole grid: prepare and check, train every run not yet finished, write tables and plots."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kalmanopt.runner.config import ExperimentConfig
from kalmanopt.runner.plots import plot_all
from kalmanopt.runner.results import load_results, save_results, summary_table
from kalmanopt.runner.tasks import get_task
from kalmanopt.runner.training import MetricsLog, train_run

__all__ = ["ExperimentOutcome", "run_experiment", "default_out_dir", "write_reports"]


@dataclass
class ExperimentOutcome:
    """What :func:`run_experiment` did.

    Attributes:
        out: the output folder.
        records: the grid's finished runs (resumed ones included).
        trained: how many runs this invocation trained.
        skipped: how many were already finished (resume).
        interrupted: whether Ctrl-C stopped it.
        plots: the PNG files written.
    """

    out: Path
    records: list[dict[str, Any]]
    trained: int
    skipped: int
    interrupted: bool
    plots: list[Path]


def default_out_dir(config: ExperimentConfig) -> Path:
    """``runs/<config name>-<timestamp>/``."""
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _title(config: ExperimentConfig) -> str:
    return f"{config.name}: {config.task} / {config.model}"


def write_reports(out: Path, config: ExperimentConfig, records: list[dict[str, Any]]) -> list[Path]:
    """``summary.md`` and the plots for ``records`` (the grid's finished runs)."""
    title = _title(config)
    (out / "summary.md").write_text(summary_table(records, title), encoding="utf-8")
    metrics = MetricsLog.read(out / "metrics.jsonl")
    x_key = "epoch" if config.epochs is not None else "step"
    return plot_all(out, metrics, records, x_key=x_key, title=title)


def _analysis_enabled(config: ExperimentConfig) -> bool:
    return bool(config.analysis.get("enabled", False))


def run_experiment(config: ExperimentConfig, out: str | Path | None = None, *, progress: bool = True
                   ) -> ExperimentOutcome:
    """Train every run of ``config`` not already finished in ``out`` and write the reports.

    The config must have passed :meth:`ExperimentConfig.check` (``load_config`` does it). Data is
    loaded once; each finished run is saved at once, so Ctrl-C keeps everything finished before
    it, and a later call with the same ``out`` trains only what is missing.
    """
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_grid(config, out, progress, tqdm)
    finally:
        torch.set_num_threads(threads)


def _run_grid(config: ExperimentConfig, out: str | Path | None, progress: bool, tqdm: Any) -> ExperimentOutcome:
    task = get_task(config.task)
    data = task.load(config.task_options).to(config.resolved_device())
    out = Path(out) if out is not None else default_out_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    runs = config.runs()
    grid_ids = {r.run_id for r in runs}
    previous = [r for r in load_results(out) if r.get("status") in ("finished", "diverged")]
    done = {r["run_id"] for r in previous}
    MetricsLog.keep_only(out / "metrics.jsonl", done)  # drop the partial metrics of interrupted runs
    log = MetricsLog(out / "metrics.jsonl")
    hook = None
    if _analysis_enabled(config):
        from kalmanopt.runner.analysis_hook import make_analysis_hook

        hook = make_analysis_hook(config, task, data)
    all_records = list(previous)
    todo = [r for r in runs if r.run_id not in done]
    trained = 0
    interrupted = False
    spectra: list[Path] = []
    steps_per_run = config.total_steps(task.steps_per_epoch(data, config.batch_size))
    disable = not progress
    try:
        with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="grid", unit="run", disable=disable,
                  file=sys.stderr, position=0) as grid_bar:
            for run in todo:
                grid_bar.set_postfix_str(f"{run.optimizer.label} seed {run.seed}")
                with tqdm(total=steps_per_run, desc=f"{run.optimizer.label} s{run.seed}", unit="step",
                          leave=False, disable=disable, file=sys.stderr, position=1) as run_bar:
                    record = train_run(run, config, task, data, log, on_step=run_bar.update, analysis=hook)
                all_records.append(record)
                save_results(out, all_records)
                trained += 1
                grid_bar.update(1)
        if _analysis_enabled(config):
            from kalmanopt.runner.analysis_hook import run_ekf_comparisons

            done_labels = {p.stem[len("ekf-"):] for p in out.glob("ekf-*.json")}
            spectra = run_ekf_comparisons(config, task, data, out, done_labels)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        log.close()
        MetricsLog.keep_only(out / "metrics.jsonl", {r["run_id"] for r in all_records})
    records = [r for r in all_records if r["run_id"] in grid_ids]
    save_results(out, all_records)
    summary = out / "summary.md"
    up_to_date = (trained == 0 and not spectra and summary.is_file() and (out / "curves.png").is_file()
                  and summary.read_text(encoding="utf-8") == summary_table(records, _title(config)))
    if up_to_date:  # nothing new: the reports on disk were written for exactly these runs
        plots = sorted(out.glob("*.png"))
    else:
        plots = (write_reports(out, config, records) if records else []) + spectra
    if not records:
        (out / "summary.md").write_text(summary_table([], config.name), encoding="utf-8")
    return ExperimentOutcome(out, records, trained, len(runs) - len(todo), interrupted, plots)
