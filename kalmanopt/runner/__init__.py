"""The experiment runner behind ``kalmanopt run``: train optimizers on a task, several seeds, compare.

    >>> from kalmanopt.runner import load_config, run_experiment
    >>> config = load_config("configs/digits-parts.toml", quick=True)   # checked before training
    >>> outcome = run_experiment(config, "runs/try")                   # doctest: +SKIP

Modules: :mod:`~kalmanopt.runner.config` (the TOML format and its checks),
:mod:`~kalmanopt.runner.tasks` and :mod:`~kalmanopt.runner.models` (what is trained),
:mod:`~kalmanopt.runner.optimizers` (presets, compositions, baselines; :mod:`~kalmanopt.runner.muon` pairs
Muon with AdamW), :mod:`~kalmanopt.runner.tuning` (``kalmanopt tune``: sweep, pick, seeds),
:mod:`~kalmanopt.runner.training` (one run), :mod:`~kalmanopt.runner.experiment` (the grid),
:mod:`~kalmanopt.runner.results` and :mod:`~kalmanopt.runner.plots` (what is written).
"""

from kalmanopt.runner.config import DEFAULT_CONFIG, ExperimentConfig, RunSpec, Schedule, load_config, parse_config
from kalmanopt.runner.errors import ConfigError
from kalmanopt.runner.experiment import ExperimentOutcome, run_experiment, write_reports
from kalmanopt.runner.optimizers import TORCH_BASELINES, OptimizerSpec
from kalmanopt.runner.tasks import TASKS, Dataset, Task, get_task, register_task

__all__ = [
    "ConfigError", "DEFAULT_CONFIG", "ExperimentConfig", "RunSpec", "Schedule", "load_config", "parse_config",
    "ExperimentOutcome", "run_experiment", "write_reports", "TORCH_BASELINES", "OptimizerSpec", "TASKS", "Dataset",
    "Task", "get_task", "register_task",
]
