"""A state dict whose slots hold the wrong kind of value is refused, naming the slot (issue 27, item 5).

Every state tensor is created floating point (P, R, v, S, ...), integer (the counters) or boolean
(``predicted``); a load that would cast another kind into a slot (an int64 P, a bool S, a complex v)
changes what the slot means, so it is refused, and nothing of the optimizer changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cases import PRESETS
from hypothesis import given
from hypothesis import strategies as st

import kalmanopt


def _trained(preset: str, granularity: str = "layer") -> tuple[kalmanopt.KalmanOptimizer, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = kalmanopt.create(preset, model.parameters(), granularity=granularity)
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    return opt, model


def _slots(sd: dict) -> list[tuple[tuple, torch.Tensor]]:
    """(path, tensor) of every state tensor of a state dict, nested global layers included."""
    out = []
    for key, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, dict):
                out.extend(((key, name, sub), v) for sub, v in value.items())
            else:
                out.append(((key, name), value))
    return out


def _set(sd: dict, path: tuple, value) -> None:
    entry = sd["state"]
    for k in path[:-1]:
        entry = entry[k]
    entry[path[-1]] = value


def _frozen(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def _assert_same(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    left, right = _slots(a), _slots(b)
    assert [p for p, _ in left] == [p for p, _ in right]
    for (_, x), (_, y) in zip(left, right):
        assert x.dtype == y.dtype and torch.equal(x, y)


WRONG = {"f": (torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64, torch.complex128),
         "i": (torch.float32, torch.float64, torch.bool, torch.complex64),
         "b": (torch.int64, torch.float32, torch.complex64)}


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "b"
    return "f" if t.is_floating_point() else "i"


def _refused(opt, sd: dict, *words: str) -> str:
    before = _frozen(opt)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    for word in words:
        assert word in str(info.value), str(info.value)
    _assert_same(_frozen(opt), before)
    return str(info.value)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_wrong_kind_tensor_in_a_float_slot_is_refused_naming_the_slot(preset, dtype):
    opt, _ = _trained(preset)
    for path, value in _slots(opt.state_dict()):
        if _kind(value) != "f":
            continue
        sd = _frozen(opt)
        _set(sd, path, value.to(dtype) if dtype != torch.bool else value != 0)
        message = _refused(opt, sd, repr(path[-1]))
        assert str(dtype).replace("torch.", "") in message


@given(preset=st.sampled_from(PRESETS), granularity=st.sampled_from(["layer", "global"]), data=st.data())
def test_any_slot_of_any_kind_refuses_every_other_kind(preset, granularity, data):
    """Hypothesis: a slot, a wrong kind for it; refused, naming the slot, nothing changed."""
    opt, _ = _trained(preset, granularity)
    slots = _slots(opt.state_dict())
    path, value = data.draw(st.sampled_from(slots), label="slot")
    dtype = data.draw(st.sampled_from(WRONG[_kind(value)]), label="dtype")
    sd = _frozen(opt)
    _set(sd, path, value.to(dtype) if dtype != torch.bool else value != 0)
    _refused(opt, sd, repr(path[-1]))


@pytest.mark.parametrize("preset", ["koala++", "koala-m"])
def test_values_that_are_not_state_tensors_are_refused_naming_the_slot(preset):
    opt, _ = _trained(preset)
    slots = _slots(opt.state_dict())
    path, value = next((p, v) for p, v in slots if _kind(v) == "f")
    for bad, words in ((torch.empty(value.shape, device="meta"), "meta device"),
                       (value.to_sparse() if value.dim() else None, "sparse"),
                       (value.numpy(), "not a tensor"),
                       ("0.5", "not a tensor"),
                       (True, "bool")):
        if bad is None:
            continue
        sd = _frozen(opt)
        _set(sd, path, bad)
        _refused(opt, sd, repr(path[-1]), words)
    counter = next(p for p, v in slots if p[-1] == "steps")
    sd = _frozen(opt)
    _set(sd, counter, True)  # a bool is not a count
    _refused(opt, sd, "'steps'", "bool")


def test_repeated_or_non_integer_parameter_ids_are_refused():
    opt, _ = _trained("koala++")
    sd = _frozen(opt)
    sd["param_groups"][0]["params"][1] = sd["param_groups"][0]["params"][0]
    _refused(opt, sd, "repeats the parameter id 0")
    sd = _frozen(opt)
    sd["param_groups"][0]["params"][0] = [0]
    _refused(opt, sd, "integers")
    sd = _frozen(opt)
    sd["state"]["group0"]["global"] = {"v": torch.zeros(3)}  # global state in a per-layer group
    _refused(opt, sd, "'global'")
    sd = _frozen(opt)
    sd["state"][0] = [torch.zeros(3)]  # a layer's state as a list
    _refused(opt, sd, "dict")


def test_a_state_of_the_right_kinds_still_loads_with_other_float_precisions():
    """The kind is what is checked: a float16 or float64 copy of a float32 state loads (cast to the state's
    precision), and the saved counters as Python ints load (an older dict)."""
    opt, model = _trained("koala++")
    original = _frozen(opt)
    sd = _frozen(opt)
    for path, value in _slots(sd):
        if _kind(value) == "f":
            _set(sd, path, value.double())
        elif _kind(value) == "i":
            _set(sd, path, int(value))
    opt.load_state_dict(sd)
    _assert_same(_frozen(opt), original)  # float32 again, the counters tensors
