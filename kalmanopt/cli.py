"""The ``kalmanopt`` command: ``run`` an ablation grid, ``list`` what can go in one, ``plot`` a finished folder.

    kalmanopt run                          # the default ablation (digits, 7 optimizers, 3 seeds)
    kalmanopt run configs/cifar10-resnet18.toml --data ~/data --device cuda
    kalmanopt run CONFIG --out runs/a --quick --seeds 0,1
    kalmanopt list
    kalmanopt plot runs/a
    kalmanopt run my.toml --plugins my_parts     # import my_parts.py (it registers parts/presets) first
    kalmanopt tune configs/lm-tuning.toml --data tinyshakespeare.txt --device cuda   # sweep, pick, seeds

A bad config stops before any training with one line naming every problem and the valid choices
(exit status 2), and so does a file that cannot be read or written (a full disk: the runs saved before
it stay in results.json). Ctrl-C, or SIGTERM from a cluster scheduler, stops cleanly, keeping the runs that
finished (exit status 130, or 143 for SIGTERM); the same command with the same ``--out`` resumes.
Progress is logged on stderr through Python ``logging``; a progress bar is drawn only on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import kalmanopt
from kalmanopt.optimizer import OPTIONS
from kalmanopt.registry import get_preset
from kalmanopt.runner import ConfigError, load_config, run_experiment
from kalmanopt.runner.config import parse_seeds
from kalmanopt.runner.experiment import write_reports
from kalmanopt.runner.optimizers import EXCLUDED_BASELINES, TORCH_BASELINES, baseline_keywords
from kalmanopt.runner.results import load_results
from kalmanopt.runner.storage import OutputLock
from kalmanopt.runner.tasks import TASKS, model_keywords
from kalmanopt.runner.tuning import MIN_POINTS, TUNING_SEEDS, run_tuning

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kalmanopt`` command."""
    parser = argparse.ArgumentParser(prog="kalmanopt", description="Kalman-filter optimizers for PyTorch: "
                                     "run ablations and compare them with torch baselines.")
    parser.add_argument("--version", action="version", version=f"kalmanopt {kalmanopt.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,tune,list,plot}")
    run = commands.add_parser("run", help="train a grid of optimizers x settings x seeds; write tables and plots",
                              description="Run the grid of CONFIG (a TOML file; default: the built-in ablation "
                                          "on scikit-learn's digits) and write results.json, results.csv, "
                                          "summary.md, metrics.jsonl and PNG plots into --out.")
    run.add_argument("config", nargs="?", help="a TOML config (see configs/ and docs/runner.md)")
    tune = commands.add_parser("tune", help="the tuning protocol: each optimizer's lr sweep at the first seed, "
                                            "the pick on validation loss, then every seed at the pick",
                               description=f"Sweep every optimizer's grid of CONFIG (lr over at least {MIN_POINTS} "
                                           "values) at the first seed, pick each one's setting by final "
                                           "validation loss (refused on the sweep's edge), run the pick at every "
                                           f"seed (default {', '.join(map(str, TUNING_SEEDS))}), and write "
                                           "tuning.md, tuning.json and tuning.png beside the runner's files "
                                           "(docs/tuning.md).")
    tune.add_argument("config", help="a TOML config whose optimizers sweep lr (see configs/lm-tuning.toml)")
    for command in (run, tune):
        _add_run_arguments(command)
    listing = commands.add_parser("list", help="the presets, parts with their keywords, torch baselines and tasks")
    for command in (run, tune, listing):
        command.add_argument("--plugins", metavar="MODULES",
                             help="modules to import first, with commas (a file my_parts.py in the current "
                                  "folder is my_parts): they register parts and presets with kalmanopt's registry")
    plot = commands.add_parser("plot", help="redraw the summary and plots of an output folder")
    plot.add_argument("out", help="an output folder of kalmanopt run")
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags ``run`` and ``tune`` share."""
    run.add_argument("--out", help="output folder (default runs/<config>-<timestamp>/, runs/<config>-quick-"
                                   "<timestamp>/ with --quick); an existing one of the same config and mode resumes")
    run.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (overrides the config)")
    run.add_argument("--seeds", help="a count N (seeds 0 .. N-1: --seeds 3 runs 0, 1, 2) or a list of seeds with "
                                     "commas (--seeds 0,5,7; one seed: --seeds 5,); overrides the config")
    run.add_argument("--quick", action="store_true", help="a short smoke run: the config's [quick] overrides")
    run.add_argument("--steps", type=int, help="optimizer steps per run (replaces the config's steps or epochs)")
    run.add_argument("--epochs", type=int, help="passes over the training data per run (replaces the config's "
                                                "steps or epochs)")
    run.add_argument("--data", help="the task's data: a text file (text) or the folder holding the CIFAR archive")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar, plain log lines only (the default when stderr is not a terminal)")


def _error(message: str) -> int:
    print(f"kalmanopt: error: {message}", file=sys.stderr)
    return 2


def os_error_message(exc: OSError) -> str:
    """One line for an ``OSError`` that stopped a run (a full disk while writing results, a lost folder)."""
    where = f" {str(exc.filename)!r}" if exc.filename is not None else ""
    return (f"could not read or write{where}: {exc.strerror or exc}; the runs that finished before it are kept in "
            "results.json (each file is replaced whole or not at all); fix the cause (free disk space) and run "
            "the same command to resume")


def _format_keywords(keywords: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in keywords.items()) or "(none)"


def list_everything() -> str:
    """The text of ``kalmanopt list``."""
    lines = ["Presets  ([[optimizers]] preset = NAME, or kalmanopt.create(NAME, params, ...)):"]
    width = max(len(n) for n in kalmanopt.presets()) + 2
    for name in kalmanopt.presets():
        preset = get_preset(name)
        specs = preset.build().hyperparameters()
        lines.append(f"  {name:<{width}}{preset.doc}")
        lines.append(f"  {'':<{width}}hyper-parameters: {_format_keywords({k: s.default for k, s in specs.items()})}")
        if preset.options():
            lines.append(f"  {'':<{width}}structural options: {_format_keywords(preset.options())}")
        cls = kalmanopt.optim.preset_class(name)
        torch_names = "".join(f"; torch's {a.name} = {'/'.join(a.targets)}" for a in cls.torch_aliases)
        lines.append(f"  {'':<{width}}class: kalmanopt.optim.{cls.__name__}(params, **hyper-parameters){torch_names}")
    lines.append(f"  every Kalman optimizer also takes: {_format_keywords(OPTIONS)}, loss_statistic='second_moment' "
                 "(or 'variance'), strict=False, track_diagnostics=False")
    lines.append("")
    lines.append("Parts  ([[optimizers]] compose = {measurement = ..., dynamics = ..., surrogate = ..., "
                 "estimator = ..., <options>}):")
    for kind, named in kalmanopt.parts().items():
        lines.append(f"  {kind}:")
        for name, cls in named.items():
            hps = {spec.name: spec.default for spec in getattr(cls, "hyperparameters", ())}
            init = inspect.signature(cls.__init__).parameters
            options = {n: p.default for n, p in init.items()
                       if n not in ("self", "estimator") and p.default is not inspect.Parameter.empty}
            doc = (inspect.getdoc(cls) or "").split("\n")[0]
            lines.append(f"    {name:<12}{doc}")
            details = []
            if hps:
                details.append(f"hyper-parameters: {_format_keywords(hps)}")
            if options:
                details.append(f"options: {_format_keywords(options)}")
            if getattr(cls, "needs_estimator", False):
                details.append("takes an estimator")
            if details:
                lines.append(f"    {'':<12}{'; '.join(details)}")
    lines.append("")
    lines.append("Torch baselines  ([[optimizers]] torch = NAME; defaults the runner uses shown first):")
    for name, (cls, defaults) in TORCH_BASELINES.items():
        others = {k: v for k, v in baseline_keywords(name).items() if k not in defaults}
        summary = (inspect.getdoc(cls) or "").splitlines()[0].replace("`", "").rstrip(".")
        where = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.") else \
            f"{cls.__module__}.{cls.__name__} ({summary})"
        runner = _format_keywords(defaults) if defaults else "the class's own defaults"
        lines.append(f"  {name:<10}{where}: {runner}; also {', '.join(others)}")
    for name, reason in EXCLUDED_BASELINES.items():
        lines.append(f"  not {name}: {reason}")
    lines.append("")
    lines.append("Tasks  (task = NAME, model = ..., [task_options], [model_options]):")
    for name, task in sorted(TASKS.items()):
        lines.append(f"  {name:<11}({task.kind}) {task.doc}")
        models = "; ".join(f"{m}{' (default)' if m == task.default_model else ''}: "
                           f"{_format_keywords(model_keywords(b))}" for m, b in task.models.items())
        lines.append(f"  {'':<11}models: {models}")
        lines.append(f"  {'':<11}options: {_format_keywords(task.options)}")
    return "\n".join(lines)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as cleanly as after Ctrl-C."""

    seen = False  # set when SIGTERM arrived during this command


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """While the grid runs, SIGTERM stops it as Ctrl-C does (clean, resumable); restored afterwards."""

    def handler(signum: int, frame: Any) -> None:
        _Terminated.seen = True
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _setup_logging() -> logging.Handler:
    """Log lines of the runner on stderr, plain (``kalmanopt: ...``)."""
    logger = logging.getLogger("kalmanopt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kalmanopt: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def _run(args: argparse.Namespace) -> int:
    """``kalmanopt run`` and ``kalmanopt tune``: load the config, train, print the report."""
    tuning = args.command == "tune"
    handler = _setup_logging()
    terminated = _Terminated.seen = False
    try:
        with _sigterm_as_interrupt():
            try:
                seeds = parse_seeds(args.seeds) if args.seeds is not None else None
                overrides = {"device": args.device, "seeds": seeds, "data": args.data, "steps": args.steps,
                             "epochs": args.epochs}
                config = load_config(args.config, quick=args.quick, overrides=overrides,
                                     defaults={"seeds": TUNING_SEEDS} if tuning else None)
                out = Path(args.out) if args.out else None
                progress = not args.no_progress and sys.stderr.isatty()
                outcome = (run_tuning if tuning else run_experiment)(config, out, progress=progress)
            except ConfigError as exc:
                return _error(str(exc))
            except OSError as exc:  # a full disk, a folder that went away: one line, what was saved stays
                return _error(os_error_message(exc))
            except KeyboardInterrupt as exc:  # outside the grid's loop (which keeps what finished itself)
                how = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
                print(f"{how} outside training: every run that finished is kept in results.json; the same "
                      "command resumes", file=sys.stderr)
                return 143 if isinstance(exc, _Terminated) else 130
            terminated = outcome.interrupted and _Terminated.seen
    finally:
        logging.getLogger("kalmanopt").removeHandler(handler)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # (a distributed grid, launched by torchrun)
        dist.destroy_process_group()
    if not outcome.writer:  # a rank > 0 of a distributed grid: rank 0 reports
        return 0
    print((outcome.out / ("tuning.md" if tuning else "summary.md")).read_text(encoding="utf-8"))
    if outcome.skipped:
        print(f"resumed: {outcome.skipped} run(s) were already finished in {outcome.out}")
    written = outcome.files if tuning else outcome.plots
    print(f"wrote {outcome.out}/: results.json, results.csv, summary.md, metrics.jsonl, config.json, "
          + ", ".join(p.name for p in written) + f" ({outcome.seconds:.1f} s)")
    if outcome.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        command = " ".join([f"kalmanopt {args.command}", args.config or "", "--quick" if args.quick else "",
                            f"--out {outcome.out}", f"--data {args.data}" if args.data else ""])
        print(f"{how}: kept {len(outcome.records)} finished run(s); resume with `{' '.join(command.split())}`",
              file=sys.stderr)
        return 143 if terminated else 130
    return 0


def _plot(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (out / "results.json").is_file():
        return _error(f"{str(out)!r} holds no results.json; pass an output folder of `kalmanopt run`")
    try:
        with OutputLock(out):
            try:
                config = json.loads((out / "config.json").read_text(encoding="utf-8")) \
                    if (out / "config.json").is_file() else {"name": out.name}
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{str(out / 'config.json')!r} is unreadable ({exc})") from None
            records = load_results(out)
            plots = write_reports(out, config, records) if records else []
    except ConfigError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(os_error_message(exc))
    print(f"wrote {out}/summary.md, " + ", ".join(p.name for p in plots))
    return 0


def import_plugins(spec: str | None) -> None:
    """Import the modules of ``--plugins`` (names with commas), the current folder first on the path.

    Raises:
        ImportError: a module that cannot be imported, with the name and the reason.
    """
    names = [name.strip() for name in (spec or "").split(",") if name.strip()]
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name.removesuffix(".py"))
        except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported as one line
            raise ImportError(f"--plugins: cannot import {name!r}: {type(exc).__name__}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kalmanopt`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import_plugins(getattr(args, "plugins", None))
    except ImportError as exc:
        return _error(str(exc))
    if args.command in ("run", "tune"):
        return _run(args)
    if args.command == "list":
        print(list_everything())
        return 0
    if args.command == "plot":
        return _plot(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
