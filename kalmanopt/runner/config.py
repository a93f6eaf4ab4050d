"""An experiment: what to train, how, and which optimizers to compare; read from TOML.

Everything is checked by :meth:`ExperimentConfig.check` before any training starts: a bad
preset, keyword, task, model, schedule or data path raises :class:`ConfigError` with one line
naming the problem and the valid choices. The default ablation is embedded here
(:data:`DEFAULT_CONFIG`); ``configs/default.toml`` is the same text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kalmanopt.runner.distributed import check_mode
from kalmanopt.runner.errors import ConfigError, Problems
from kalmanopt.runner.optimizers import OptimizerSpec, parse_optimizer
from kalmanopt.runner.tasks import get_task

__all__ = ["DEFAULT_CONFIG", "ExperimentConfig", "Schedule", "RunSpec", "load_config", "parse_config",
           "read_toml", "SCHEDULES", "MAX_SEEDS", "parse_seeds"]

#: the most seeds one grid may run (a guard against a mistyped --seeds)
MAX_SEEDS = 1000

#: autocast modes of the ``autocast`` key
AUTOCAST = ("none", "bf16")

#: the default ablation, run by ``kalmanopt run`` without arguments (also ``configs/default.toml``)
DEFAULT_CONFIG = """\
# The default ablation: the KOALA family against AdamW and SGD with momentum on scikit-learn's
# handwritten digits, 3 seeds; about a minute on a 2-core CPU.
# Learning rates (and q) were picked per optimizer on the validation split with
# configs/digits-tuning.toml (seeds 0 and 1): the best mean accuracy among settings whose
# neighbours in the sweep did not diverge.
name = "default"
task = "digits"
model = "mlp"
seeds = [0, 1, 2]
epochs = 15
batch_size = 32
device = "cpu"
threads = 1             # one CPU thread: fastest for a model this small, and robust on a busy machine
log_every = 10          # steps between training-loss and diagnostics records

[model_options]
hidden = 128

[schedule]
kind = "multistep"
milestones = [10]       # epochs
gamma = 0.1

[quick]                 # --quick: a smoke test of the whole pipeline
epochs = 2
seeds = [0, 1]

[[optimizers]]
preset = "koala++"
sigma = 0.1
q = 0.5
lr = 2.0

[[optimizers]]
preset = "koala++-ns"
sigma = 0.1
q = 0.5
lr = 2.0

[[optimizers]]
preset = "koala-m"
lr = 2.0

[[optimizers]]
preset = "koala-v"
sigma = 0.1
q = 0.5
lr = 2.0

[[optimizers]]
preset = "koala-diag"
sigma = 0.1
q = 0.5
lr = 1.0

[[optimizers]]
torch = "adamw"
lr = 1e-2
weight_decay = 1e-2

[[optimizers]]
torch = "sgd"
lr = 0.3
momentum = 0.9
"""

#: learning-rate schedules: name -> the keys they read
SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": ("warmup",),
    "multistep": ("milestones", "gamma", "warmup"),
    "cosine": ("min_factor", "warmup"),
}

_TOP_LEVEL = {
    "name": "a label for the output folder",
    "task": "the task (kalmanopt list shows them)",
    "model": "the task's model",
    "seeds": "list of seeds",
    "epochs": "passes over the training data (or give steps)",
    "steps": "optimizer steps (or give epochs)",
    "batch_size": "minibatch size",
    "eval_batch_size": "minibatch size for validation",
    "device": "cpu, cuda, cuda:N, mps or auto",
    "threads": "CPU threads for torch (default: torch's own choice; 1 is fastest for small models)",
    "log_every": "steps between training-loss and diagnostics records",
    "eval_every": "steps between validations (default: every epoch, or 20 times a run given in steps)",
    "diagnostics": "record the Kalman filters' internals (default true)",
    "diagnostics_every": "steps between diagnostics records (default: log_every); only those steps pay for them",
    "autocast": "\"bf16\": bfloat16 autocast of the forward pass on CUDA (ignored on the CPU); default \"none\"",
    "distributed": "\"ddp\" or \"fsdp\": several processes started by torchrun train each run (docs/distributed.md); "
                   "default \"none\"",
    "task_options": "options of the task (data path, sizes)",
    "model_options": "options of the model (widths, depths)",
    "schedule": "the learning-rate schedule",
    "optimizers": "the optimizers to compare",
    "quick": "overrides applied by --quick",
    "analysis": "exact curvature and covariance spectra for small models",
}

#: the ``[analysis]`` keys with their defaults
ANALYSIS_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "every": 50,          # steps between curvature records (0: only at the start and the end)
    "samples": 64,        # training examples in the fixed analysis batch
    "max_params": 5000,   # the largest model (curvature) or layer (exact EKF) analysed
    "power_iterations": 20,
    "ekf_steps": 60,      # steps of the exact-EKF comparison
    "ekf_record_every": 20,
}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: a factor on each optimizer's base ``lr``, as a function of the step.

    Attributes:
        kind: ``"constant"``, ``"multistep"`` (× ``gamma`` at each milestone) or ``"cosine"``
            (from 1 to ``min_factor``).
        milestones: in epochs when the run is given in epochs, else in steps.
        gamma: the factor applied at each milestone.
        min_factor: the final factor of the cosine schedule.
        warmup: linear warm-up length (same unit as the milestones); 0 for none.
    """

    kind: str = "constant"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    min_factor: float = 0.0
    warmup: float = 0.0

    def factor(self, steps_per_unit: int, total_steps: int) -> Callable[[int], float]:
        """The factor at step k (0-based), for LambdaLR; ``steps_per_unit`` turns units into steps."""
        milestones = [m * steps_per_unit for m in self.milestones]
        warmup = self.warmup * steps_per_unit

        def at(step: int) -> float:
            value = 1.0
            if self.kind == "multistep":
                value = self.gamma ** sum(step >= m for m in milestones)
            elif self.kind == "cosine":
                progress = min(step / max(total_steps, 1), 1.0)
                value = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
            if warmup > 0 and step < warmup:
                value *= (step + 1) / warmup
            return value

        return at


