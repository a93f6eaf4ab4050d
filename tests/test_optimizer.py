"""KalmanOptimizer as a torch optimizer: param groups, schedulers, the two APIs, granularity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kalmanopt


def _problem(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _losses(model, X, y):
    return F.cross_entropy(model(X), y, reduction="none")


def _run(opt, model, X, y, steps=5):
    for _ in range(steps):
        losses = _losses(model, X, y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("preset", ["koala-v", "koala-m", "koala++", "koala++-ns", "koala-diag", "koala++-lr"])
def test_every_preset_reduces_the_training_loss(preset):
    X, y = _problem()
    model = _model()
    before = float(_losses(model, X, y).mean().detach())
    opt = kalmanopt.create(preset, model.parameters())
    _run(opt, model, X, y, steps=30)
    assert float(_losses(model, X, y).mean().detach()) < before


def test_closure_and_loss_keyword_give_the_same_step():
    X, y = _problem()
    results = []
    for use_closure in (False, True):
        model = _model()
        opt = kalmanopt.create("koala++", model.parameters())
        for _ in range(3):
            if use_closure:
                def closure(opt=opt, model=model):
                    opt.zero_grad()
                    losses = _losses(model, X, y)
                    losses.mean().backward()
                    return losses
                opt.step(closure)
            else:
                losses = _losses(model, X, y)
                opt.zero_grad()
                losses.mean().backward()
                opt.step(loss=losses)
        results.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(results[0], results[1])


def test_step_without_a_loss_is_refused():
    opt = kalmanopt.create("koala++", _model().parameters())
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()


def test_variance_statistic_needs_per_sample_losses():
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), loss_statistic="variance")
    loss = _losses(model, X, y).mean()
    loss.backward()
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(loss=loss)


def test_scalar_loss_uses_its_square_as_second_moment():
    X, y = _problem()
    finals = []
    for mode in ("scalar", "two-phase"):
        model = _model()
        opt = kalmanopt.create("koala++", model.parameters())
        for _ in range(3):
            loss = _losses(model, X, y).mean()
            opt.zero_grad()
            loss.backward()
            if mode == "scalar":
                opt.step(loss=loss)
            else:
                opt.predict()
                opt.update(loss, loss.detach() ** 2)
        finals.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(finals[0], finals[1])


def test_lr_scheduler_drives_the_learning_rate():
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(4):
        _run(opt, model, X, y, steps=1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_zero_learning_rate_leaves_random_walk_parameters_unchanged():
    X, y = _problem()
    model = _model()
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = kalmanopt.create("koala++", model.parameters(), lr=0.0)
    assert torch.equal(_run(opt, model, X, y, steps=3), start)


def test_param_groups_carry_their_own_hyperparameters():
    X, y = _problem()
    model = _model()
    first, second = model[0], model[2]
    start = [p.detach().clone() for p in second.parameters()]
    opt = kalmanopt.create("koala++", [{"params": first.parameters()},
                                       {"params": second.parameters(), "lr": 0.0}], q=0.05)
    _run(opt, model, X, y, steps=2)
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[1]["q"] == 0.05
    assert all(torch.equal(a, b) for a, b in zip(start, second.parameters()))
    assert not torch.equal(first.weight.detach(), _model()[0].weight.detach())


def test_add_param_group_validates_before_adding():
    model = _model()
    opt = kalmanopt.create("koala++", model[0].parameters())
    with pytest.raises(ValueError, match="sigma"):
        opt.add_param_group({"params": model[2].parameters(), "sigma": -1.0})
    assert len(opt.param_groups) == 1


def test_global_granularity_is_one_filter_over_the_group():
    X, y = _problem()
    # with a single parameter tensor, global and layer granularity are the same filter
    single = []
    for granularity in ("layer", "global"):
        torch.manual_seed(3)
        model = torch.nn.Linear(5, 3, bias=False).double()
        opt = kalmanopt.create("koala++", model.parameters(), granularity=granularity)
        single.append(_run(opt, model, X, y, steps=4))
    torch.testing.assert_close(single[0], single[1], rtol=1e-12, atol=1e-14)
    # with several tensors it is a different filter: one v over the concatenation
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), granularity="global")
    global_run = _run(opt, model, X, y, steps=4)
    assert opt.state["group0"]["global"]["v"].numel() == sum(p.numel() for p in model.parameters())
    model = _model()
    layer_run = _run(kalmanopt.create("koala++", model.parameters()), model, X, y, steps=4)
    assert not torch.allclose(global_run, layer_run)


def test_unknown_granularity_and_implementation_are_refused():
    params = _model().parameters
    with pytest.raises(ValueError, match="valid choices: layer, global"):
        kalmanopt.create("koala++", params(), granularity="tensor")
    with pytest.raises(ValueError, match="valid choices: fused, foreach, reference"):
        kalmanopt.create("koala++", params(), implementation="fast")


def test_two_phase_and_step_api_see_the_same_losses_for_momentum():
    X, y = _problem()
    seen = {}
    for api in ("two-phase", "step"):
        model = _model()
        opt = kalmanopt.create("koala-m", model.parameters())
        losses_seen = []
        for _ in range(4):
            if api == "two-phase":
                opt.predict()
            losses = _losses(model, X, y)
            losses_seen.append(float(losses.mean().detach()))
            opt.zero_grad()
            losses.mean().backward()
            if api == "two-phase":
                opt.update(losses.mean(), (losses.detach() ** 2).mean())
            else:
                opt.step(loss=losses)
        seen[api] = losses_seen
    assert seen["two-phase"] == pytest.approx(seen["step"], rel=1e-13)


def test_diagnostics_report_internals_when_tracked():
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), track_diagnostics=True)
    _run(opt, model, X, y, steps=2)
    diag = opt.diagnostics()
    assert diag["counters"]["steps"] == 2
    assert len(diag["layers"]) == 4
    entry = diag["layers"]["group0/param0"]
    assert {"S", "gain_scale", "lambda", "alpha", "w", "cos_Hv"} <= set(entry)
    assert entry["S"] > 0 and -1.0 <= entry["cos_Hv"] <= 1.0


@pytest.mark.parametrize("implementation", ["reference", None])
def test_momentum_group_of_empty_parameters_keeps_a_finite_process_noise(implementation):
    empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    opt = kalmanopt.create("koala-m", [empty], implementation=implementation)
    empty.grad = torch.zeros_like(empty)
    opt.step(loss=torch.tensor([0.5, 0.7], dtype=torch.float64))
    assert torch.isfinite(opt.state["group0"]["qw"]) and float(opt.state["group0"]["qw"]) == 0.01
