"""Changes a user makes to the groups between steps: honoured with a state dict that round-trips, or refused
when the next step sees them, nothing changed (issue 27, item 2; kalmanopt/structure.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def _step(model: torch.nn.Module, opt: kalmanopt.KalmanOptimizer, seed: int) -> None:
    dtype = next(model.parameters()).dtype
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    losses = model(x).pow(2).mean(dim=1)
    opt.zero_grad()
    losses.mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(loss=losses.detach())


def _twin(preset: str, model: torch.nn.Module, opt: kalmanopt.KalmanOptimizer):
    """A fresh model (a copy of the weights) and an optimizer identical to ``opt`` in its groups, no state."""
    twin = copy.deepcopy(model)
    mirror = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [mirror[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return twin, kalmanopt.create(preset, groups, loss_statistic=opt.loss_statistic)


def _assert_round_trips(preset: str, model, opt, seed: int) -> None:
    """The state dict loads into an identical optimizer, and the two then step bit for bit alike."""
    twin, other = _twin(preset, model, opt)
    other.load_state_dict(opt.state_dict())
    _step(model, opt, seed)
    _step(twin, other, seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _frozen(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for key, entry in a["state"].items():
        if entry.keys() != b["state"][key].keys():
            return False
        for name, value in entry.items():
            other = b["state"][key][name]
            if isinstance(value, dict):
                if value.keys() != other.keys() or not all(torch.equal(v, other[k]) for k, v in value.items()):
                    return False
            elif not torch.equal(value, other):
                return False
    return True


@pytest.mark.parametrize("preset", ["koala++", "koala++-lr", "koala-m", "koala-diag"])
@pytest.mark.parametrize("start, to", [("layer", "global"), ("global", "layer")])
def test_a_granularity_change_on_a_filter_with_layer_state_is_refused_at_the_next_step(preset, start, to):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), granularity=start)
    _step(model, opt, 0)
    opt.param_groups[0]["granularity"] = to
    before, params = _frozen(opt), [p.detach().clone() for p in model.parameters()]
    for call in (lambda: _step(model, opt, 1), lambda: opt.update(torch.tensor(1.0), torch.tensor(1.0))):
        with pytest.raises(ValueError, match=f"param_groups\\[0\\] has granularity='{to}'.*new optimizer"):
            call()
        after = _frozen(opt)
        assert _same(after, before) and all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    opt.param_groups[0]["granularity"] = start  # set back: the run goes on, and round-trips
    _assert_round_trips(preset, model, opt, 2)


@pytest.mark.parametrize("start, to", [("layer", "global"), ("global", "layer")])
def test_a_granularity_change_without_layer_state_switches_and_round_trips(start, to):
    """KOALA-V keeps no per-layer state: there is nothing to convert, the switch is honoured."""
    model = _model()
    opt = kalmanopt.create("koala-v", model.parameters(), granularity=start)
    _step(model, opt, 0)
    opt.param_groups[0]["granularity"] = to
    _step(model, opt, 1)
    _assert_round_trips("koala-v", model, opt, 2)


@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-v"])
def test_parameters_moved_to_another_precision_take_their_state_with_them(preset):
    """model.double() mid-run (a raw dtype error in torch.dot before): the state follows in float64 and the run
    equals one whose state was loaded into a float64 model."""
    model = _model()
    opt = kalmanopt.create(preset, model.parameters())
    _step(model, opt, 0)
    model.double()
    _step(model, opt, 1)
    sd = opt.state_dict()
    floats = [v for entry in sd["state"].values() for v in entry.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float64 for v in floats)
    _assert_round_trips(preset, model, opt, 2)


def test_parameters_removed_from_a_group_drop_their_state_and_the_dict_round_trips():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    _step(model, opt, 0)
    removed = opt.param_groups[0]["params"][2:]
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][:2]
    _step(model, opt, 1)
    assert all(p not in opt.state for p in removed)
    _assert_round_trips("koala++", model, opt, 2)


def test_a_global_filter_whose_parameters_changed_is_refused():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), granularity="global")
    _step(model, opt, 0)
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][:2]
    with pytest.raises(ValueError, match="parameters of its global filter changed"):
        _step(model, opt, 1)


def test_an_optimizer_option_written_into_a_group_is_refused_naming_the_attribute():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), r=None)
    _step(model, opt, 0)
    before = _frozen(opt)
    opt.param_groups[0]["loss_statistic"] = "variance"
    with pytest.raises(ValueError, match="set opt.loss_statistic instead"):
        _step(model, opt, 1)
    del opt.param_groups[0]["loss_statistic"]
    assert _same(_frozen(opt), before)
    opt.loss_statistic = "variance"  # where it belongs: honoured
    _assert_round_trips("koala++", model, opt, 1)


CHANGES = ("granularity", "implementation", "guard", "weight_decay", "r", "memory", "add group", "double",
           "lr")


def _change(opt, model, name: str, draw) -> None:
    group = opt.param_groups[0]
    if name == "granularity":
        group["granularity"] = "global" if group["granularity"] == "layer" else "layer"
    elif name == "implementation":
        group["implementation"] = draw(st.sampled_from(["reference", "foreach", None]))
    elif name == "guard":
        group["guard"] = not group["guard"]
    elif name == "weight_decay":
        group["weight_decay"] = draw(st.sampled_from([0.0, 1e-3]))
    elif name == "r":
        group["r"] = draw(st.sampled_from([None, 0.5]))
    elif name == "memory" and "memory" in group:
        group["memory"] = draw(st.sampled_from([1, 2, 3]))
    elif name == "add group" and len(opt.param_groups) == 1:
        last = list(model.parameters())[-1]
        group["params"] = [p for p in group["params"] if p is not last]
        opt.state.pop(last, None)
        opt.add_param_group({"params": [last], "lr": 0.5})
    elif name == "double":
        model.double()
    elif name == "lr":
        group["lr"] = draw(st.sampled_from([0.1, 1.0]))


@settings(max_examples=40)
@given(preset=st.sampled_from(["koala++", "koala++-lr", "koala-m", "koala-v", "koala-diag"]),
       granularity=st.sampled_from(["layer", "global"]), data=st.data())
def test_any_sequence_of_group_changes_is_honoured_with_a_loadable_state_or_refused(preset, granularity, data):
    """Hypothesis: changes between steps, drawn from everything a user may edit in a group. After each, the
    step either raises ValueError and changes nothing, or runs; the state dict then round-trips."""
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), granularity=granularity)
    _step(model, opt, 0)
    for k in range(data.draw(st.integers(1, 4), label="changes")):
        name = data.draw(st.sampled_from(CHANGES), label="change")
        _change(opt, model, name, data.draw)
        before, params = _frozen(opt), [p.detach().clone() for p in model.parameters()]
        try:
            _step(model, opt, k + 1)
        except ValueError as exc:
            assert "nothing changed" in str(exc)
            after = _frozen(opt)
            assert _same(after, before), name
            assert all(torch.equal(a, p.to(a.dtype)) for a, p in zip(params, model.parameters()))
            if name != "granularity":
                return  # (a refused change of the parameters is not undone here)
            _change(opt, model, name, data.draw)  # set it back: the run goes on
    _assert_round_trips(preset, model, opt, 99)
