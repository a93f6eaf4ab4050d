"""``opt.observe(loss)`` and ``step()`` with no arguments; the preset classes of ``kalmanopt.optim``.

The frameworks themselves are exercised in test_integrations.py; here the semantics are pinned on
plain loops: what an accumulated batch's L_k and statistic are, that nothing changes on a step with
no loss, and that the classes are ``create`` under a dotted path with torch's names for momentum.
"""

from __future__ import annotations

import copy
import importlib
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import kalmanopt
from kalmanopt.observation import ObservedLosses
from kalmanopt.optim import class_name, preset_class


def _problem(seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _micro_batches(model, X, y, parts):
    """Per-sample losses of each micro-batch, with the gradient of their mean over the whole batch."""
    chunks = [F.cross_entropy(model(x), t, reduction="none") for x, t in zip(X.tensor_split(parts),
                                                                              y.tensor_split(parts))]
    torch.cat(chunks).mean().backward()
    return chunks


def _train(preset, route, steps=4, parts=3, **kw):
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            chunks = _micro_batches(model, X, y, parts)
            if route == "observe":
                for c in chunks:
                    opt.observe(c)
                opt.step()
            elif route == "wrapped":
                wrapper = type("Wrapper", (), {"optimizer": type("Inner", (), {"optimizer": opt})()})()
                for c in chunks:
                    kalmanopt.observe(wrapper, c)
                opt.step()
            elif route == "means":
                for c in chunks:
                    opt.observe(c.mean())
                opt.step()
            elif route == "mean of means":
                opt.step(loss=torch.stack([c.mean() for c in chunks]).mean())
            else:
                opt.step(loss=torch.cat(chunks))
    return _flat(model), opt


@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-adam-steady"])
@pytest.mark.parametrize("statistic", ["second_moment", "variance"])
def test_observed_micro_batches_are_the_concatenated_batch(preset, statistic):
    expected, _ = _train(preset, "loss", loss_statistic=statistic)
    for route in ("observe", "wrapped"):
        got, _ = _train(preset, route, loss_statistic=statistic)
        assert torch.equal(got, expected), route


def test_one_observation_is_step_loss_bit_for_bit():
    expected, _ = _train("koala++", "loss", parts=1)
    got, _ = _train("koala++", "observe", parts=1)
    assert torch.equal(got, expected)


def test_the_variance_counts_the_spread_between_micro_batches():
    observed = ObservedLosses()
    observed.add(torch.tensor([1.0, 1.0]))  # each micro-batch has variance 0; together, 1
    observed.add(torch.tensor([3.0, 3.0]))
    batch = observed.take()
    assert torch.equal(batch, torch.tensor([1.0, 1.0, 3.0, 3.0]))
    assert kalmanopt.loss_statistic(batch, "variance").item() == 1.0
    assert len(observed) == 0 and observed.kind is None


def test_the_online_R_follows_the_accumulated_batch():
    model = torch.nn.Linear(2, 1, bias=False).double()
    opt = kalmanopt.create("koala++", model.parameters(), loss_statistic="variance", alpha_r=0.5)
    model.weight.grad = torch.ones_like(model.weight)
    opt.observe(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt.observe(torch.tensor([3.0, 3.0], dtype=torch.float64))
    opt.step()
    # R_1 = α R_0 + (1 − α) s_1 = 0.5 · 1 + 0.5 · 1 (the variance of the four losses)
    assert opt.state["group0"]["R"].item() == 1.0


def test_mean_losses_combine_as_their_mean_with_the_scalar_warning():
    expected, _ = _train("koala++", "mean of means")
    got, _ = _train("koala++", "means")
    assert torch.equal(got, expected)
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    _micro_batches(model, *_problem(), 2)
    opt.observe(1.5)
    opt.observe(torch.tensor(2.5))
    with pytest.warns(RuntimeWarning, match="R follows mean"):
        assert opt.step().item() == 2.0


def test_mean_losses_cannot_form_a_variance():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), loss_statistic="variance")
    _micro_batches(model, *_problem(), 2)
    opt.observe(1.0)
    opt.observe(2.0)
    with pytest.raises(ValueError, match="needs the per-sample losses"):
        opt.step()