def without_data(task_options: dict[str, Any]) -> dict[str, Any]:
    """The task's options less its data path (which names where the data is, not what the run is)."""
    return {k: v for k, v in task_options.items() if k != "data"}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: an optimizer with one keyword setting and one seed.

    Attributes:
        run_id: unique within the grid and stable across invocations (resume keys on it).
        optimizer: the optimizer spec.
        hyperparameters: the keyword setting.
        seed: seeds the model's initialisation and the batch order.
    """

    run_id: str
    optimizer: OptimizerSpec
    hyperparameters: dict[str, Any]
    seed: int


@dataclass
class ExperimentConfig:
    """A whole experiment; see ``docs/runner.md`` for the file format."""

    name: str = "experiment"
    task: str = "digits"
    model: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 512
    device: str = "cpu"
    threads: int | None = None
    log_every: int = 10
    eval_every: int | None = None
    diagnostics: bool = True
    diagnostics_every: int | None = None
    autocast: str = "none"
    distributed: str = "none"
    task_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    schedule: Schedule = field(default_factory=Schedule)
    optimizers: list[OptimizerSpec] = field(default_factory=list)
    quick: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    mode: str = "full"  # "quick" when read with --quick (not a config key)

    # ---------------------------------------------------------------- derived
    def runs(self) -> list[RunSpec]:
        """Every run of the grid: optimizers × keyword settings × seeds, in that order."""
        runs = []
        for spec in self.optimizers:
            for setting in spec.settings():
                for seed in self.seeds:
                    runs.append(RunSpec(self.run_id(spec, setting, seed), spec, setting, seed))
        return runs

    def run_id(self, spec: OptimizerSpec, setting: dict[str, Any], seed: int) -> str:
        """A readable id plus a hash of everything that shapes the run (so a changed config re-runs).

        The data path is not in it: the same data at another path (a relative one, another machine) is
        the same run, as :func:`~kalmanopt.runner.experiment.check_resumable` lets it resume."""
        return self._run_id(spec, setting, seed, without_data(self.task_options))

    def legacy_run_id(self, spec: OptimizerSpec, setting: dict[str, Any], seed: int, data: str | None) -> str:
        """The id an earlier kalmanopt gave this run with the data at ``data``: its hash held the data path
        (so a folder it wrote resumes under :meth:`run_id`). Without a data path the two ids are equal."""
        options = without_data(self.task_options)
        return self._run_id(spec, setting, seed, options if data is None else {**options, "data": data})

    def _run_id(self, spec: OptimizerSpec, setting: dict[str, Any], seed: int, task_options: dict[str, Any]) -> str:
        shaping = {"task": self.task, "model": self.model, "task_options": task_options,
                   "model_options": self.model_options, "epochs": self.epochs, "steps": self.steps,
                   "batch_size": self.batch_size, "schedule": self.schedule.__dict__, "diagnostics": self.diagnostics,
                   "optimizer": spec.describe(), "parts": spec.parts, "setting": setting, "seed": seed}
        if spec.clip_grad_norm is not None:
            shaping["clip_grad_norm"] = spec.clip_grad_norm
        if spec.others:
            shaping["others"] = spec.others
        if self.autocast != "none":
            shaping["autocast"] = self.autocast
        digest = hashlib.sha1(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:8]
        varying = "-".join(f"{k}{setting[k]}" for k in spec.grid)
        readable = re.sub(r"[^A-Za-z0-9+_.=-]+", "_", "-".join(filter(None, [spec.label, varying, f"seed{seed}"])))
        return f"{readable}-{digest}"

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps in each run."""
        return self.epochs * steps_per_epoch if self.epochs is not None else int(self.steps)

    def resolved_device(self) -> torch.device:
        """The device to train on (``auto``: CUDA if available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (written to ``config.json`` beside the results)."""
        return {
            "name": self.name, "task": self.task, "model": self.model, "seeds": self.seeds, "epochs": self.epochs,
            "steps": self.steps, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
            "device": self.device, "threads": self.threads, "log_every": self.log_every, "eval_every": self.eval_every,
            "diagnostics": self.diagnostics, "diagnostics_every": self.diagnostics_every, "autocast": self.autocast,
            "distributed": self.distributed,
            "task_options": self.task_options, "model_options": self.model_options,
            "schedule": {k: list(v) if isinstance(v, tuple) else v for k, v in self.schedule.__dict__.items()},
            "optimizers": [{"label": s.label, "family": s.family, "name": s.name, "parts": s.parts,
                            "keywords": s.keywords, "grid": s.grid, "clip_grad_norm": s.clip_grad_norm,
                            "others": s.others}
                           for s in self.optimizers],
            "analysis": self.analysis, "mode": self.mode,
        }

    # ---------------------------------------------------------------- checks
    def check(self) -> None:
        """Check everything that can be checked without training; raise one ConfigError naming every problem.

        Fills in the task's default model and the task options' defaults.
        """
        problems = Problems()
        with problems.collect():
            self._check_types()
        task = None
        with problems.collect():
            task = get_task(self.task)
        if task is not None:
            with problems.collect():
                self.task_options = task.check_options(self.task_options)
            self.model = self.model or task.default_model
            with problems.collect():
                task.check_model(self.model, self.model_options)
        with problems.collect():
            self._check_seeds()
        with problems.collect():
            self._check_device()
        if not self.optimizers:
            problems.add("the config names no optimizers; add [[optimizers]] entries "
                         "(kalmanopt list shows the presets and baselines)")
        labels = [s.label for s in self.optimizers]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            problems.add(f"optimizer label(s) {duplicates} appear twice; give each entry its own label = \"...\"")
        for spec in self.optimizers:
            with problems.collect():
                spec.check()
        with problems.collect():
            self._check_analysis()
        problems.raise_if_any()

    def _check_types(self) -> None:
        problems = Problems()
        if not isinstance(self.name, str) or not self.name:
            problems.add(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.task, str):
            problems.add(f"task must be a string (kalmanopt list shows the tasks), got {self.task!r}")
        if self.model is not None and not isinstance(self.model, str):
            problems.add(f"model must be a string, got {self.model!r}")
        if (self.epochs is None) == (self.steps is None):
            problems.add("give exactly one of epochs and steps (how long each run trains)")
        for key in ("epochs", "steps", "batch_size", "eval_batch_size", "log_every", "eval_every", "threads",
                    "diagnostics_every"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.add(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.diagnostics, bool):
            problems.add(f"diagnostics must be true or false, got {self.diagnostics!r}")
        if self.autocast not in AUTOCAST:
            problems.add(f"autocast must be one of {', '.join(repr(a) for a in AUTOCAST)}, got {self.autocast!r}")
        if check_mode(self.distributed) is not None:
            problems.add(check_mode(self.distributed))
        if not isinstance(self.device, str):
            problems.add(f"device must be a string (cpu, cuda, cuda:N, mps or auto), got {self.device!r}")
        for key in ("task_options", "model_options", "analysis"):
            if not isinstance(getattr(self, key), dict):
                problems.add(f"[{key}] must be a table, got {getattr(self, key)!r}")
                setattr(self, key, {})
        problems.raise_if_any()

    def _check_seeds(self) -> None:
        seeds = self.seeds
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers such as [0, 1, 2], got {seeds!r} "
                              f"(on the command line, --seeds 3 means seeds 0, 1, 2)")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must not repeat, got {seeds!r}")
        if len(seeds) > MAX_SEEDS:
            raise ConfigError(f"{len(seeds)} seeds is more than the {MAX_SEEDS} a grid may run")
        bad = [s for s in seeds if not 0 <= s < 2 ** 32]
        if bad:
            raise ConfigError(f"seeds must lie in [0, 2**32), got {bad}")

    def _check_analysis(self) -> None:
        unknown = set(self.analysis) - set(ANALYSIS_DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown [analysis] key(s) {sorted(unknown)}; valid keys: "
                              f"{', '.join(sorted(ANALYSIS_DEFAULTS))}")
        for key, value in self.analysis.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    raise ConfigError(f"[analysis] enabled must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"[analysis] {key} must be a non-negative integer, got {value!r}")

    def _check_device(self) -> None:
        valid = "cpu, cuda, cuda:N, mps or auto"
        if not isinstance(self.device, str):
            return  # reported by _check_types
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}; valid choices: {valid}")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available here; "
                                  f"valid choices on this machine: cpu, auto")
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            if index >= torch.cuda.device_count():
                raise ConfigError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        if self.device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' requested but it is not available here; valid choices: cpu, auto")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib on Python ≥ 3.11, else the ``tomli`` package)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass the path of a TOML file "
                          "(configs/ holds examples) or no argument for the default ablation")
    return parse_toml(path.read_text(encoding="utf-8"), str(path))


