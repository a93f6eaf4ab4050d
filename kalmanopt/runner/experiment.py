"""Run a whole grid: claim the output folder, train every run not yet finished, write tables and plots.

Progress goes through Python :mod:`logging` (the ``kalmanopt.runner`` logger): the output folder
at the start, one line per finished run (optimizer, seed, figure, time, engine, health), and
within a long run a line at most every 30 s. A progress bar is drawn only when asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kalmanopt.runner.analysis_hook import make_analysis_hook, run_ekf_comparisons
from kalmanopt.runner.config import ExperimentConfig, RunSpec, without_data
from kalmanopt.runner.distributed import Launch, device_of, finish, launch
from kalmanopt.runner.errors import ConfigError
from kalmanopt.runner.health import HEALTHY, STATUSES
from kalmanopt.runner.plots import plot_all
from kalmanopt.runner.provenance import environment
from kalmanopt.runner.results import FIGURES, load_results, primary_figure, save_results, summary_table
from kalmanopt.runner.storage import OutputLock, atomic_write
from kalmanopt.runner.tasks import get_task
from kalmanopt.runner.training import MetricsLog, train_run

__all__ = ["ExperimentOutcome", "run_experiment", "default_out_dir", "write_reports", "check_resumable",
           "IDENTITY_IGNORES"]

logger = logging.getLogger("kalmanopt.runner")

#: config keys that may change between invocations into one folder (they do not change a run's result)
IDENTITY_IGNORES = ("seeds", "device", "threads", "eval_batch_size", "distributed")


@dataclass
class ExperimentOutcome:
    """What :func:`run_experiment` did.

    Attributes:
        out: the output folder.
        records: the grid's finished runs (resumed ones included).
        trained: how many runs this invocation trained.
        skipped: how many were already finished (resume).
        interrupted: whether Ctrl-C (or SIGTERM) stopped it.
        plots: the PNG files written.
        seconds: wall time of this invocation.
        writer: whether this process wrote the folder (False on the ranks > 0 of a distributed grid).
    """

    out: Path
    records: list[dict[str, Any]]
    trained: int
    skipped: int
    interrupted: bool
    plots: list[Path]
    seconds: float = 0.0
    writer: bool = True


def default_out_dir(config: ExperimentConfig) -> Path:
    """``runs/<config name>-<timestamp>/`` (``runs/<name>-quick-<timestamp>/`` for ``--quick``)."""
    mode = "-quick" if config.mode == "quick" else ""
    return Path("runs") / f"{config.name}{mode}-{time.strftime('%Y%m%d-%H%M%S')}"


def _title(config: ExperimentConfig | dict[str, Any]) -> str:
    c = config.to_dict() if isinstance(config, ExperimentConfig) else config
    mode = " (--quick)" if c.get("mode") == "quick" else ""
    return f"{c.get('name')}: {c.get('task')} / {c.get('model')}{mode}"


def write_reports(out: Path, config: ExperimentConfig | dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    """``summary.md`` and the plots for ``records`` (the grid's finished runs)."""
    c = config.to_dict() if isinstance(config, ExperimentConfig) else config
    title = _title(c)
    atomic_write(out / "summary.md", summary_table(records, title, c))
    metrics = MetricsLog.read(out / "metrics.jsonl")
    x_key = "epoch" if c.get("epochs") is not None else "step"
    return plot_all(out, metrics, records, x_key=x_key, title=title)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    identity = {k: v for k, v in config.items() if k not in IDENTITY_IGNORES and k not in ("provenance", "run")}
    identity["task_options"] = without_data(identity.get("task_options") or {})
    identity["optimizers"] = [{k: v for k, v in entry.items()
                               if not (k == "clip_grad_norm" and v is None) and not (k == "others" and not v)}
                              for entry in identity.get("optimizers") or []]
    return json.loads(json.dumps(identity, default=str))


def check_resumable(out: Path, config: ExperimentConfig) -> dict[str, Any] | None:
    """Raise ConfigError if ``out`` holds runs of another config or mode (``--quick`` or full).

    Seeds, device, threads, the validation batch size and the data path may differ (a resume on
    another machine, more seeds); anything else that shapes the runs may not.

    Returns:
        the config stored in ``out`` (its ``config.json``), or None where it has none.
    """
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is unreadable ({exc}); nothing was changed: repair or move it, "
                          "or pass another --out") from None
    stored_mode = stored.get("mode", "full")
    if stored_mode != config.mode:
        flags = {"quick": "with --quick", "full": "without --quick"}
        raise ConfigError(f"{str(out)!r} holds a {stored_mode} run of config {stored.get('name')!r}; this is a "
                          f"{config.mode} run: resume it {flags[stored_mode]}, or pass another --out")
    old, new = _identity(stored), _identity(config.to_dict())
    differ = sorted(k for k in set(old) | set(new) if k in old and k in new and old[k] != new[k])
    if differ:
        details = "; ".join(f"{k}: {json.dumps(old[k])[:60]} -> {json.dumps(new[k])[:60]}" for k in differ[:4])
        raise ConfigError(f"{str(out)!r} holds runs of another config ({details}); resume it with the same "
                          f"config, or pass another --out")
    return stored