def test_mixing_per_sample_and_mean_losses_is_refused():
    opt = kalmanopt.create("koala++", _model().parameters())
    opt.observe(torch.ones(3))
    with pytest.raises(ValueError, match="a mean loss after per-sample losses"):
        opt.observe(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        opt.observe(torch.ones(0))
    with pytest.raises(TypeError, match="floating-point"):
        opt.observe(torch.ones(3, dtype=torch.int64))


def test_a_batch_of_one_sample_is_per_sample():
    observed = ObservedLosses()
    observed.add(torch.tensor([2.0]))
    observed.add(torch.tensor([4.0, 6.0]))
    assert torch.equal(observed.take(), torch.tensor([2.0, 4.0, 6.0]))


@pytest.mark.parametrize("preset", ["koala++", "koala-adam-steady"])
def test_step_without_a_loss_names_observe_and_changes_nothing(preset):
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create(preset, model.parameters())
    before = _flat(model)
    _micro_batches(model, X, y, 1)
    with pytest.raises(TypeError, match=r"step needs the loss.*opt\.observe.*kalmanopt\.integrations.*Nothing"):
        opt.step()
    assert torch.equal(_flat(model), before) and not opt.state and not opt.runtime.predicted
    # a step consumes what was observed: the next one needs its own
    opt.observe(F.cross_entropy(model(X), y, reduction="none"))
    opt.step()
    after = _flat(model)
    with pytest.raises(TypeError, match="none was observed since the last step"):
        opt.step()
    assert torch.equal(_flat(model), after)


def test_observe_finds_the_optimizer_inside_wrappers_or_names_what_it_found():
    with pytest.raises(TypeError, match="found no kalmanopt optimizer in Wrapper -> SGD"):
        wrapper = type("Wrapper", (), {"optimizer": torch.optim.SGD(_model().parameters(), lr=0.1)})()
        kalmanopt.observe(wrapper, torch.ones(2))
    loop = type("Loop", (), {})()
    loop.optimizer = loop  # a cycle ends the search
    with pytest.raises(TypeError, match="found no kalmanopt optimizer in Loop"):
        kalmanopt.observe(loop, torch.ones(2))


def test_a_closure_that_observes_wins_over_its_return_value():
    """Lightning's closure returns the last micro-batch's loss divided by the accumulation steps."""
    X, y = _problem()
    expected, _ = _train("koala++", "loss", parts=2)
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    for _ in range(4):
        def closure():
            opt.zero_grad()
            chunks = _micro_batches(model, X, y, 2)
            for c in chunks:
                opt.observe(c)
            return torch.tensor(123.0)

        assert opt.step(closure).item() == 123.0
    assert torch.equal(_flat(model), expected)


def test_an_explicit_loss_wins_and_drops_what_was_observed():
    expected, _ = _train("koala++", "loss", steps=1)
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    chunks = _micro_batches(model, X, y, 3)
    opt.observe(torch.full((5,), 100.0, dtype=torch.float64))
    opt.step(loss=torch.cat(chunks))
    assert torch.equal(_flat(model), expected) and len(opt._observed) == 0


def test_observations_are_not_state_and_copies_start_empty():
    opt = kalmanopt.create("koala++", _model().parameters())
    opt.observe(torch.ones(3))
    assert "observed" not in str(opt.state_dict())
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert len(other._observed) == 0
        with pytest.raises(TypeError, match="none was observed"):
            other.step()


def test_grad_scaler_step_takes_the_observed_loss():
    expected, _ = _train("koala++", "loss", parts=2)
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for _ in range(4):
        opt.zero_grad()
        chunks = [F.cross_entropy(model(x), t, reduction="none") for x, t in zip(X.tensor_split(2),
                                                                                  y.tensor_split(2))]
        scaler.scale(torch.cat(chunks).mean()).backward()
        for c in chunks:
            opt.observe(c)
        scaler.step(opt)
        scaler.update()
    # a power-of-two scale is exact: the same parameters as the unscaled loop
    assert torch.equal(_flat(model), expected)


def test_grad_scaler_unscale_then_clip_then_step_takes_the_observed_loss():
    """timm's NativeScaler with clip_grad: scale, backward, unscale_, clip, step(opt) with no loss."""
    X, y = _problem()
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    before = F.cross_entropy(model(X), y).item()
    for _ in range(6):
        losses = F.cross_entropy(model(X), y, reduction="none")
        opt.zero_grad()
        opt.observe(losses)
        scaler.scale(losses.mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    assert int(opt.state["group0"]["steps"]) == 6 and F.cross_entropy(model(X), y).item() < before


# ---------------------------------------------------------------------- kalmanopt.optim


@pytest.mark.parametrize("name", kalmanopt.presets())
def test_each_preset_class_is_create_under_a_dotted_path(name):
    cls = preset_class(name)
    assert issubclass(cls, torch.optim.Optimizer) and cls is preset_class(name)
    module, attr = "kalmanopt.optim", class_name(name)
    assert getattr(importlib.import_module(module), attr) is cls
    assert f"{cls.__module__}.{cls.__qualname__}" == f"{module}.{attr}"
    X, y = _problem()
    results = []
    for make in (lambda p: kalmanopt.create(name, p), lambda p: cls(p)):
        model = _model()
        opt = make(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                opt.zero_grad()
                losses = F.cross_entropy(model(X), y, reduction="none")
                losses.mean().backward()
                opt.observe(losses)
                opt.step()
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])
    assert type(pickle.loads(pickle.dumps(opt))) is cls


def test_preset_class_refuses_unknown_names_and_keywords():
    with pytest.raises(ValueError, match="unknown preset 'adamw'; valid presets: koala"):
        preset_class("adamw")
    with pytest.raises(AttributeError, match="the preset classes are: KoalaPP"):
        kalmanopt.optim.AdamW  # noqa: B018
    with pytest.raises(TypeError, match="unknown keyword"):
        kalmanopt.optim.KoalaPP(_model().parameters(), betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="give betas= or beta1/beta2=, not both"):
        kalmanopt.optim.KoalaAdam(_model().parameters(), betas=(0.9, 0.99), beta1=0.8)
    with pytest.raises(TypeError, match="betas must be a tuple of 2 numbers"):
        kalmanopt.optim.KoalaAdam(_model().parameters(), betas=0.9)


def test_the_signature_lists_the_keywords_with_torch_names():
    import inspect

    sig = inspect.signature(kalmanopt.optim.KoalaAdamSteady)
    assert sig.parameters["betas"].default == (0.9, 0.99) and "beta1" not in sig.parameters
    assert sig.parameters["lr"].default == 1e-3
    assert inspect.signature(kalmanopt.optim.KoalaM).parameters["momentum"].default == 0.9
    assert "memory" in inspect.signature(kalmanopt.optim.KoalaPPLr).parameters


def _one_cycle_run(cls, steps=6, **kw):
    X, y = _problem()
    model = _model()
    opt = cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * opt.defaults["lr"], total_steps=steps + 1)
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        losses = F.cross_entropy(model(X), y, reduction="none")
        losses.mean().backward()
        opt.observe(losses)
        opt.step()
        seen.append(dict(opt.param_groups[0]))  # what this step used (the scheduler writes the next one's)
        sched.step()
    return seen


