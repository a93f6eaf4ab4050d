"""The ``kalmanopt`` command: ``run`` an ablation grid, ``list`` what can go in one, ``plot`` a finished folder.

    kalmanopt run                          # the default ablation (digits, 7 optimizers, 3 seeds)
    kalmanopt run configs/cifar10-resnet18.toml --data ~/data --device cuda
    kalmanopt run CONFIG --out runs/a --quick --seeds 0,1
    kalmanopt list
    kalmanopt plot runs/a

A bad config stops before any training with one line naming the problem and the valid choices
(exit status 2). Ctrl-C stops cleanly, keeping the runs that finished (exit status 130); the same
command with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> those seeds; a single number N -> N seeds 0..N-1."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a comma-separated list (0,1,2) or a count (3), "
                                         f"got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"--seeds count must be at least 1, got {count}")
    return list(range(count))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kalmanopt`` command."""
    parser = argparse.ArgumentParser(prog="kalmanopt", description="Kalman-filter optimizers for PyTorch: "
                                     "run ablations and compare them with torch baselines.")
    commands = parser.add_subparsers(dest="command", metavar="{run,list,plot}")
    run = commands.add_parser("run", help="train a grid of optimizers x settings x seeds; write tables and plots",
                              description="Run the grid of CONFIG (a TOML file; default: the built-in ablation "
                                          "on scikit-learn's digits) and write results.json, results.csv, "
                                          "summary.md, metrics.jsonl and PNG plots into --out.")
    run.add_argument("config", nargs="?", help="a TOML config (see configs/ and docs/runner.md)")
    run.add_argument("--out", help="output folder (default runs/<config>-<timestamp>/); an existing one resumes")
    run.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (overrides the config)")
    run.add_argument("--seeds", type=_parse_seeds, help="seeds: a list 0,1,2 or a count 3 (overrides the config)")
    run.add_argument("--quick", action="store_true", help="a short smoke run: the config's [quick] overrides")
    run.add_argument("--data", help="the task's data: a text file (text) or the folder holding the CIFAR archive")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands.add_parser("list", help="the presets, parts with their keywords, torch baselines and tasks")
    plot = commands.add_parser("plot", help="redraw the summary and plots of an output folder")
    plot.add_argument("out", help="an output folder of kalmanopt run")
    return parser


def _error(message: str) -> int:
    print(f"kalmanopt: error: {message}", file=sys.stderr)
    return 2


def _format_keywords(keywords: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in keywords.items()) or "(none)"


def list_everything() -> str:
    """The text of ``kalmanopt list``."""
    import kalmanopt
    from kalmanopt.optimizer import OPTIONS
    from kalmanopt.registry import get_preset
    from kalmanopt.runner.optimizers import TORCH_BASELINES, baseline_keywords
    from kalmanopt.runner.tasks import TASKS, model_keywords

    lines = ["Presets  ([[optimizers]] preset = NAME, or kalmanopt.create(NAME, params, ...)):"]
    width = max(len(n) for n in kalmanopt.presets()) + 2
    for name in kalmanopt.presets():
        preset = get_preset(name)
        specs = preset.build().hyperparameters()
        lines.append(f"  {name:<{width}}{preset.doc}")
        lines.append(f"  {'':<{width}}hyper-parameters: {_format_keywords({k: s.default for k, s in specs.items()})}")
        if preset.options():
            lines.append(f"  {'':<{width}}structural options: {_format_keywords(preset.options())}")
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
        lines.append(f"  {name:<10}torch.optim.{cls.__name__}: {_format_keywords(defaults)}; also {', '.join(others)}")
    lines.append("")
    lines.append("Tasks  (task = NAME, model = ..., [task_options], [model_options]):")
    for name, task in sorted(TASKS.items()):
        lines.append(f"  {name:<11}({task.kind}) {task.doc}")
        models = "; ".join(f"{m}{' (default)' if m == task.default_model else ''}: "
                           f"{_format_keywords(model_keywords(b))}" for m, b in task.models.items())
        lines.append(f"  {'':<11}models: {models}")
        lines.append(f"  {'':<11}options: {_format_keywords(task.options)}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from kalmanopt.runner import ConfigError, load_config, run_experiment

    overrides = {"device": args.device, "seeds": args.seeds, "data": args.data}
    try:
        config = load_config(args.config, quick=args.quick, overrides=overrides)
        out = Path(args.out) if args.out else None
        if out is not None and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
        outcome = run_experiment(config, out, progress=not args.no_progress)
    except ConfigError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:  # before the grid started (the grid itself keeps what finished)
        print("interrupted before any run started", file=sys.stderr)
        return 130
    summary = (outcome.out / "summary.md").read_text(encoding="utf-8")
    print(summary)
    if outcome.skipped:
        print(f"resumed: {outcome.skipped} run(s) were already finished in {outcome.out}")
    print(f"wrote {outcome.out}/: results.json, results.csv, summary.md, metrics.jsonl, "
          + ", ".join(p.name for p in outcome.plots))
    if outcome.interrupted:
        print(f"interrupted: kept {len(outcome.records)} finished run(s); resume with "
              f"`kalmanopt run {args.config or ''} --out {outcome.out}`".replace("  ", " "), file=sys.stderr)
        return 130
    return 0


def _plot(args: argparse.Namespace) -> int:
    from kalmanopt.runner.plots import plot_all
    from kalmanopt.runner.results import load_results, summary_table
    from kalmanopt.runner.training import MetricsLog

    out = Path(args.out)
    if not (out / "results.json").is_file():
        return _error(f"{str(out)!r} holds no results.json; pass an output folder of `kalmanopt run`")
    config = json.loads((out / "config.json").read_text(encoding="utf-8")) if (out / "config.json").is_file() else {}
    records = load_results(out)
    title = f"{config.get('name', out.name)}: {config.get('task', '')} / {config.get('model', '')}"
    (out / "summary.md").write_text(summary_table(records, title), encoding="utf-8")
    x_key = "epoch" if config.get("epochs") is not None else "step"
    plots = plot_all(out, MetricsLog.read(out / "metrics.jsonl"), records, x_key=x_key, title=title)
    print(f"wrote {out}/summary.md, " + ", ".join(p.name for p in plots))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kalmanopt`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
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