def _adopt_legacy_ids(config: ExperimentConfig, out: Path, previous: list[dict[str, Any]],
                      stored: dict[str, Any] | None, runs: list[RunSpec] | None, write: bool) -> list[dict[str, Any]]:
    """The finished records of a folder whose run ids held the data path (an earlier kalmanopt), under the
    ids :meth:`ExperimentConfig.run_id` gives their runs now; ``write``: in its results.json and
    metrics.jsonl too (rank 0 does it before it rewrites config.json, so every rank finds the same runs
    finished)."""
    data = ((stored or {}).get("task_options") or {}).get("data")
    if data is None or not previous:
        return previous
    finished = {r["run_id"] for r in previous}
    renamed = {config.legacy_run_id(r.optimizer, r.hyperparameters, r.seed, str(data)): r.run_id
               for r in (config.runs() if runs is None else runs)}
    renamed = {old: new for old, new in renamed.items() if old != new and old in finished}
    if not renamed:
        return previous
    adopted = [{**r, "run_id": renamed.get(r["run_id"], r["run_id"])} for r in previous]
    if write:
        logger.info("resuming: %d run(s) written with the data path in their ids take their ids of now",
                    len(renamed))
        MetricsLog.rename(out / "metrics.jsonl", renamed)
        save_results(out, adopted)
    return adopted


def _analysis_enabled(config: ExperimentConfig) -> bool:
    return bool(config.analysis.get("enabled", False))


def run_experiment(config: ExperimentConfig, out: str | Path | None = None, *, progress: bool = False,
                   runs: list[RunSpec] | None = None) -> ExperimentOutcome:
    """Train every run of ``config`` not already finished in ``out`` and write the reports.

    The config must have passed :meth:`ExperimentConfig.check` (``load_config`` does it). The
    folder is claimed first (:class:`OutputLock`; a second run into it fails with ConfigError)
    and checked to hold runs of this config and mode only; data is loaded once; each finished
    run is saved at once, so Ctrl-C keeps everything finished before it, and a later call with
    the same ``out`` trains only what is missing. ``progress`` draws one progress bar (over
    every step of the grid) on stderr. ``runs`` (of ``config``: from :meth:`ExperimentConfig.runs`
    or built with :meth:`ExperimentConfig.run_id`) replaces the grid: only they are trained and
    reported (``kalmanopt tune`` runs its sweep, then its seeds, this way).

    Raises:
        ConfigError: the folder is locked, unwritable, of another config or mode, or holds an
            unreadable results.json; nothing has been trained or changed then.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(out) if out is not None else default_out_dir(config)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {str(out)!r} ({exc.strerror or exc}); "
                          "pass a writable --out") from None
    launched = launch(config.distributed, config.resolved_device())
    if not launched.writes:  # another rank than 0: trains the same runs, writes nothing that stays
        stored = check_resumable(out, config)
        previous = [r for r in load_results(out) if r.get("status") in STATUSES]
        previous = _adopt_legacy_ids(config, out, previous, stored, runs, write=False)
        with tempfile.TemporaryDirectory(prefix=f"kalmanopt-rank{launched.rank}-") as scratch:
            logging.getLogger("kalmanopt").setLevel(logging.WARNING)
            outcome = _run_grid(config, Path(scratch), previous, False, launched, runs)
        outcome.out, outcome.writer = out, False
        finish(launched)
        return outcome
    try:
        with OutputLock(out) as lock:
            if lock.took_over is not None:
                logger.warning("took over %s: the process that held it (%s) no longer exists", lock.path,
                               lock.took_over.get("pid", "unknown"))
            stored = check_resumable(out, config)
            previous = [r for r in load_results(out) if r.get("status") in STATUSES]
            previous = _adopt_legacy_ids(config, out, previous, stored, runs, write=True)
            outcome = _run_grid(config, out, previous, progress, launched, runs)
        finish(launched)
        return outcome
    finally:
        torch.set_num_threads(threads)


def _describe(record: dict[str, Any]) -> str:
    """One log line's worth of a finished run."""
    primary = primary_figure([record])
    title, scale, _ = FIGURES[primary]
    value = record.get(primary, math.nan)
    figure = f"{title} {value * scale:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else \
        f"{title} n/a"
    per_step = record.get("seconds_per_step", math.nan)
    speed = f"{1000 * per_step:.3g} ms/step" if math.isfinite(per_step) else "no timed step"
    health = record["status"] if record["status"] == HEALTHY else \
        f"{record['status'].upper()} ({record.get('status_reason', '')})"
    return (f"{record['optimizer']} seed {record['seed']}: {figure}, {record['seconds']:.1f} s "
            f"({speed} on {record.get('engine', '?')}), {health}")