def test_one_cycle_cycles_betas_and_the_filter_reads_them():
    seen = _one_cycle_run(kalmanopt.optim.KoalaAdamSteady)
    beta1 = [g["beta1"] for g in seen]
    assert beta1 == [g["betas"][0] for g in seen]
    assert len(set(beta1)) == len(beta1) and min(beta1) >= 0.85 - 1e-12 and max(beta1) <= 0.95 + 1e-12
    assert all(g["beta2"] == 0.99 == g["betas"][1] for g in seen)


def test_one_cycle_cycles_koala_m_momentum():
    seen = _one_cycle_run(kalmanopt.optim.KoalaM)
    assert [g["a"] for g in seen] == [g["momentum"] for g in seen] and len({g["a"] for g in seen}) > 1


def test_one_cycle_refuses_a_preset_without_momentum_with_torchs_error():
    opt = kalmanopt.optim.KoalaPP(_model().parameters())
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1 with `cycle_momentum`"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=False)


def _step(opt, model):
    X, y = _problem()
    opt.zero_grad()
    losses = F.cross_entropy(model(X), y, reduction="none")
    losses.mean().backward()
    opt.step(loss=losses)


def test_an_edit_of_either_name_reaches_the_other_at_the_next_step():
    model = _model()
    opt = kalmanopt.optim.KoalaAdam(model.parameters(), betas=(0.8, 0.95))
    group = opt.param_groups[0]
    assert (group["beta1"], group["beta2"], group["betas"], opt.defaults["betas"]) == (0.8, 0.95, (0.8, 0.95),
                                                                                        (0.8, 0.95))
    group["beta1"] = 0.7
    _step(opt, model)
    assert group["betas"] == (0.7, 0.95)
    group["betas"] = (0.6, 0.9)
    _step(opt, model)
    assert (group["beta1"], group["beta2"]) == (0.6, 0.9)
    group["betas"] = (1.5, 0.9)
    before = _flat(model)
    with pytest.raises(ValueError, match=r"param_groups\[0\].*beta1.*1.5.*nothing changed"):
        _step(opt, model)
    assert group["beta1"] == 0.6 and torch.equal(_flat(model), before)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], "betas": (0.5, 0.5)})
    assert (opt.param_groups[1]["beta1"], opt.param_groups[1]["beta2"]) == (0.5, 0.5)


def test_a_checkpoint_keeps_torch_names_and_they_lead_after_loading():
    model = _model()
    opt = kalmanopt.optim.KoalaAdam(model.parameters())
    _step(opt, model)
    opt.param_groups[0]["betas"] = (0.75, 0.99)  # a scheduler's write after the last step
    state = opt.state_dict()
    other_model = _model()
    other = kalmanopt.optim.KoalaAdam(other_model.parameters())
    other.load_state_dict(state)
    _step(other, other_model)
    assert other.param_groups[0]["beta1"] == 0.75


def test_kalmanopt_list_shows_the_classes():
    from kalmanopt.cli import list_everything

    text = list_everything()
    assert "class: kalmanopt.optim.KoalaPP(params, **hyper-parameters)" in text
    assert "class: kalmanopt.optim.KoalaAdamSteady(params, **hyper-parameters); torch's betas = beta1/beta2" in text
    assert "class: kalmanopt.optim.KoalaM(params, **hyper-parameters); torch's momentum = a" in text