def parse_toml(text: str, source: str = "<config>") -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a one-line ConfigError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("reading TOML configs on Python 3.10 needs the tomli package: pip install tomli") \
                from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_schedule(schedule_raw: Any) -> Schedule:
    if not isinstance(schedule_raw, dict):
        raise ConfigError(f"[schedule] must be a table, got {schedule_raw!r}")
    schedule_raw = dict(schedule_raw)
    kind = schedule_raw.pop("kind", "constant")
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULES)}")
    problems = Problems()
    bad = set(schedule_raw) - set(SCHEDULES[kind])
    if bad:
        problems.add(f"schedule {kind!r} takes no {sorted(bad)}; valid keys: kind, {', '.join(SCHEDULES[kind])}")
    milestones = schedule_raw.get("milestones", [])
    if not isinstance(milestones, list) or not all(_number(m) and m >= 0 for m in milestones):
        problems.add(f"[schedule] milestones must be a list of non-negative numbers such as [10, 20], "
                     f"got {milestones!r}")
        milestones = []
    elif milestones != sorted(milestones):
        problems.add(f"[schedule] milestones must be in increasing order, got {milestones!r}")
    for key, low in (("gamma", 0.0), ("min_factor", 0.0), ("warmup", 0.0)):
        value = schedule_raw.get(key, 0.0)
        if not _number(value) or value < low or not math.isfinite(value):
            problems.add(f"[schedule] {key} must be a finite number >= {low:g}, got {value!r}")
    problems.raise_if_any()
    return Schedule(kind=kind, milestones=tuple(float(m) for m in milestones),
                    gamma=float(schedule_raw.get("gamma", 0.1)),
                    min_factor=float(schedule_raw.get("min_factor", 0.0)),
                    warmup=float(schedule_raw.get("warmup", 0.0)))


