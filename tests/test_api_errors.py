"""Errors of ``kalmanopt.create``: every hyper-parameter checked, with the name, value and range."""

from __future__ import annotations

import math

import pytest
import torch

import kalmanopt

# (preset, keyword, bad value, valid range as the message writes it)
OUT_OF_RANGE = [
    ("koala++", "lr", -0.1, "[0, inf)"),
    ("koala++", "lr", math.inf, "[0, inf)"),
    ("koala++", "lr", math.nan, "[0, inf)"),
    ("koala++", "sigma", 0.0, "(0, inf)"),
    ("koala++", "sigma", -1.0, "(0, inf)"),
    ("koala++", "sigma", math.inf, "(0, inf)"),
    ("koala++", "q", -1e-3, "[0, inf)"),
    ("koala++", "r", 0.0, "(0, inf) or None"),
    ("koala++", "r", -1.0, "(0, inf) or None"),
    ("koala++", "alpha_r", 1.0, "[0, 1)"),
    ("koala++", "alpha_r", -0.1, "[0, 1)"),
    ("koala++", "weight_decay", -1e-4, "[0, inf)"),
    ("koala++-ns", "sigma", 0.0, "(0, inf)"),
    ("koala-v", "sigma", 0.0, "(0, inf)"),
    ("koala-v", "q", -1.0, "[0, inf)"),
    ("koala-diag", "sigma", -0.5, "(0, inf)"),
    ("koala++-lr", "sigma", 0.0, "(0, inf)"),
    ("koala-m", "a", 1.0, "[0, 1)"),
    ("koala-m", "a", -0.5, "[0, 1)"),
    ("koala-m", "sw", 0.0, "(0, inf)"),
    ("koala-m", "sv", -1.0, "(0, inf)"),
    ("koala-m", "qw", -1.0, "[0, inf)"),
    ("koala-m", "qv", -1.0, "[0, inf)"),
    ("koala-m", "sc", math.inf, "(-inf, inf)"),
]


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("preset,name,value,valid", OUT_OF_RANGE)
def test_out_of_range_hyperparameter_names_parameter_value_and_range(preset, name, value, valid):
    with pytest.raises(ValueError) as info:
        kalmanopt.create(preset, _params(), **{name: value})
    message = str(info.value)
    assert repr(name) in message and repr(value) in message and valid in message


@pytest.mark.parametrize("value", ["0.1", [0.1], torch.tensor(0.1), True])
def test_non_number_hyperparameter_is_a_type_error(value):
    with pytest.raises(TypeError, match="'sigma' must be a number"):
        kalmanopt.create("koala++", _params(), sigma=value)


def test_r_none_selects_the_online_estimate():
    opt = kalmanopt.create("koala++", _params(), r=None)
    assert opt.param_groups[0]["r"] is None


@pytest.mark.parametrize("memory", [0, -1, 1.5, True])
def test_memory_must_be_a_whole_number_at_least_one(memory):
    with pytest.raises(ValueError, match=r"memory must be an integer >= 1, got"):
        kalmanopt.create("koala++-lr", _params(), memory=memory)


def test_koala_m_initial_covariance_must_be_positive_semidefinite():
    with pytest.raises(ValueError, match=r"sw = 0.1, sc = -1.0, sv = 0.1.*\|sc\| <= sqrt\(sw \* sv\)"):
        kalmanopt.create("koala-m", _params(), sw=0.1, sc=-1.0, sv=0.1)
    # the boundary itself (a rank-one P_0) is valid, rounding included
    kalmanopt.create("koala-m", _params(), sw=1e-6, sv=0.1, sc=-math.sqrt(1e-6 * 0.1))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'koala'; valid presets: "):
        kalmanopt.create("koala", _params())
    with pytest.raises(ValueError) as info:
        kalmanopt.create("adamw", _params())
    assert all(name in str(info.value) for name in kalmanopt.presets())


def test_unknown_keyword_lists_the_valid_ones():
    with pytest.raises(TypeError) as info:
        kalmanopt.create("koala++", _params(), momentum=0.9)
    message = str(info.value)
    assert "'momentum'" in message and "sigma" in message and "alpha_r" in message


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown loss_statistic 'std'; valid choices: second_moment, variance"):
        kalmanopt.create("koala++", _params(), loss_statistic="std")
    with pytest.raises(ValueError, match="unknown granularity 'model'"):
        kalmanopt.create("koala++", _params(), granularity="model")
    with pytest.raises(TypeError, match="guard must be True or False"):
        kalmanopt.create("koala++", _params(), guard="yes")


def test_complex_parameters_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="does not support complex parameters"):
        kalmanopt.create("koala++", [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def test_integer_parameters_are_refused():
    with pytest.raises(ValueError, match="needs floating-point parameters"):
        kalmanopt.create("koala-v", [torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("preset", kalmanopt.presets())
def test_sparse_gradients_are_refused_with_the_reason_and_nothing_changes(preset):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = kalmanopt.create(preset, embedding.parameters())
    before = embedding.weight.detach().clone()
    losses = embedding(torch.tensor([1, 2, 3])).pow(2).sum(dim=1)
    losses.mean().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(ValueError, match="does not support sparse gradients.*sparse=False"):
        opt.step(loss=losses.detach())
    assert torch.equal(embedding.weight, before)
    assert opt.diagnostics()["counters"]["steps"] == 0


def test_add_param_group_with_a_bad_value_leaves_the_groups_as_they_were():
    opt = kalmanopt.create("koala++", _params())
    with pytest.raises(ValueError, match="'sigma' = -1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "sigma": -1})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
