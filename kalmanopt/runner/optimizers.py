"""The optimizers of a grid: KOALA presets, compositions of named parts, torch and heavyball baselines.

A config names each optimizer one of four ways::

    {preset = "koala++", sigma = 0.1, q = 0.1, lr = 1.0}
    {torch = "adamw", lr = 1e-3, weight_decay = 1e-2}
    {torch = "muon", lr = {logspace = [1e-3, 1e-2, 5]}}
    {compose = {surrogate = "lowrank", estimator = "vanilla", memory = 3}, q = 0.1, label = "lr-ns-3"}
    {heavyball = "soap", lr = 3e-3}
    {preset = "koala-adam-eigen", others = {max_dim = 1}}

or by a bare name (a preset or a torch baseline); ``heavyball`` names an optimizer of heavyball
(:mod:`kalmanopt.runner.heavyball_baselines`: the ``baselines`` extra).

``others`` (a table of keywords) builds two parameter groups, split as Muon's documentation splits them
(:func:`~kalmanopt.runner.muon.muon_param_groups`): the hidden matrices with the entry's keywords, and the
rest (embeddings, the output layer, norms and biases) with ``others`` overriding them, e.g. no basis for the
embeddings above, or ``{weight_decay = 0.0}`` for AdamW.

Every keyword is checked against what the optimizer accepts, and every grid setting is built once on a
dummy parameter (a baseline, or an entry with ``others``: on a tiny two-layer model), so a bad value fails
before training starts.

The torch baselines are every ``torch.optim.Optimizer`` subclass torch exports, by its lowercase
name (:data:`TORCH_BASELINES`), except those the runner's step cannot drive
(:data:`EXCLUDED_BASELINES`, with the reason); ``muon`` is ``torch.optim.Muon`` on the hidden
matrices paired with AdamW for the rest (:mod:`kalmanopt.runner.muon`).

A keyword given as ``{logspace = [low, high, n]}`` (in the entry or in its ``grid``) is swept over
``n`` log-spaced values from ``low`` to ``high`` (:func:`logspace`).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

import kalmanopt
from kalmanopt.optimizer import OPTIONS, KalmanOptimizer
from kalmanopt.registry import PART_KINDS
from kalmanopt.runner.errors import ConfigError, Problems
from kalmanopt.runner.heavyball_baselines import build_heavyball, heavyball_optimizers
from kalmanopt.runner.muon import MuonWithAdamW, muon_param_groups

__all__ = ["TORCH_BASELINES", "EXCLUDED_BASELINES", "RUNNER_DEFAULTS", "OptimizerSpec", "parse_optimizer",
           "baseline_keywords", "logspace"]

#: the runner's defaults where torch's own are a poor start (every other keyword keeps torch's default)
RUNNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "adam": {"lr": 1e-3},
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "rmsprop": {"lr": 1e-3},
    "adagrad": {"lr": 1e-2},
}

#: torch.optim classes that are not runner baselines, and why
EXCLUDED_BASELINES: dict[str, str] = {
    "lbfgs": "torch.optim.LBFGS needs a closure that re-evaluates the loss at every step (a line search); "
             "the runner's step passes none",
    "sparseadam": "torch.optim.SparseAdam takes sparse gradients only; the runner's models have dense ones",
}


def _torch_baselines() -> dict[str, tuple[type[Optimizer], dict[str, Any]]]:
    """Every Optimizer subclass torch.optim exports, by lowercase name, less the excluded; ``muon`` paired."""
    found: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {}
    for name in sorted(torch.optim.__all__, key=str.lower):
        cls = getattr(torch.optim, name, None)
        key = name.lower()
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or cls is Optimizer or key in EXCLUDED_BASELINES:
            continue
        if cls is torch.optim.Muon:
            cls = MuonWithAdamW
        defaults = RUNNER_DEFAULTS.get(key, {})
        required = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
                    if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
                    and p.name not in defaults]
        if required:  # (a future torch optimizer with a keyword that has no default)
            EXCLUDED_BASELINES[key] = f"torch.optim.{name} needs {', '.join(required)}, which have no default"
            continue
        found[key] = (cls, defaults)
    return found


#: torch optimizers users pick instead, with the defaults the runner uses when a config gives none:
#: every ``torch.optim`` optimizer by its lowercase name, except :data:`EXCLUDED_BASELINES`;
#: ``muon`` is :class:`~kalmanopt.runner.muon.MuonWithAdamW`
TORCH_BASELINES: dict[str, tuple[type[Optimizer], dict[str, Any]]] = _torch_baselines()


def logspace(spec: Any, where: str = "logspace") -> list[float]:
    """The values of ``{logspace = [low, high, n]}``: ``n`` log-spaced values from ``low`` to ``high``.

    Each value is rounded to 3 significant digits (readable run ids; the ends stay exact).

    Raises:
        ConfigError: naming ``where`` and what is wrong (not three numbers, a bound not positive and
            finite, ``low >= high``, ``n`` not an integer >= 2).
    """
    form = "{logspace = [low, high, n]}, e.g. {logspace = [1e-4, 1e-2, 5]}"
    if not isinstance(spec, (list, tuple)) or len(spec) != 3:
        raise ConfigError(f"{where}: logspace must be three values [low, high, n] as in {form}; got {spec!r}")
    low, high, n = spec
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: logspace bound {bound} must be a positive finite number (the values are "
                              f"log-spaced), got {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: logspace needs low < high, got low {low!r} and high {high!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"{where}: logspace needs an integer number of points n >= 2, got {n!r}")
    values = [low * (high / low) ** (i / (n - 1)) for i in range(n)]
    rounded = [float(f"{v:.3g}") for v in values[1:-1]]
    return [float(low), *rounded, float(high)]


def _is_logspace(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"logspace"}

#: keys of an optimizer entry that are not keywords of the optimizer
_ENTRY_KEYS = ("preset", "torch", "heavyball", "compose", "name", "label", "grid", "clip_grad_norm", "others")

#: keywords of every KalmanOptimizer beside the composition's hyper-parameters
_KALMAN_KEYWORDS = ("loss_statistic", "strict", "track_diagnostics")


def constructor_keywords(cls: type[Optimizer]) -> dict[str, Any]:
    """The keywords an optimizer class takes after its parameters, with their defaults."""
    return {p.name: p.default for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
            if p.kind is inspect.Parameter.KEYWORD_ONLY or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}


def baseline_keywords(name: str) -> dict[str, Any]:
    """The keywords the torch baseline ``name`` accepts, with the runner's defaults."""
    cls, defaults = TORCH_BASELINES[name]
    return {**constructor_keywords(cls), **defaults}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the grid with its fixed keywords and the values it sweeps.

    Attributes:
        label: the name in tables and plots (unique in the grid).
        family: ``"preset"``, ``"torch"``, ``"heavyball"`` or ``"compose"``.
        name: the preset or baseline name (``"compose"`` for a composition).
        parts: for a composition, the part names and structural options passed to ``compose``.
        keywords: fixed keywords (hyper-parameters) of the optimizer.
        grid: keyword -> list of values; the runs take their Cartesian product.
        clip_grad_norm: clip the gradients' global norm to this before each step
            (``torch.nn.utils.clip_grad_norm_``), or ``None``.
        others: keyword overrides for the parameters that are not hidden matrices (a second parameter
            group; empty: one group of every parameter).
    """

    label: str
    family: str
    name: str
    parts: dict[str, Any] = field(default_factory=dict)
    keywords: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    clip_grad_norm: float | None = None
    others: dict[str, Any] = field(default_factory=dict)

    @property
    def is_kalman(self) -> bool:
        """Whether it is a :class:`KalmanOptimizer` (and takes per-sample losses, has diagnostics)."""
        return self.family in ("preset", "compose")

    def describe(self) -> str:
        """What it is, in one phrase: ``preset koala++``, ``torch adamw`` or the composition's parts."""
        if self.family == "compose":
            return "compose " + " ".join(f"{k}={v}" for k, v in self.parts.items())
        return f"{self.family} {self.name}"

    def valid_keywords(self) -> dict[str, Any]:
        """Keyword -> default for every keyword this optimizer accepts."""
        if self.family == "preset":
            return kalmanopt.preset_keywords(self.name)
        if self.family == "torch":
            return baseline_keywords(self.name)
        if self.family == "heavyball":
            return constructor_keywords(heavyball_optimizers()[self.name])
        composition = self._composition()
        keywords = {name: spec.default for name, spec in composition.hyperparameters().items()}
        keywords.update(OPTIONS)
        keywords.update({"loss_statistic": "second_moment", "strict": False, "track_diagnostics": False})
        return keywords

    def settings(self) -> list[dict[str, Any]]:
        """The keyword settings of its runs: fixed keywords plus one point of the grid each."""
        names = list(self.grid)
        return [{**self.keywords, **dict(zip(names, values))}
                for values in itertools.product(*(self.grid[n] for n in names))]

    def _composition(self) -> kalmanopt.Composition:
        return kalmanopt.compose(name=self.label, **self.parts)

    def build(self, params: Iterable[torch.Tensor], keywords: dict[str, Any], *, track_diagnostics: bool = False,
              loss_statistic: str = "second_moment", model: nn.Module | None = None) -> Optimizer:
        """The optimizer over ``params`` with ``keywords`` (a setting from :meth:`settings`).

        Kalman optimizers get ``track_diagnostics`` and the task's ``loss_statistic`` unless the
        keywords set them; baselines get the runner's defaults for what the keywords leave out.
        ``model`` (the model ``params`` belong to) lets ``muon`` tell hidden matrices from embeddings
        and the output layer (:func:`~kalmanopt.runner.muon.muon_param_groups`); without it, 2-D
        tensors are taken as hidden matrices.
        """
        if self.others:
            groups = muon_param_groups(model, params) if model is not None else _split_by_shape(params)
            params = [{"params": g["params"], **({} if g["use_muon"] else self.others)} for g in groups]
        if self.family == "torch":
            cls, defaults = TORCH_BASELINES[self.name]
            if cls is MuonWithAdamW and model is not None:
                params = muon_param_groups(model, params)
            return cls(params, **{**defaults, **keywords})
        if self.family == "heavyball":
            return build_heavyball(self.name, params, keywords)
        kalman_keywords = {"track_diagnostics": track_diagnostics, "loss_statistic": loss_statistic, **keywords}
        if self.family == "preset":
            return kalmanopt.create(self.name, params, **kalman_keywords)
        return KalmanOptimizer(params, self._composition(), **kalman_keywords)

    def check(self) -> None:
        """Raise one ConfigError naming every unknown keyword, repeated grid value or value out of range."""
        try:
            valid = self.valid_keywords()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"optimizer {self.label!r}: {exc}") from None
        problems = Problems()
        for where, names in (("keyword", self.keywords), ("grid keyword", self.grid)):
            unknown = sorted(set(names) - set(valid))
            if unknown:
                problems.add(f"optimizer {self.label!r} ({self.describe()}): unknown {where}(s) {unknown}; "
                             f"valid keywords: {', '.join(sorted(valid))}")
        if self.others:
            unknown = sorted(set(self.others) - set(valid) - set(_KALMAN_KEYWORDS))
            if unknown:
                problems.add(f"optimizer {self.label!r}: unknown keyword(s) {unknown} in others; "
                             f"valid keywords: {', '.join(sorted(valid))}")
            if self.family == "torch" and self.name == "muon":
                problems.add(f"optimizer {self.label!r}: muon already steps the parameters that are not hidden "
                             f"matrices with AdamW (its adamw_lr, adamw_betas, adamw_weight_decay); others does "
                             f"not apply to it")
        both = sorted(set(self.keywords) & set(self.grid))
        if both:
            problems.add(f"optimizer {self.label!r}: {both} given both as a fixed keyword and in the grid; keep one")
        for name, values in self.grid.items():
            if not isinstance(values, list) or not values:
                problems.add(f"optimizer {self.label!r}: grid.{name} must be a non-empty list of values, "
                             f"got {values!r}")
                continue
            repeated = [v for i, v in enumerate(values) if any(v == w for w in values[:i])]
            if repeated:
                problems.add(f"optimizer {self.label!r}: grid.{name} repeats {repeated} (in {values!r}); "
                             f"each value may appear once")
        clip = self.clip_grad_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
                                 or clip == float("inf")):
            problems.add(f"optimizer {self.label!r}: clip_grad_norm must be a positive number, got {clip!r}")
        problems.raise_if_any()
        for setting in self.settings():
            dummy = torch.zeros(2, requires_grad=True)
            probe = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))  # a hidden matrix, an output layer, biases
            try:
                if not self.is_kalman or self.others:
                    self.build(probe.parameters(), setting, model=probe)
                else:
                    self.build([dummy], setting)
            except (ValueError, TypeError) as exc:
                problems.add(f"optimizer {self.label!r} with {setting}: {exc}")
        problems.raise_if_any()