def _apply_quick(raw: dict[str, Any]) -> None:
    overrides = raw.get("quick") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"[quick] must be a table, got {overrides!r}")
    bad = set(overrides) - set(_TOP_LEVEL) | ({"quick", "optimizers"} & set(overrides))
    if bad:
        raise ConfigError(f"[quick] overrides unknown or unsupported key(s) {sorted(bad)}")
    overrides = dict(overrides)
    if not overrides:
        for key, cap in (("epochs", 2), ("steps", 40)):
            if isinstance(raw.get(key), int) and not isinstance(raw.get(key), bool):
                overrides[key] = min(raw[key], cap)
        seeds = raw.get("seeds", [0])
        overrides["seeds"] = list(seeds)[:2] if isinstance(seeds, list) else seeds
    base_task_options = dict(raw.get("task_options") or {}) if isinstance(raw.get("task_options"), dict) else {}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    if "steps" in overrides and "epochs" not in overrides:
        raw.pop("epochs", None)
    if "epochs" in overrides and "steps" not in overrides:
        raw.pop("steps", None)
    task_name = raw.get("task", "digits")
    if isinstance(task_name, str):
        task = get_task(task_name)
        # the task's own quick options shrink the data; the [quick] table has the last word
        quick_task = overrides.get("task_options", {}) if isinstance(overrides.get("task_options"), dict) else {}
        raw["task_options"] = {**base_task_options, **task.quick_options, **quick_task}


