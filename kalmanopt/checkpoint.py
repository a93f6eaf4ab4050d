"""Checking a state dict before it is loaded: everything the optimizer will use, and nothing changed on failure.

:meth:`KalmanOptimizer.load_state_dict` hands the dict here (after torch's load-state-dict
pre-hooks) and commits only what :func:`checked_state` returns. The checks:

- the structure (``state``, ``param_groups``), the filter that saved it, the number of groups
  and of parameters per group;
- every group's hyper-parameters and options (range and type, as at construction); options the
  dict lacks (an older checkpoint) are filled from this optimizer's defaults, as torch fills
  flags added after a checkpoint was written; ``param_names`` is kept from this optimizer when the
  dict has none (torch's semantics);
- every state entry against the layout the composition creates: the same keys, each tensor's
  shape (0-d included; vectors the length of their parameter), floating, integer or boolean as
  created, floating values finite, and R_k > 0. Python numbers where 0-d tensors belong (step
  counters saved as ints) are converted, as torch converts a non-tensor ``step``.

The layout is not written down twice: it is read from two throw-away optimizers over probe
parameters of two sizes, one update each, so a dimension that follows the parameter's size is
told apart from a fixed one (KOALA-M's 2×2 P, the low-rank buffers' m − 1 rows).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from kalmanopt.engines.distributed import local_tensor
from kalmanopt.groups import checked_group_values
from kalmanopt.layers import group_key, state_dtype, vector_dtype
from kalmanopt.options import GROUP_OPTIONS
from kalmanopt.plan import state_table

__all__ = ["CheckedState", "checked_state", "state_layout", "group_key", "CheckpointOwner"]


class CheckpointOwner(Protocol):
    """What a checkpoint is checked against: the optimizer that loads it (:class:`~kalmanopt.CheckpointOwner`)."""

    filter: Any
    specs: Mapping[str, Any]
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    loss_statistic: str

    def like(self, params: list[Tensor], **values: Any) -> Any: ...

    def filter_signature(self) -> str: ...

#: the sizes of the two probe parameters the state layout is read from
PROBE_SIZES = (5, 7)
#: a dimension of the layout that follows the size of the layer (its parameters' numel)
N = "n"
#: group-state entries that must be positive (R_k ≥ the smallest normal number, see LossMeasurement)
POSITIVE = ("R",)
#: hyper-parameters added after checkpoints were written, with the value that reproduces what those runs did
#: (an older state dict lacks them; it loads with these and continues as it was)
ADDED_LATER = {"target": 0.0}
#: group-state entries an older checkpoint may lack, with the value they start from (event counters)
FILLED = {"predicted": False, "steps": 0, "nonfinite_steps": 0, "skipped_layers": 0, "guard_restarts": 0,
          "rows_dropped": 0}


@dataclass(frozen=True)
class TensorSpec:
    """The shape (``N`` for the layer size) and kind (``"f"``, ``"i"``, ``"b"``) of one state tensor."""

    shape: tuple
    kind: str

    def expected(self, n: int) -> tuple:
        return tuple(n if d == N else d for d in self.shape)


@dataclass
class CheckedState:
    """What :func:`checked_state` found valid: the groups and state to commit, ready to use."""

    param_groups: list[dict[str, Any]]
    state: dict[Any, Any]
    predicted: bool


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "b"
    return "f" if t.is_floating_point() else "i"


def _probe_state(opt: CheckpointOwner, group: Mapping[str, Any], size: int) -> dict:
    """The state of a throw-away optimizer with this filter and group, over one parameter of ``size``."""
    p = torch.nn.Parameter(torch.linspace(0.5, 1.5, size, dtype=torch.float64))
    values = {name: group[name] for name in opt.specs}
    values.update({name: group[name] for name in GROUP_OPTIONS if name in group})
    values["implementation"] = "reference"
    values["state_dtype"] = None  # (the layout is the same in every precision; the probe is float64)
    probe = opt.like([p], strict=False, track_diagnostics=False, process_group="auto", **values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(2):  # two updates: every entry a layer keeps exists after its second
            p.grad = torch.linspace(1.0, 2.0 + k, size, dtype=torch.float64)
            probe.predict()
            probe.update(torch.tensor(1.0 + k, dtype=torch.float64), torch.tensor(2.0 + k, dtype=torch.float64))
    state = probe.state_dict()["state"]
    return {"group": state.get("group0", {}), "layer": state.get(0, {})}


def _layout(a: Any, b: Any, sizes: tuple[int, int]) -> Any:
    """The layout of two probe states: dimensions that follow the probe size become ``N``."""
    if isinstance(a, Mapping):
        return {k: _layout(a[k], b[k], sizes) for k in a if k in b}
    shape = tuple(N if (da, db) == sizes else da for da, db in zip(a.shape, b.shape))
    return TensorSpec(shape, _kind(a))


def state_layout(opt: CheckpointOwner, group: Mapping[str, Any]) -> dict[str, dict]:
    """``{"group": {key: TensorSpec | {key: TensorSpec}}, "layer": {key: TensorSpec}}`` for ``group``."""
    small, large = (_probe_state(opt, group, size) for size in PROBE_SIZES)
    return {part: _layout(small[part], large[part], PROBE_SIZES) for part in ("group", "layer")}


def _check_entries(value: Any, layout: Mapping[str, Any], n: int, where: str, dtype: torch.dtype,
                   device: torch.device, optional: tuple = (), filled: Mapping[str, Any] | None = None,
                   vectors: Mapping[str, torch.dtype] | None = None) -> dict[str, Any]:
    """``value`` checked against ``layout`` and copied to ``device`` (floating tensors in ``dtype``, those of
    the layer entries named in ``vectors`` in the precision it gives them: ``state_dtype``'s).

    Keys in ``optional`` may be absent; keys in ``filled`` may be absent and then take that value.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a dict of tensors, got {type(value).__name__}")
    filled = {k: v for k, v in (filled or {}).items() if k in layout and k not in value}
    value = {**value, **filled}
    missing = sorted(set(layout) - set(value) - set(optional))
    unexpected = sorted(set(value) - set(layout), key=str)
    if missing:
        raise ValueError(f"{where} lacks {missing} (this optimizer keeps {sorted(layout)} there)")
    if unexpected:
        raise ValueError(f"{where} has unexpected entries {unexpected} (this optimizer keeps {sorted(layout)} there)")
    out: dict[str, Any] = {}
    for key, spec in layout.items():
        if key not in value:
            continue
        name = f"{where}[{key!r}]"
        if isinstance(spec, Mapping):
            if value[key]:  # an empty nested layer state is a layer that has not been updated yet
                out[key] = _check_entries(value[key], spec, n, name, dtype, device, vectors=vectors)
            continue
        out[key] = _checked_tensor(value[key], spec, n, name, (vectors or {}).get(key, dtype), device)
        if key in POSITIVE and not bool((out[key] > 0).all()):
            raise ValueError(f"{name} = {out[key].tolist()} must be positive")
    return out


#: the kinds of state tensors, in words
KIND_WORDS = {"f": "floating-point", "i": "integer", "b": "boolean", "c": "complex"}


def _checked_tensor(t: Any, spec: TensorSpec, n: int, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` checked against ``spec`` (shape, kind: exactly the kind the optimizer creates) and copied to
    ``device``; floating-point tensors in ``dtype``. A Python number of the slot's kind stands for a 0-d tensor."""
    target = {"f": dtype, "i": torch.int64, "b": torch.bool}[spec.kind]
    if isinstance(t, bool) and spec.kind != "b":
        raise ValueError(f"{name} is the bool {t!r}; a {KIND_WORDS[spec.kind]} number or tensor belongs there")
    if isinstance(t, bool) or (isinstance(t, (int, float)) and spec.kind != "b"):
        if spec.shape != ():
            raise ValueError(f"{name} is the number {t!r}; a tensor of shape {spec.expected(n)} belongs there")
        if spec.kind == "i" and not float(t).is_integer():
            raise ValueError(f"{name} = {t!r} must be a whole number")
        t = torch.tensor(t, dtype=target)
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} is not a tensor ({type(t).__name__}); a {KIND_WORDS[spec.kind]} tensor of shape "
                         f"{spec.expected(n)} belongs there")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it has no values); a checkpoint must hold the state's "
                         "values")
    if t.layout != torch.strided:
        raise ValueError(f"{name} is a {t.layout} tensor; the state holds dense (strided) tensors")
    if tuple(t.shape) != spec.expected(n):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not fit this optimizer: it needs "
                         f"{spec.expected(n)}")
    kind = "c" if t.is_complex() else _kind(t)
    if kind != spec.kind:  # (a cast would change what the slot means: an int64 P, a bool S)
        raise ValueError(f"{name} is {KIND_WORDS[kind]} ({t.dtype}); a {KIND_WORDS[spec.kind]} tensor belongs "
                         f"there (this optimizer keeps it as {target})")
    if kind == "f" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} is not finite; a checkpoint with NaN or inf filter state would write them "
                         "into the weights at the next step")
    return t.to(device=device, dtype=target, copy=True)


def _vector_dtypes(opt: CheckpointOwner, group: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The precision of each per-layer vector kept between steps, for parameters of ``dtype`` in ``group``
    (``state_dtype``): a checkpoint loads into the precision the optimizer stores them in."""
    stored = vector_dtype(group.get("state_dtype"), dtype)
    return {name: stored for name in state_table(opt.filter).stored_vector_keys}


def _group_dtype_device(params: list[Tensor]) -> tuple[torch.dtype, torch.device]:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, state_dtype(p.dtype))
    return dtype, params[0].device if params else torch.device("cpu")


def _checked_groups(opt: CheckpointOwner, saved_groups: Any) -> list[dict[str, Any]]:
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"'param_groups' must be a list of dicts, got {type(saved_groups).__name__}")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the state has {len(saved_groups)} parameter group(s), this optimizer "
                         f"{len(opt.param_groups)}")
    new_groups = []
    seen: dict[Any, int] = {}
    for index, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"param_groups[{index}] must be a dict with a 'params' list")
        for key in saved["params"]:
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise ValueError(f"param_groups[{index}]['params'] holds {key!r} ({type(key).__name__}); the ids of "
                                 "a state dict's parameters are integers")
            if key in seen:
                raise ValueError(f"param_groups[{index}]['params'] repeats the parameter id {key!r} (already in "
                                 f"param_groups[{seen[key]}]); each parameter has one id")
            seen[key] = index
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"group {index}: the state has {len(saved['params'])} parameters, "
                             f"this optimizer {len(group['params'])}")
        missing = set(opt.specs) - set(saved) - set(ADDED_LATER)
        if missing:
            raise ValueError(f"group {index}: the state was saved by another composition (it lacks the "
                             f"hyper-parameters {sorted(missing)}); this optimizer runs {opt.filter.name!r}")
        # other keys (a scheduler's initial_lr, a user's label) travel with the group, as in torch
        merged = {k: v for k, v in saved.items() if k != "params"}
        for name, value in ADDED_LATER.items():  # an older checkpoint: the behaviour it was saved with
            if name in opt.specs:
                merged.setdefault(name, value)
        for name in GROUP_OPTIONS:  # an older checkpoint: the options it lacks take this optimizer's defaults
            merged.setdefault(name, opt.defaults[name])
        try:
            merged.update(checked_group_values(opt, merged))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"group {index}: {exc}") from None
        merged["params"] = group["params"]
        if "param_names" in merged:
            names = merged["param_names"]
            if not isinstance(names, (list, tuple)) or len(names) != len(group["params"]) \
                    or not all(isinstance(n, str) for n in names):
                raise ValueError(f"group {index}: 'param_names' must be a list of {len(group['params'])} strings")
        elif "param_names" in group:  # torch: names this optimizer has stay when the dict brings none
            merged["param_names"] = group["param_names"]
        new_groups.append(merged)
    return new_groups


def _layer_layout(opt: CheckpointOwner, layout: Mapping[str, Any], group: Mapping[str, Any], p: Tensor
                  ) -> dict[str, Any]:
    """The layout of parameter ``p``'s state: the probe's, without workspace vectors (never saved), and with
    each factor shaped for ``p`` read as a matrix (the probe's parameters are vectors)."""
    table = state_table(opt.filter)
    out = {k: v for k, v in layout.items() if k not in table.workspace_keys}
    for name, shape in table.factor_shapes(tuple(p.shape), group).items():
        out[name] = TensorSpec(shape, "f")
    return out


def checked_state(opt: CheckpointOwner, state_dict: Any) -> CheckedState:
    """Check ``state_dict`` against ``opt`` and return what loading it commits; ``ValueError`` if it does not fit.

    Nothing of ``opt`` changes here; the returned tensors are copies on each parameter's device.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state_dict: expected the keys 'state' and 'param_groups'")
    saved_filter = state_dict.get("filter")
    if saved_filter is not None and saved_filter != opt.filter_signature():
        raise ValueError(f"the state was saved by another filter ({saved_filter}); this optimizer runs "
                         f"{opt.filter.name!r} ({opt.filter_signature()})")
    new_groups = _checked_groups(opt, state_dict["param_groups"])
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise ValueError(f"'state' must be a dict, got {type(saved_state).__name__}")

    layouts: dict[int, dict] = {}

    def layout(index: int) -> dict:
        if index not in layouts:
            layouts[index] = state_layout(opt, new_groups[index])
        return layouts[index]

    owner: dict[Any, tuple[int, Tensor]] = {}
    for index, (saved, group) in enumerate(zip(state_dict["param_groups"], opt.param_groups)):
        for key, p in zip(saved["params"], group["params"]):
            owner[key] = (index, p)
    new_state: dict[Any, Any] = {}
    for key, value in saved_state.items():
        if key in owner:
            index, p = owner[key]
            if isinstance(value, Mapping) and not value:
                continue  # no state yet for this parameter
            if new_groups[index]["granularity"] == "global":
                raise ValueError(f"state of parameter {key!r}: group {index} runs one global filter, which keeps "
                                 "its state in the group, not per parameter")
            new_state[p] = _check_entries(value, _layer_layout(opt, layout(index)["layer"], new_groups[index], p),
                                          local_tensor(p).numel(),
                                          f"state of parameter {key!r} (shape {tuple(p.shape)})",
                                          state_dtype(p.dtype), p.device,
                                          vectors=_vector_dtypes(opt, new_groups[index], p.dtype))
        elif isinstance(key, str) and key.startswith("group") and key[5:].isdigit() \
                and int(key[5:]) < len(opt.param_groups):
            index = int(key[5:])
            params = opt.param_groups[index]["params"]
            dtype, device = _group_dtype_device(params)
            group_layout = dict(layout(index)["group"])
            workspace = state_table(opt.filter).workspace_keys
            group_layout = {k: ({n: spec for n, spec in v.items() if n not in workspace} if isinstance(v, Mapping)
                                else v) for k, v in group_layout.items()}
            nested = [k for k, v in group_layout.items() if isinstance(v, Mapping)]
            if new_groups[index]["granularity"] != "global":
                for k in nested:
                    group_layout.pop(k)
            new_state[key] = _check_entries(value, group_layout, sum(local_tensor(p).numel() for p in params),
                                            f"state {key!r}", dtype, device, optional=tuple(nested),
                                            filled=FILLED if isinstance(value, Mapping) else None)
            if isinstance(new_state[key].get("global"), dict):  # (a global filter's vectors)
                vectors = _vector_dtypes(opt, new_groups[index], dtype)
                new_state[key]["global"] = {k: v.to(vectors[k]) if k in vectors else v
                                            for k, v in new_state[key]["global"].items()}
        else:
            raise ValueError(f"unexpected state entry {key!r}; the state does not fit these parameters")
    first = new_state.get(group_key(0), {})
    predicted = bool(first["predicted"]) if "predicted" in first else False
    return CheckedState(new_groups, new_state, predicted)
