"""A loss the filter cannot measure is refused with an error naming the problem, nothing changed (issue 27, item 7).

The meta device, a nested or sparse tensor, an integer, boolean or complex dtype, an empty batch, a
2-D tensor whose samples are ambiguous, a loss on another device than the parameters: each raises
before any weight, filter state or counter moves, through ``step(loss=...)``, ``step(closure)`` and
``update(mean, statistic)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES
from hypothesis import given
from hypothesis import strategies as st

import kalmanopt


def _stepped(preset: str, implementation: str) -> tuple[kalmanopt.KalmanOptimizer, torch.nn.Module]:
    """An optimizer one step into a run (its state exists), the gradient of the next step in ``.grad``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    x = torch.randn(5, 3)
    for _ in range(2):
        losses = model(x).pow(2).mean(dim=1)
        opt.zero_grad()
        losses.mean().backward()
        if _ == 0:
            opt.step(loss=losses.detach())
    return opt, model


def _snapshot(opt, model) -> tuple:
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]


def _assert_unchanged(before: tuple, opt, model) -> None:
    sd, params = before
    now_sd, now_params = _snapshot(opt, model)
    assert all(torch.equal(a, b) for a, b in zip(params, now_params))
    assert now_sd["param_groups"] == sd["param_groups"]
    assert now_sd["state"].keys() == sd["state"].keys()
    for key, entry in sd["state"].items():
        for name, value in entry.items():
            other = now_sd["state"][key][name]
            if isinstance(value, dict):
                assert all(torch.equal(v, other[k]) for k, v in value.items())
            else:
                assert value.dtype == other.dtype and torch.equal(value, other), (key, name)


BAD_LOSSES = {
    "meta": (lambda: torch.ones(5, device="meta"), ValueError, "meta device"),
    "meta scalar": (lambda: torch.ones((), device="meta"), ValueError, "meta device"),
    "int64": (lambda: torch.ones(5, dtype=torch.int64), TypeError, "torch.int64"),
    "bool": (lambda: torch.ones(5, dtype=torch.bool), TypeError, "torch.bool"),
    "complex": (lambda: torch.ones(5, dtype=torch.complex64), TypeError, "torch.complex64"),
    "empty": (lambda: torch.ones(0), ValueError, "empty"),
    "empty 2-D": (lambda: torch.ones(0, 3), ValueError, "empty"),
    "2-D": (lambda: torch.ones(5, 3), ValueError, "shape (5, 3)"),
    "sparse": (lambda: torch.ones(5).to_sparse(), ValueError, "sparse"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), ValueError, "nested"),
}


@pytest.mark.parametrize("preset,implementation", CASES)
@pytest.mark.parametrize("name", list(BAD_LOSSES))
def test_a_bad_loss_is_refused_by_step_naming_the_problem_and_nothing_changes(preset, implementation, name):
    make, error, words = BAD_LOSSES[name]
    opt, model = _stepped(preset, implementation)
    before = _snapshot(opt, model)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        opt.step(loss=make())
    _assert_unchanged(before, opt, model)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        opt.step(lambda: make())
    _assert_unchanged(before, opt, model)


@pytest.mark.parametrize("name", ["meta", "meta scalar", "int64", "complex", "sparse"])
def test_a_bad_loss_is_refused_by_update_and_nothing_changes(name):
    make, error, words = BAD_LOSSES[name]
    opt, model = _stepped("koala-m", "reference")
    opt.predict()
    before = _snapshot(opt, model)
    good = torch.tensor(0.5)
    for loss_mean, statistic in ((make(), good), (good, make())):
        with pytest.raises(error, match=words):
            opt.update(loss_mean, statistic)
        _assert_unchanged(before, opt, model)
    with pytest.raises(error, match=words):
        kalmanopt.loss_statistic(make(), "second_moment")


@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_per_sample_losses_of_any_shape_are_taken_or_refused_before_anything_changes(shape):
    """Hypothesis over shapes: a tensor with at most one dimension above 1 is the samples ((n,), (n, 1),
    (1, n, 1)); more than one is ambiguous and refused; no entries at all is refused; nothing changes then."""
    opt, model = _stepped("koala++", "foreach")
    before = _snapshot(opt, model)
    losses = torch.rand(shape) + 0.1
    if losses.numel() == 0:
        with pytest.raises(ValueError, match="empty"):
            opt.step(loss=losses)
        _assert_unchanged(before, opt, model)
    elif sum(d > 1 for d in shape) > 1:
        with pytest.raises(ValueError, match="which entries are the samples"):
            opt.step(loss=losses)
        _assert_unchanged(before, opt, model)
    else:
        twin, twin_model = _stepped("koala++", "foreach")
        opt.step(loss=losses)
        twin.step(loss=losses.flatten())  # the same samples, 1-D
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


def test_losses_that_carry_a_graph_or_come_from_inference_mode_are_the_same_numbers():
    """A loss that still requires grad, a leaf that requires grad, and an inference-mode tensor are read as
    their values (detached): the step equals the step with the plain tensor."""
    results = []
    for kind in ("plain", "graph", "leaf", "inference"):
        opt, model = _stepped("koala++", "reference")
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
        values = model(x).pow(2).mean(dim=1).detach()
        if kind == "graph":
            loss = model(x).pow(2).mean(dim=1)  # requires grad, a graph behind it
        elif kind == "leaf":
            loss = values.clone().requires_grad_(True)
        elif kind == "inference":
            with torch.inference_mode():
                loss = values.clone()
        else:
            loss = values
        opt.step(loss=loss)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_a_loss_on_another_device_than_the_parameters_is_refused_naming_both():
    """The rule the step applies (testable without a second device): a loss on another accelerator than the
    parameters is refused naming both; a CPU loss (a Python number becomes one) is accepted anywhere."""
    from kalmanopt.measurement import check_loss_device

    cuda = {torch.device("cuda", 0)}
    check_loss_device(torch.ones(3), cuda)  # CPU: accepted
    with pytest.raises(ValueError, match="the loss is on meta, the parameters on cuda:0"):
        check_loss_device(torch.ones(3, device="meta"), cuda)
    with pytest.raises(ValueError, match="the parameters on cpu"):
        check_loss_device(torch.ones(3, device="meta"), {torch.device("cpu")})