def parse_config(raw: dict[str, Any], *, quick: bool = False) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from parsed TOML; ``quick`` applies the ``[quick]`` overrides.

    Without a ``[quick]`` table, ``quick`` keeps at most 2 epochs (or 40 steps) and 2 seeds; the
    task's own quick options (smaller corpora, subsets) are applied either way. Every problem
    found is reported in one :class:`ConfigError`; types are checked by :meth:`ExperimentConfig.check`.
    """
    problems = Problems()
    config = _parse(raw, quick, problems)
    problems.raise_if_any()
    return config


def _parse(raw: dict[str, Any], quick: bool, problems: Problems) -> ExperimentConfig:
    """The config, with every problem found added to ``problems`` (what is wrong is left out)."""
    raw = copy.deepcopy(raw)
    unknown = set(raw) - set(_TOP_LEVEL)
    if unknown:
        problems.add(f"unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(sorted(_TOP_LEVEL))}")
        for key in unknown:
            raw.pop(key)
    if quick:
        with problems.collect():
            _apply_quick(raw)
    schedule = Schedule()
    with problems.collect():
        schedule = _parse_schedule(raw.pop("schedule", {}) or {})
    entries = raw.pop("optimizers", [])
    optimizers = []
    if not isinstance(entries, list):
        problems.add("optimizers must be a list: [[optimizers]] tables or a list of names")
        entries = []
    for entry in entries:
        with problems.collect():
            optimizers.append(parse_optimizer(entry))
    raw.pop("quick", None)
    raw.pop("mode", None)
    config = ExperimentConfig(schedule=schedule, optimizers=optimizers, mode="quick" if quick else "full", **raw)
    if config.task_options is None:
        config.task_options = {}
    return config


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: a count ``3`` (seeds 0, 1, 2) or an explicit list ``0,5,7``.

    Raises:
        ConfigError: naming which form was read and what is wrong with it.
    """
    text = text.strip()
    if "," in text:
        items = [item.strip() for item in text.split(",")]
        try:
            seeds = [int(item) for item in items if item]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: a list of seeds must be integers separated by commas, "
                              f"such as 0,5,7") from None
        if not seeds:
            raise ConfigError(f"--seeds {text!r}: the list names no seed")
        return seeds
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3 runs seeds 0, 1, 2) or a list of seeds "
                          f"separated by commas (0,5,7; a single seed 5 is written 5,)") from None
    if not 1 <= count <= MAX_SEEDS:
        raise ConfigError(f"--seeds {count} is read as a count of seeds (0 .. {count - 1}); it must lie in "
                          f"1 .. {MAX_SEEDS} (for the single seed {count}, write --seeds {count},)")
    return list(range(count))


def load_config(path: str | Path | None = None, *, quick: bool = False, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, override and check a config; ``path=None`` is the default ablation.

    Args:
        path: a TOML file, or ``None`` for :data:`DEFAULT_CONFIG`.
        quick: apply the ``[quick]`` overrides.
        overrides: top-level values set after reading (``device``, ``seeds``; ``data`` goes to
            ``task_options``; ``steps`` or ``epochs`` replaces the config's length, given in either),
            as the command line's flags do.
        defaults: top-level values used where the file gives none (``kalmanopt tune``: 3 seeds).

    Raises:
        ConfigError: every problem found, in one message, before anything is trained.
    """
    raw = parse_toml(DEFAULT_CONFIG, "default config") if path is None else read_toml(path)
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    for key, value in (defaults or {}).items():
        raw.setdefault(key, copy.deepcopy(value))
    overrides = dict(overrides or {})
    data = overrides.pop("data", None)
    problems = Problems()
    config = _parse(raw, quick, problems)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    length = [key for key in ("steps", "epochs") if overrides.get(key) is not None]
    if len(length) == 1:  # --steps or --epochs: the run's length replaces the config's, given either way
        setattr(config, "epochs" if length == ["steps"] else "steps", None)
    if data is not None and isinstance(config.task_options, dict):
        config.task_options = {**config.task_options, "data": str(data)}
    with problems.collect():
        config.check()
    if raw.get("optimizers"):  # entries were given; the ones that failed are reported already
        problems.messages = [m for m in problems.messages if not m.startswith("the config names no optimizers")]
    problems.raise_if_any()
    return config