def _split_by_shape(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Muon's two groups without a model to tell layers apart: 2-D tensors are taken as hidden matrices."""
    tensors = list(params)
    groups = [{"params": [p for p in tensors if p.ndim == 2], "use_muon": True},
              {"params": [p for p in tensors if p.ndim != 2], "use_muon": False}]
    return [g for g in groups if g["params"]]


def _expand_logspaces(name: str, keywords: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """The grid with every ``{logspace = ...}`` expanded; such a keyword moves from ``keywords`` into it."""
    grid = dict(grid)
    for key in [k for k, v in keywords.items() if _is_logspace(v)]:
        if key in grid:
            raise ConfigError(f"optimizer {name!r}: {key} given both as a keyword and in the grid; keep one")
        grid[key] = keywords.pop(key)
    return {key: logspace(values["logspace"], f"optimizer {name!r}, {key}") if _is_logspace(values) else values
            for key, values in grid.items()}


def parse_optimizer(entry: str | dict[str, Any]) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a config entry (a name, or a table; see the module docstring)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"an optimizer entry must be a name or a table, got {entry!r}")
    entry = dict(entry)
    given = [k for k in ("preset", "torch", "heavyball", "compose", "name") if k in entry]
    if len(given) != 1:
        raise ConfigError(f"optimizer entry {entry!r} must have exactly one of preset, torch, heavyball, compose, "
                          f"name (got {', '.join(given) or 'none'})")
    how = given[0]
    label = entry.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ConfigError(f"label of optimizer entry {entry!r} must be a non-empty string, got {label!r}")
    clip = entry.pop("clip_grad_norm", None)
    others = entry.pop("others", {})
    if not isinstance(others, dict):
        raise ConfigError(f"others of optimizer {label or entry[how]!r} must be a table of keywords for the "
                          f"parameters that are not hidden matrices, e.g. others = {{weight_decay = 0.0}}; "
                          f"got {others!r}")
    grid = entry.pop("grid", {}) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid of optimizer {label or entry[how]!r} must be a table of lists, got {grid!r}")
    value = entry.pop(how)
    keywords = entry
    grid = _expand_logspaces(label or str(value), keywords, grid)
    presets = kalmanopt.presets()
    if how == "name":
        key = str(value).lower()
        if key in presets:
            how = "preset"
        elif key in TORCH_BASELINES or key in EXCLUDED_BASELINES:
            how = "torch"
        else:
            raise ConfigError(f"unknown optimizer {value!r}; valid choices: presets {', '.join(presets)}; "
                              f"torch baselines {', '.join(TORCH_BASELINES)}; or a composition "
                              f"(compose = {{surrogate = ..., ...}})")
    if how == "preset":
        name = str(value).lower()
        if name not in presets:
            raise ConfigError(f"unknown preset {value!r}; valid presets: {', '.join(presets)}")
        return OptimizerSpec(label or name, "preset", name, {}, keywords, grid, clip, others)
    if how == "torch":
        name = str(value).lower()
        if name in EXCLUDED_BASELINES:
            raise ConfigError(f"torch baseline {value!r} is not available in the runner: {EXCLUDED_BASELINES[name]}; "
                              f"valid baselines: {', '.join(TORCH_BASELINES)}")
        if name not in TORCH_BASELINES:
            raise ConfigError(f"unknown torch baseline {value!r}; valid baselines: {', '.join(TORCH_BASELINES)}")
        return OptimizerSpec(label or name, "torch", name, {}, keywords, grid, clip, others)
    if how == "heavyball":
        name = str(value).lower()
        available = heavyball_optimizers()
        if name not in available:
            raise ConfigError(f"unknown heavyball optimizer {value!r}; valid choices: {', '.join(available)}")
        return OptimizerSpec(label or name, "heavyball", name, {}, keywords, grid, clip, others)
    if not isinstance(value, dict):
        raise ConfigError(f"compose must be a table of part names and options, e.g. "
                          f"compose = {{surrogate = \"lowrank\", memory = 3}}; got {value!r}")
    parts = dict(value)
    try:
        kalmanopt.compose(**parts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"compose {parts}: {exc} (part kinds: {', '.join(PART_KINDS)})") from None
    default_label = "compose:" + "-".join(str(parts[k]) for k in PART_KINDS if k in parts)
    return OptimizerSpec(label or default_label, "compose", "compose", parts, keywords, grid, clip, others)
