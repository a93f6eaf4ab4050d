"""Parts and presets by name, and third-party plugins through entry points.

Parts are registered under a kind (``measurement``, ``dynamics``, ``surrogate``, ``estimator``)
and a lowercase name; presets map a name to a function that builds a :class:`Composition`.
Packages extend kalmanopt by declaring an entry point in the group ``kalmanopt.plugins`` that
names a module or a callable; it is imported (and called, if callable) on the first lookup.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable, TypeVar

from kalmanopt.composition import Composition

__all__ = [
    "PART_KINDS", "Preset", "register_part", "get_part", "parts", "register_preset", "get_preset",
    "presets", "compose", "load_plugins", "ENTRY_POINT_GROUP",
]

PART_KINDS = ("measurement", "dynamics", "surrogate", "estimator")
ENTRY_POINT_GROUP = "kalmanopt.plugins"

_PARTS: dict[str, dict[str, type]] = {kind: {} for kind in PART_KINDS}
_PRESETS: dict[str, Preset] = {}
_plugins_loaded = False

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Preset:
    """A named composition.

    Attributes:
        name: the public name (``"koala++"``).
        build: returns the :class:`Composition`; its keyword arguments are structural options
            (e.g. ``memory``) that ``create`` accepts beside the hyper-parameters.
        doc: one line for ``kalmanopt list``.
    """

    name: str
    build: Callable[..., Composition]
    doc: str = ""

    def options(self) -> dict[str, Any]:
        """The structural options of ``build`` with their defaults."""
        sig = inspect.signature(self.build)
        return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _check_kind(kind: str) -> None:
    if kind not in PART_KINDS:
        raise ValueError(f"unknown part kind {kind!r}; valid kinds: {', '.join(PART_KINDS)}")


def register_part(kind: str, name: str, cls: T | None = None, *, replace: bool = False) -> Any:
    """Register a part class under ``kind`` and ``name``; usable as a decorator.

    Example::

        @kalmanopt.register_part("surrogate", "my-surrogate")
        class MySurrogate(kalmanopt.CovarianceSurrogate): ...
    """
    _check_kind(kind)
    name = name.lower()

    def decorate(klass: T) -> T:
        if name in _PARTS[kind] and _PARTS[kind][name] is not klass and not replace:
            raise ValueError(f"a {kind} part named {name!r} is already registered "
                             f"({_PARTS[kind][name].__name__}); pass replace=True to override it")
        _PARTS[kind][name] = klass
        if not getattr(klass, "name", ""):
            klass.name = name
        return klass

    return decorate(cls) if cls is not None else decorate


def get_part(kind: str, name: str) -> type:
    """The part class registered as ``name`` under ``kind``."""
    _check_kind(kind)
    load_plugins()
    try:
        return _PARTS[kind][name.lower()]
    except KeyError:
        raise ValueError(f"unknown {kind} part {name!r}; valid choices: "
                         f"{', '.join(sorted(_PARTS[kind])) or '(none)'}") from None


def parts(kind: str | None = None) -> dict[str, dict[str, type]] | dict[str, type]:
    """The registered parts: all kinds (``kind=None``) or one kind, by name."""
    load_plugins()
    if kind is None:
        return {k: dict(sorted(v.items())) for k, v in _PARTS.items()}
    _check_kind(kind)
    return dict(sorted(_PARTS[kind].items()))


def register_preset(name: str, doc: str = "", *, replace: bool = False) -> Callable:
    """Register a function returning a :class:`Composition` as the preset ``name`` (decorator)."""
    key = name.lower()

    def decorate(build: Callable[..., Composition]) -> Callable[..., Composition]:
        if key in _PRESETS and _PRESETS[key].build is not build and not replace:
            raise ValueError(f"a preset named {key!r} is already registered; pass replace=True to override it")
        _PRESETS[key] = Preset(key, build, doc or (inspect.getdoc(build) or "").split("\n")[0])
        return build

    return decorate


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``."""
    load_plugins()
    try:
        return _PRESETS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets())}") from None


def presets() -> list[str]:
    """The names of the registered presets, sorted."""
    load_plugins()
    return sorted(_PRESETS)


def compose(measurement: str = "loss", dynamics: str = "random_walk", surrogate: str = "product",
            estimator: str | None = None, *, name: str = "custom", **options: Any) -> Composition:
    """Build a composition from registered part names.

    ``options`` are structural options passed to the part constructors that accept them (e.g.
    ``direction="measurement"`` for the scalar surrogate, ``memory=3`` for the low-rank one).

    Example::

        comp = kalmanopt.compose(surrogate="lowrank", estimator="vanilla", memory=3)
        opt = kalmanopt.KalmanOptimizer(model.parameters(), comp, sigma=0.1, q=0.1)
    """
    remaining = dict(options)

    def build(kind: str, part_name: str, **extra: Any) -> Any:
        cls = get_part(kind, part_name)
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: remaining.pop(k) for k in list(remaining) if k in accepted}
        return cls(**extra, **kwargs)

    est = None
    surrogate_cls = get_part("surrogate", surrogate)
    if getattr(surrogate_cls, "needs_estimator", False):
        est = build("estimator", estimator or "symmetric")
    elif estimator is not None:
        raise ValueError(f"surrogate {surrogate!r} takes no least-squares estimator; "
                         "estimators go with: " + ", ".join(
                             n for n, c in _PARTS["surrogate"].items() if getattr(c, "needs_estimator", False)))
    parts_built = {
        "measurement": build("measurement", measurement),
        "dynamics": build("dynamics", dynamics),
        "surrogate": build("surrogate", surrogate, **({"estimator": est} if est is not None else {})),
    }
    if remaining:
        raise TypeError(f"unknown option(s) {sorted(remaining)} for the parts "
                        f"{measurement}/{dynamics}/{surrogate}{'/' + estimator if estimator else ''}")
    return Composition(name=name, **parts_built)


def load_plugins(entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
    """Import the ``kalmanopt.plugins`` entry points once (called by every lookup).

    A plugin that fails to load is reported with a warning and skipped, so one broken package
    does not break the library.
    """
    global _plugins_loaded
    if _plugins_loaded and entry_points is None:
        return
    _plugins_loaded = True
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in entry_points:
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the library
            warnings.warn(f"kalmanopt plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
