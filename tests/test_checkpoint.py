"""Checkpoints: state_dict()/load_state_dict() for every preset and implementation.

A resumed run equals the straight run bit for bit; the dict survives torch.save/torch.load with
weights_only=True; a state that does not fit fails with a clear error and changes nothing.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, PRESETS
from conformance import flat
from tiny_problem import state_tensors

import kalmanopt


def _model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(device)


def _batch(k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(12, 5, generator=g).to(device), torch.randint(0, 3, (12,), generator=g).to(device)


def _train(opt, model, steps: range, api: str = "step") -> None:
    for k in steps:
        x, y = _batch(k, next(model.parameters()).device.type)
        if api == "two-phase":
            opt.predict()
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        if api == "two-phase":
            opt.update(losses.mean(), kalmanopt.loss_statistic(losses, "second_moment"))
        else:
            opt.step(loss=losses)


def _roundtrip(obj, **load_kw):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, **load_kw)


def _same_state(a: dict, b: dict) -> bool:
    left, right = list(state_tensors(a)), list(state_tensors(b))
    return [p for p, _ in left] == [p for p, _ in right] and all(
        x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()) for (_, x), (_, y) in zip(left, right))


@pytest.mark.parametrize("preset,implementation", CASES)
@pytest.mark.parametrize("api,granularity", [("step", "layer"), ("two-phase", "layer"), ("step", "global")])
def test_resumed_run_equals_straight_run_bit_for_bit(preset, implementation, api, granularity):
    kw = {"implementation": implementation, "granularity": granularity, "weight_decay": 1e-3}
    straight_model = _model()
    straight = kalmanopt.create(preset, straight_model.parameters(), **kw)
    _train(straight, straight_model, range(8), api)

    first_model = _model()
    first = kalmanopt.create(preset, first_model.parameters(), **kw)
    _train(first, first_model, range(4), api)
    saved = _roundtrip({"model": first_model.state_dict(), "optimizer": first.state_dict()})

    resumed_model = _model(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed = kalmanopt.create(preset, resumed_model.parameters(), **kw)
    resumed.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_model, range(4, 8), api)

    assert torch.equal(flat(resumed_model), flat(straight_model))
    assert _same_state(resumed.state_dict()["state"], straight.state_dict()["state"])
    assert resumed.diagnostics()["counters"] == straight.diagnostics()["counters"]


@pytest.mark.parametrize("preset", PRESETS)
def test_state_dict_holds_only_plain_values_and_tensors(preset):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters())
    _train(opt, model, range(2))
    state = opt.state_dict()
    allowed = (torch.Tensor, int, float, bool, str, type(None))

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, (int, str))
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert isinstance(value, allowed), type(value)

    check(state)
    loaded = _roundtrip(state, map_location="cpu")
    assert _same_state(loaded["state"], state["state"])


def test_resumed_run_with_several_param_groups_and_a_scheduler():
    def build():
        model = _model()
        opt = kalmanopt.create("koala++", [{"params": model[0].parameters(), "sigma": 0.05},
                                           {"params": model[2].parameters(), "lr": 0.5}])
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    straight_model, straight, straight_sched = build()
    for k in range(8):
        _train(straight, straight_model, range(k, k + 1))
        straight_sched.step()
    model, opt, sched = build()
    for k in range(4):
        _train(opt, model, range(k, k + 1))
        sched.step()
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model, opt, sched = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    for k in range(4, 8):
        _train(opt, model, range(k, k + 1))
        sched.step()
    assert torch.equal(flat(model), flat(straight_model))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in straight.param_groups]


def test_loaded_optimizer_shares_no_tensors_with_the_dict_or_the_source():
    model = _model()
    source = kalmanopt.create("koala-m", model.parameters())
    _train(source, model, range(3))
    state = source.state_dict()
    snapshot = copy.deepcopy(state)
    other_model = copy.deepcopy(model)
    loaded = kalmanopt.create("koala-m", other_model.parameters())
    loaded.load_state_dict(state)
    _train(source, model, range(3, 6))  # the source runs on; the loaded one must not notice
    assert _same_state(loaded.state_dict()["state"], snapshot["state"])


def test_state_saved_from_float32_parameters_loads_for_float64_in_float64():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    _train(opt, model, range(3))
    model64 = copy.deepcopy(model).double()
    opt64 = kalmanopt.create("koala++", model64.parameters())
    opt64.load_state_dict(_roundtrip(opt.state_dict()))
    assert all(t.dtype in (torch.float64, torch.int64, torch.bool)
               for _, t in state_tensors(opt64.state_dict()["state"]))
    for k in range(3, 5):
        x, y = _batch(k)
        losses = F.cross_entropy(model64(x.double()), y, reduction="none")
        opt64.zero_grad()
        losses.mean().backward()
        opt64.step(loss=losses)
    assert bool(torch.isfinite(flat(model64)).all())


# ----------------------------------------------------------------------------- states that do not fit
def _trained(preset: str = "koala++", model=None):
    model = model if model is not None else _model()
    opt = kalmanopt.create(preset, model.parameters())
    _train(opt, model, range(3))
    return model, opt


def _bad_states():
    _, opt = _trained()
    good = opt.state_dict()
    _, other = _trained("koala-diag")
    wide = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    _, wide_opt = _trained(model=wide)
    _, lowrank = _trained("koala++-lr")
    fewer = copy.deepcopy(good)
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:2]
    two_groups = copy.deepcopy(good)
    two_groups["param_groups"].append(dict(two_groups["param_groups"][0], params=[]))
    bad_value = copy.deepcopy(good)
    bad_value["param_groups"][0]["sigma"] = -1.0
    foreign_key = copy.deepcopy(good)
    foreign_key["state"][17] = {"v": torch.zeros(3)}
    _, momentum = _trained("koala-m")
    unsigned = momentum.state_dict()
    del unsigned["filter"]  # a plain torch dict: the hyper-parameters still tell the composition
    not_tensor = copy.deepcopy(good)
    not_tensor["state"][0]["v"] = [0.0] * 30
    return {
        "not a state dict": ({"weights": 1}, "not an optimizer state_dict"),
        "another composition": (other.state_dict(), "saved by another filter"),
        "another memory": (lowrank.state_dict(), "saved by another filter"),
        "another composition, unsigned": (unsigned, "lacks the hyper-parameters ['q', 'sigma']"),
        "other sizes": (wide_opt.state_dict(), "does not fit"),
        "fewer parameters": (fewer, "the state has 2 parameters, this optimizer 4"),
        "more groups": (two_groups, "the state has 2 parameter group"),
        "out-of-range value": (bad_value, "'sigma' = -1.0"),
        "foreign entry": (foreign_key, "unexpected state entry 17"),
        "not a tensor": (not_tensor, "is not a tensor"),
    }


BAD_STATES = _bad_states()


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_state_that_does_not_fit_fails_clearly_and_changes_nothing(case):
    state, message = BAD_STATES[case]
    model, opt = _trained()
    before_state = copy.deepcopy(opt.state_dict())
    before_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(state)
    assert _same_state(opt.state_dict()["state"], before_state["state"])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before_groups
    # and it still runs as before
    _train(opt, model, range(3, 4))


def test_load_to_cpu_with_map_location_from_weights_only_file(tmp_path):
    model, opt = _trained("koala++-lr")
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True, map_location="cpu")
    fresh = kalmanopt.create("koala++-lr", model.parameters())
    fresh.load_state_dict(saved["optimizer"])
    assert _same_state(fresh.state_dict()["state"], opt.state_dict()["state"])
    assert all(t.device.type == "cpu" for _, t in state_tensors(fresh.state_dict()["state"]))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_state_saved_on_cuda_loads_and_resumes_on_cpu(preset, tmp_path):
    cuda_model = _model(device="cuda")
    cuda_opt = kalmanopt.create(preset, cuda_model.parameters())
    _train(cuda_opt, cuda_model, range(4))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": cuda_model.state_dict(), "optimizer": cuda_opt.state_dict()}, path)
    for load_kw in ({"map_location": "cpu"}, {}):  # moved at load time, or by load_state_dict
        saved = torch.load(path, weights_only=True, **load_kw)
        cpu_model = _model(seed=1)
        cpu_model.load_state_dict(saved["model"])
        cpu_opt = kalmanopt.create(preset, cpu_model.parameters())
        cpu_opt.load_state_dict(saved["optimizer"])
        state = cpu_opt.state_dict()["state"]
        assert all(t.device.type == "cpu" for _, t in state_tensors(state))
        assert _same_state(state, cuda_opt.state_dict()["state"])
        _train(cpu_opt, cpu_model, range(4, 6))
        assert bool(torch.isfinite(flat(cpu_model)).all())
        assert cpu_opt.diagnostics()["counters"]["steps"] == 6