def _run_grid(config: ExperimentConfig, out: Path, previous: list[dict[str, Any]], progress: bool,
              launched: Launch | None = None, runs: list[RunSpec] | None = None) -> ExperimentOutcome:
    started = time.perf_counter()
    logger.info("run %s%s: writing into %s", config.name, " --quick" if config.mode == "quick" else "",
                out)
    device = device_of(config.resolved_device()) if launched is not None and launched.active \
        else config.resolved_device()
    if config.device == "auto":
        logger.info("device auto: using %s", device)
    task = get_task(config.task)
    data = task.load(config.task_options).to(device)
    env = environment(device, config.device)
    runs = list({r.run_id: r for r in (config.runs() if runs is None else runs)}.values())
    grid_ids = {r.run_id for r in runs}
    steps_per_run = config.total_steps(task.steps_per_epoch(data, config.batch_size))
    document = {**config.to_dict(), "steps_per_run": steps_per_run,
                "steps_per_epoch": task.steps_per_epoch(data, config.batch_size), "provenance": env}
    atomic_write(out / "config.json", json.dumps(document, indent=1, default=str) + "\n")
    done = {r["run_id"] for r in previous}
    MetricsLog.keep_only(out / "metrics.jsonl", done)  # drop the partial metrics of interrupted runs
    log = MetricsLog(out / "metrics.jsonl")
    hook = None
    if _analysis_enabled(config):
        hook = make_analysis_hook(config, task, data)
    all_records = list(previous)
    todo = [r for r in runs if r.run_id not in done]
    if len(todo) < len(runs):
        logger.info("resuming: %d of %d run(s) already finished", len(runs) - len(todo), len(runs))
    trained = 0
    interrupted = False
    spectra: list[Path] = []
    bar = _progress_bar(progress, len(todo) * steps_per_run)
    try:
        with bar as steps_bar, _redirect_logging(progress):
            for index, run in enumerate(todo, len(runs) - len(todo) + 1):
                if steps_bar is not None:
                    steps_bar.set_description(f"{run.optimizer.label} s{run.seed}")
                record = train_run(run, config, task, data, log,
                                   on_step=steps_bar.update if steps_bar is not None else None, analysis=hook,
                                   launched=launched)
                record["provenance"] = {**env, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "mode": config.mode, "steps_per_run": steps_per_run}
                all_records.append(record)
                save_results(out, all_records)
                trained += 1
                logger.info("[%d/%d] %s", index, len(runs), _describe(record))
            if _analysis_enabled(config):
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
    title = _title(config)
    up_to_date = (trained == 0 and not spectra and summary.is_file() and (out / "curves.png").is_file()
                  and summary.read_text(encoding="utf-8") == summary_table(records, title, config.to_dict()))
    if up_to_date:  # nothing new: the reports on disk were written for exactly these runs
        plots = sorted(out.glob("*.png"))
    else:
        plots = list(dict.fromkeys((write_reports(out, config, records) if records else []) + spectra))
    if not records:
        atomic_write(out / "summary.md", summary_table([], config.name))
    seconds = time.perf_counter() - started
    return ExperimentOutcome(out, records, trained, len(runs) - len(todo), interrupted, plots, seconds)


def _progress_bar(progress: bool, total: int) -> Any:
    """One tqdm bar over every step still to train, or a context that yields None."""
    if not progress or total == 0:
        return contextlib.nullcontext(None)
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc="grid", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def _redirect_logging(progress: bool) -> Any:
    """While a bar is drawn, log lines go through ``tqdm.write`` so they do not tear it."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm([logging.getLogger("kalmanopt")])
