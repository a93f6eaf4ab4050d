"""The optimizers of a grid: KOALA presets, compositions of named parts, and torch baselines.

A config names each optimizer one of three ways::

    {preset = "koala++", sigma = 0.1, q = 0.1, lr = 1.0}
    {torch = "adamw", lr = 1e-3, weight_decay = 1e-2}
    {compose = {surrogate = "lowrank", estimator = "vanilla", memory = 3}, q = 0.1, label = "lr-ns-3"}

or by a bare name (a preset or a baseline). Every keyword is checked against what the optimizer
accepts, and every grid setting is built once on a dummy parameter, so a bad value fails before
training starts.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

import kalmanopt
from kalmanopt.optimizer import OPTIONS, KalmanOptimizer
from kalmanopt.registry import PART_KINDS
from kalmanopt.runner.errors import ConfigError, Problems

__all__ = ["TORCH_BASELINES", "OptimizerSpec", "parse_optimizer", "baseline_keywords"]

#: torch optimizers users pick instead, with the defaults the runner uses when a config gives none
TORCH_BASELINES: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
}

#: keys of an optimizer entry that are not keywords of the optimizer
_ENTRY_KEYS = ("preset", "torch", "compose", "name", "label", "grid", "clip_grad_norm")

#: keywords of every KalmanOptimizer beside the composition's hyper-parameters
_KALMAN_KEYWORDS = ("loss_statistic", "strict", "track_diagnostics")


def baseline_keywords(name: str) -> dict[str, Any]:
    """The keywords the torch baseline ``name`` accepts, with the runner's defaults."""
    cls, defaults = TORCH_BASELINES[name]
    keywords = {p.name: p.default for p in list(inspect.signature(cls.__init__).parameters.values())[2:]
                if p.kind is inspect.Parameter.KEYWORD_ONLY or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    keywords.update(defaults)
    return keywords


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the grid with its fixed keywords and the values it sweeps.

    Attributes:
        label: the name in tables and plots (unique in the grid).
        family: ``"preset"``, ``"torch"`` or ``"compose"``.
        name: the preset or baseline name (``"compose"`` for a composition).
        parts: for a composition, the part names and structural options passed to ``compose``.
        keywords: fixed keywords (hyper-parameters) of the optimizer.
        grid: keyword -> list of values; the runs take their Cartesian product.
        clip_grad_norm: clip the gradients' global norm to this before each step
            (``torch.nn.utils.clip_grad_norm_``), or ``None``.
    """

    label: str
    family: str
    name: str
    parts: dict[str, Any] = field(default_factory=dict)
    keywords: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    clip_grad_norm: float | None = None

    @property
    def is_kalman(self) -> bool:
        """Whether it is a :class:`KalmanOptimizer` (and takes per-sample losses, has diagnostics)."""
        return self.family != "torch"

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
              loss_statistic: str = "second_moment") -> Optimizer:
        """The optimizer over ``params`` with ``keywords`` (a setting from :meth:`settings`).

        Kalman optimizers get ``track_diagnostics`` and the task's ``loss_statistic`` unless the
        keywords set them; baselines get the runner's defaults for what the keywords leave out.
        """
        if self.family == "torch":
            cls, defaults = TORCH_BASELINES[self.name]
            return cls(params, **{**defaults, **keywords})
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
            try:
                self.build([dummy], setting)
            except (ValueError, TypeError) as exc:
                problems.add(f"optimizer {self.label!r} with {setting}: {exc}")
        problems.raise_if_any()


def parse_optimizer(entry: str | dict[str, Any]) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a config entry (a name, or a table; see the module docstring)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"an optimizer entry must be a name or a table, got {entry!r}")
    entry = dict(entry)
    given = [k for k in ("preset", "torch", "compose", "name") if k in entry]
    if len(given) != 1:
        raise ConfigError(f"optimizer entry {entry!r} must have exactly one of preset, torch, compose, name "
                          f"(got {', '.join(given) or 'none'})")
    how = given[0]
    label = entry.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ConfigError(f"label of optimizer entry {entry!r} must be a non-empty string, got {label!r}")
    clip = entry.pop("clip_grad_norm", None)
    grid = entry.pop("grid", {}) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid of optimizer {label or entry[how]!r} must be a table of lists, got {grid!r}")
    value = entry.pop(how)
    keywords = entry
    presets = kalmanopt.presets()
    if how == "name":
        key = str(value).lower()
        if key in presets:
            how = "preset"
        elif key in TORCH_BASELINES:
            how = "torch"
        else:
            raise ConfigError(f"unknown optimizer {value!r}; valid choices: presets {', '.join(presets)}; "
                              f"torch baselines {', '.join(TORCH_BASELINES)}; or a composition "
                              f"(compose = {{surrogate = ..., ...}})")
    if how == "preset":
        name = str(value).lower()
        if name not in presets:
            raise ConfigError(f"unknown preset {value!r}; valid presets: {', '.join(presets)}")
        return OptimizerSpec(label or name, "preset", name, {}, keywords, grid, clip)
    if how == "torch":
        name = str(value).lower()
        if name not in TORCH_BASELINES:
            raise ConfigError(f"unknown torch baseline {value!r}; valid baselines: {', '.join(TORCH_BASELINES)}")
        return OptimizerSpec(label or name, "torch", name, {}, keywords, grid, clip)
    if not isinstance(value, dict):
        raise ConfigError(f"compose must be a table of part names and options, e.g. "
                          f"compose = {{surrogate = \"lowrank\", memory = 3}}; got {value!r}")
    parts = dict(value)
    try:
        kalmanopt.compose(**parts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"compose {parts}: {exc} (part kinds: {', '.join(PART_KINDS)})") from None
    default_label = "compose:" + "-".join(str(parts[k]) for k in PART_KINDS if k in parts)
    return OptimizerSpec(label or default_label, "compose", "compose", parts, keywords, grid, clip)
