"""A ``torch.optim.Optimizer`` class per preset, importable by dotted path.

Frameworks that build the optimizer themselves take a class and its keywords, not a factory:
``transformers.Trainer(optimizer_cls_and_kwargs=(kalmanopt.optim.KoalaPP, {"lr": 1.0}))``, Lightning
CLI's ``class_path: kalmanopt.optim.KoalaPP``, Hydra's ``_target_: kalmanopt.optim.KoalaPP``. Each class
takes ``(params, **hyperparameters)`` and is ``kalmanopt.create(name, params, **hyperparameters)``::

    from kalmanopt.optim import KoalaPP
    opt = KoalaPP(model.parameters(), lr=1.0, q=0.1)            # the same as kalmanopt.create("koala++", ...)
    kalmanopt.optim.preset_class("koala-adam-steady")            # KoalaAdamSteady

The class of a preset is named from its name (:func:`class_name`: ``koala++`` → ``KoalaPP``,
``koala-adam-steady`` → ``KoalaAdamSteady``); ``kalmanopt list`` shows each one's path.

torch's names for momentum: a preset with a momentum-like hyper-parameter also keeps it in its groups
under torch's name (:data:`TORCH_ALIASES`): the ``koala-adam`` family's ``beta1``/``beta2`` as
``betas``, KOALA-M's velocity decay ``a`` as ``momentum``. Schedulers that cycle momentum
(``OneCycleLR``, ``CyclicLR``) write that entry, and the step reads it: an edit of torch's name since
the last step wins, else an edit of the preset's own name, and the two agree again after each step.
The other presets have no momentum: ``OneCycleLR`` refuses them with torch's own ``ValueError``
("optimizer must support momentum or beta1 with `cycle_momentum` option enabled"); pass
``cycle_momentum=False``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

from torch import Tensor

from kalmanopt.api import preset_composition, preset_keywords
from kalmanopt.composition import Composition
from kalmanopt.dynamics import Momentum
from kalmanopt.optimizer import KalmanOptimizer
from kalmanopt.registry import get_preset, presets

__all__ = ["preset_class", "class_name", "PresetOptimizer", "TorchAlias", "TORCH_ALIASES"]


@dataclass(frozen=True)
class TorchAlias:
    """torch's name for one or more hyper-parameters of a preset, kept beside them in every group.

    Attributes:
        name: torch's name (``"betas"``, ``"momentum"``).
        targets: the preset's hyper-parameters it stands for, in order.
        applies: whether a composition has them (and they mean what torch's name means).
    """

    name: str
    targets: tuple[str, ...]
    applies: Callable[[Composition], bool]

    def join(self, values: Any) -> Any:
        """torch's value from the preset's (``values`` maps the targets): a tuple, or one number."""
        joined = tuple(values[t] for t in self.targets)
        return joined if len(joined) > 1 else joined[0]

    def split(self, value: Any) -> tuple:
        """The preset's values from torch's; ``TypeError`` where ``value`` has the wrong form."""
        if len(self.targets) == 1:
            return (value,)
        if not isinstance(value, (tuple, list)) or len(value) != len(self.targets):
            raise TypeError(f"{self.name} must be a tuple of {len(self.targets)} numbers "
                            f"({', '.join(self.targets)}), got {type(value).__name__} {value!r}")
        return tuple(value)


#: torch's names for the presets' momentum-like hyper-parameters
TORCH_ALIASES = (
    TorchAlias("betas", ("beta1", "beta2"), lambda c: {"beta1", "beta2"} <= set(c.hyperparameters())),
    TorchAlias("momentum", ("a",), lambda c: isinstance(c.dynamics, Momentum) and "a" in c.hyperparameters()),
)


class PresetOptimizer(KalmanOptimizer):
    """The base of the preset classes; :func:`preset_class` makes one per preset (not used directly)."""

    #: the preset this class builds
    preset: ClassVar[str] = ""
    #: torch's names this preset keeps in its groups
    torch_aliases: ClassVar[tuple[TorchAlias, ...]] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **hyperparameters: Any) -> None:
        if not self.preset:
            raise TypeError("PresetOptimizer is the base of the preset classes; use kalmanopt.optim.preset_class(name) "
                            "or a class such as kalmanopt.optim.KoalaPP")
        self.__dict__["_synced"] = {}
        composition, kwargs = preset_composition(self.preset, self._from_torch_names(hyperparameters))
        super().__init__(params, composition, **kwargs)
        for alias in self.torch_aliases:
            self.defaults[alias.name] = alias.join(self.defaults)

    def _from_torch_names(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with torch's names (``betas=(0.9, 0.99)``) turned into the preset's (``beta1``, ``beta2``)."""
        kwargs = dict(kwargs)
        for alias in self.torch_aliases:
            if alias.name in kwargs:
                given = [t for t in alias.targets if t in kwargs]
                if given:
                    raise TypeError(f"{type(self).__name__}: give {alias.name}= or {'/'.join(alias.targets)}=, "
                                    f"not both ({alias.name} and {', '.join(given)} were given)")
                kwargs.update(zip(alias.targets, alias.split(kwargs.pop(alias.name))))
        return kwargs

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; a group may give torch's name (``betas``) instead of the preset's."""
        if isinstance(param_group, dict):
            param_group = {k: v for k, v in param_group.items()}
            for alias in self.torch_aliases:
                if alias.name in param_group:
                    values = alias.split(param_group[alias.name])
                    for target, value in zip(alias.targets, values):
                        if target in param_group and param_group[target] != value:
                            raise ValueError(f"the group gives {alias.name}={param_group[alias.name]!r} and "
                                             f"{target}={param_group[target]!r}, which disagree")
                        param_group[target] = value
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for alias in self.torch_aliases:
            group[alias.name] = alias.join(group)
        self._record_synced(group)

    def validate_groups(self) -> None:
        """Bring torch's names and the preset's into agreement, then check every group (as the base class).

        Where torch's name (``betas``) changed since the last step, its value is written to the preset's
        hyper-parameters; else a changed hyper-parameter is written to torch's name. A bad value raises
        before anything is written.
        """
        writes = []
        synced = self.__dict__.setdefault("_synced", {})
        for index, group in enumerate(self.param_groups):
            record = synced.get(id(group))
            last = record[1] if record is not None and record[0] is group else {}
            for alias in self.torch_aliases:
                if alias.name not in group:
                    writes.append((group, alias.name, alias.join(group)))
                    continue
                current = group[alias.name]
                if alias.name in last and current == last[alias.name]:
                    continue  # torch's name is as the last step left it: the preset's own names lead
                try:
                    values = alias.split(current)
                    checked = [self.specs[t].check(v) for t, v in zip(alias.targets, values)]
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"param_groups[{index}]: {exc}; the step was not taken and nothing changed "
                                    "(fix the value in opt.param_groups)") from None
                writes.extend((group, t, v) for t, v in zip(alias.targets, checked))
        for group, key, value in writes:
            group[key] = value
        super().validate_groups()
        for group in self.param_groups:
            for alias in self.torch_aliases:
                group[alias.name] = alias.join(group)
            self._record_synced(group)

    def _record_synced(self, group: dict[str, Any]) -> None:
        synced = self.__dict__.setdefault("_synced", {})
        synced[id(group)] = (group, {alias.name: group[alias.name] for alias in self.torch_aliases})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class; torch's names in the loaded groups lead at the next step (a scheduler wrote them)."""
        super().load_state_dict(state_dict)
        self.__dict__["_synced"] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_synced"] = {}


def class_name(preset: str) -> str:
    """The class name of a preset: its words capitalised, ``++`` as ``PP`` (``koala++-ns`` → ``KoalaPPNs``)."""
    words = [w for w in re.split(r"[^0-9A-Za-z+]+", preset) if w]
    name = "".join(w[:1].upper() + w[1:] for w in words).replace("++", "PP").replace("+", "P")
    if not name.isidentifier():
        name = "Preset" + name
    return name


_CLASSES: dict[str, tuple[Callable, type]] = {}


def preset_class(name: str) -> type[PresetOptimizer]:
    """The ``torch.optim.Optimizer`` subclass of preset ``name``: ``cls(params, **hyperparameters)``.

    The class lives in this module under :func:`class_name` (so ``kalmanopt.optim.KoalaPP`` is a dotted
    path that pickle, Lightning CLI and Hydra can import); its signature lists the preset's keywords with
    their defaults, torch's names for momentum included (:data:`TORCH_ALIASES`).

    Raises:
        ValueError: an unknown preset (the message lists the valid ones).
    """
    preset = get_preset(name)
    cached = _CLASSES.get(preset.name)
    if cached is not None and cached[0] is preset.build:
        return cached[1]  # type: ignore[return-value]
    composition = preset.build()
    aliases = tuple(alias for alias in TORCH_ALIASES if alias.applies(composition))
    cname = class_name(preset.name)

    def __init__(self: PresetOptimizer, params: Any, **hyperparameters: Any) -> None:
        PresetOptimizer.__init__(self, params, **hyperparameters)

    __init__.__signature__ = _signature(preset.name, aliases)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cname}.__init__"
    doc = (f"{preset.doc}\n\nThe preset {preset.name!r} as a torch.optim.Optimizer class: "
           f"``{cname}(params, **hyperparameters)`` is ``kalmanopt.create({preset.name!r}, params, "
           "**hyperparameters)``.")
    if aliases:
        doc += " torch's names: " + ", ".join(f"``{a.name}`` for {'/'.join(a.targets)}" for a in aliases) + "."
    cls = type(cname, (PresetOptimizer,), {"preset": preset.name, "torch_aliases": aliases, "__init__": __init__,
                                           "__module__": __name__, "__qualname__": cname, "__doc__": doc})
    _CLASSES[preset.name] = (preset.build, cls)
    return cls


def _signature(name: str, aliases: tuple[TorchAlias, ...]) -> inspect.Signature:
    """``(self, params, *, <the preset's keywords with their defaults>, foreach=None, fused=None)``."""
    keywords = preset_keywords(name)
    for alias in aliases:  # torch's name where the first of its hyper-parameters was
        value = alias.join(keywords)
        keywords = {(alias.name if k == alias.targets[0] else k): (value if k == alias.targets[0] else v)
                    for k, v in keywords.items() if k not in alias.targets[1:]}
    keywords.update(foreach=None, fused=None)
    kw = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                              inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                              *(inspect.Parameter(k, kw, default=v) for k, v in keywords.items())])


def __getattr__(attr: str) -> type:
    """``kalmanopt.optim.KoalaPP``: the class of the preset whose :func:`class_name` is ``attr``."""
    if not attr.startswith("_"):
        for name in presets():
            if class_name(name) == attr:
                return preset_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}; the preset classes are: "
                         f"{', '.join(class_name(n) for n in presets())}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {class_name(n) for n in presets()})
