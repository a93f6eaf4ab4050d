"""The optimizer and its checkpoints used as a hostile user would: nothing silent, nothing lost.

Each test feeds one kind of bad or unusual input through the public API and checks that it is
either handled exactly (numpy scalars, a Python-number loss) or refused with an error that names
the problem, with the parameters and the filter state unchanged.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from cases import CASES, PRESETS
from conformance import flat
from tiny_problem import backward_losses, state_tensors, tiny_losses, tiny_model, train

import kalmanopt
from kalmanopt.checkpoint import state_layout


def _filter_state(opt) -> dict:
    """Every floating-point state tensor (the filter state, not the event counters), cloned."""
    return {path: t.clone() for path, t in state_tensors(opt.state_dict()["state"]) if t.is_floating_point()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _has(preset: str, name: str) -> bool:
    return name in kalmanopt.preset_keywords(preset)


# ----------------------------------------------------------------------------- types of hyper-parameters
@pytest.mark.parametrize("preset", PRESETS)
def test_numpy_scalars_are_accepted_as_hyperparameters_and_mean_the_same(preset):
    np = pytest.importorskip("numpy")
    values = {"lr": 0.5, "weight_decay": 0.01, "alpha_r": 0.5}
    if _has(preset, "sigma"):
        values["sigma"] = 0.25
    if _has(preset, "memory"):
        values["memory"] = 3
    as_numpy = {k: (np.int64(v) if isinstance(v, int) else np.float64(v) if k == "lr" else np.float32(v))
                for k, v in values.items()}
    exact = {k: (float(np.float32(v)) if isinstance(as_numpy[k], np.float32) else v) for k, v in values.items()}
    runs = []
    for kwargs in (as_numpy, exact):
        model = tiny_model()
        opt = kalmanopt.create(preset, model.parameters(), **kwargs)
        assert all(type(opt.param_groups[0][k]) in (int, float) for k in values if k != "memory")
        train(opt, model, range(3))
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("value", ["false", "0", 0, 1, None, [True]])
@pytest.mark.parametrize("name", ["strict", "track_diagnostics", "guard"])
def test_non_booleans_for_boolean_options_are_type_errors(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        kalmanopt.create("koala++", tiny_model().parameters(), **{name: value})


# ----------------------------------------------------------------------------- groups edited between steps
def _edits(preset: str) -> list:
    edits = [("lr", math.nan, ValueError, "'lr' = nan is out of range"),
             ("lr", -1.0, ValueError, "'lr' = -1.0 is out of range"),
             ("lr", "0.1", TypeError, "'lr' must be a number"),
             ("lr", math.inf, ValueError, "'lr' = inf is out of range"),
             ("weight_decay", None, ValueError, "'weight_decay' = None is out of range"),
             ("guard", "no", TypeError, "guard must be True or False"),
             ("granularity", "model", ValueError, "unknown granularity 'model'")]
    if _has(preset, "q"):
        edits.append(("q", "0.1", TypeError, "'q' must be a number"))
    return edits


@pytest.mark.parametrize("api", ["step", "two-phase"])
@pytest.mark.parametrize("preset,name,value,error,match",
                         [(p, *edit) for p in PRESETS for edit in _edits(p)])
def test_a_group_edited_to_a_bad_value_is_refused_at_the_next_step_and_nothing_changes(
        preset, name, value, error, match, api):
    model = tiny_model()
    params = list(model.parameters())
    opt = kalmanopt.create(preset, [{"params": params[:2]}, {"params": params[2:]}])
    train(opt, model, range(2))
    opt.param_groups[1][name] = value
    losses = backward_losses(opt, model, 2)
    theta, state = flat(model), _filter_state(opt)
    with pytest.raises(error, match=match) as info:
        if api == "step":
            opt.step(loss=losses)
        else:
            opt.predict()
            opt.update(losses.mean(), kalmanopt.loss_statistic(losses, "second_moment"))
    assert "param_groups[1]" in str(info.value) and "nothing changed" in str(info.value)
    assert torch.equal(flat(model), theta) and _same(_filter_state(opt), state)
    assert opt.param_groups[1][name] is value or opt.param_groups[1][name] == value
    # fixed, the run goes on
    opt.param_groups[1][name] = opt.param_groups[0][name]
    opt.step(loss=losses)
    assert bool(torch.isfinite(flat(model)).all()) and not torch.equal(flat(model), theta)


def test_an_edited_numpy_lr_is_normalised_at_the_next_step():
    np = pytest.importorskip("numpy")
    model = tiny_model()
    opt = kalmanopt.create("koala++", model.parameters())
    opt.param_groups[0]["lr"] = np.float32(0.5)
    train(opt, model, range(1))
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["lr"] == 0.5


# ----------------------------------------------------------------------------- closures and losses
@pytest.mark.parametrize("returned", [lambda loss: (loss, None), lambda loss: {"loss": loss}, lambda loss: None,
                                      lambda loss: [loss]])
def test_a_closure_returning_a_tuple_or_a_dict_says_what_it_must_return(returned):
    model = tiny_model()
    opt = kalmanopt.create("koala++", model.parameters())
    theta = flat(model)

    def closure():
        return returned(backward_losses(opt, model, 0))

    with pytest.raises(TypeError, match="return the loss: a tensor of per-sample losses or their mean"):
        opt.step(closure)
    assert torch.equal(flat(model), theta) and opt.diagnostics()["counters"]["steps"] == 0


def test_a_loss_of_the_wrong_type_is_refused_with_what_it_must_be():
    opt = kalmanopt.create("koala++", tiny_model().parameters())
    with pytest.raises(TypeError, match="the loss must be a floating-point tensor of per-sample losses"):
        opt.step(loss=(torch.ones(3), 2))
    with pytest.raises(TypeError, match="floating-point"):
        opt.step(loss=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_scalar_mean_with_an_online_R_warns_once_that_R_follows_its_square(preset):
    model = tiny_model()
    opt = kalmanopt.create(preset, model.parameters(), r=None)
    with pytest.warns(RuntimeWarning, match=r"R follows mean²") as record:
        for k in range(3):
            opt.step(loss=backward_losses(opt, model, k).mean())
    assert sum("R follows mean²" in str(w.message) for w in record) == 1
    for kwargs, loss in (({"r": None}, lambda losses: losses), ({"r": 1.0}, lambda losses: losses.mean())):
        model = tiny_model()
        opt = kalmanopt.create(preset, model.parameters(), **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(loss=loss(backward_losses(opt, model, 0)))


def test_update_with_per_sample_losses_as_the_statistic_names_the_statistic():
    model = tiny_model()
    opt = kalmanopt.create("koala++", model.parameters())
    losses = backward_losses(opt, model, 0)
    opt.predict()
    theta = flat(model)
    with pytest.raises(ValueError, match=r"loss statistic s_k \(one number: 'second_moment'"):
        opt.update(losses.mean(), losses)
    assert torch.equal(flat(model), theta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_are_computed_in_at_least_float32(dtype):
    losses = torch.full((8,), 300.0, dtype=dtype)  # 300² overflows float16
    statistic = kalmanopt.loss_statistic(losses, "second_moment")
    assert statistic.dtype == torch.float32 and statistic.item() == 90000.0
    model = tiny_model(dtype=torch.float32)
    opt = kalmanopt.create("koala++", model.parameters())
    backward_losses(opt, model, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=losses)
    counters = opt.diagnostics()["counters"]
    assert counters["steps"] == 1 and counters["nonfinite_steps"] == 0


# ----------------------------------------------------------------------------- parameters
def test_parameters_on_the_meta_device_are_refused_at_construction():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        kalmanopt.create("koala++", model.parameters())


# ----------------------------------------------------------------------------- checkpoints
def _trained(preset: str, **kwargs):
    model = tiny_model()
    opt = kalmanopt.create(preset, model.parameters(), **kwargs)
    train(opt, model, range(3))
    return model, opt


def _first_layer_key(state: dict) -> tuple:
    index = min(k for k in state if isinstance(k, int))
    return index, sorted(state[index])[0]


def _corruptions(preset: str) -> dict:
    """name → (edit of a saved state dict, the message it must raise)."""

    def set_group(key, value):
        def edit(sd):
            sd["state"]["group0"][key] = value
        return edit

    def drop_group(key):
        def edit(sd):
            del sd["state"]["group0"][key]
        return edit

    def layer(fn):
        def edit(sd):
            index, key = _first_layer_key(sd["state"])
            sd["state"][index][key] = fn(sd["state"][index][key])
        return edit

    def drop_layer(sd):
        index, key = _first_layer_key(sd["state"])
        del sd["state"][index][key]

    cases = {
        "NaN R": (set_group("R", torch.tensor(math.nan, dtype=torch.float64)), "is not finite"),
        "inf R": (set_group("R", torch.tensor(math.inf, dtype=torch.float64)), "is not finite"),
        "R = 0": (set_group("R", torch.tensor(0.0, dtype=torch.float64)), "must be positive"),
        "no R": (drop_group("R"), "lacks ['R']"),
        "R of shape (1,)": (set_group("R", torch.ones(1, dtype=torch.float64)), "has shape (1,)"),
        "R as a string": (set_group("R", "1.0"), "is not a tensor"),
        "unknown group entry": (set_group("momentum", torch.zeros(())), "unexpected entries ['momentum']"),
        "steps as a float tensor": (set_group("steps", torch.tensor(3.0)), "is floating-point"),
        "steps as 2.5": (set_group("steps", 2.5), "must be a whole number"),
    }
    if preset != "koala-v":  # koala-v keeps no per-parameter state
        cases.update({
            "NaN in a layer": (layer(lambda t: torch.full_like(t, math.nan)), "is not finite"),
            "a layer tensor of another shape": (layer(lambda t: torch.zeros(tuple(t.shape) + (1,), dtype=t.dtype)),
                                                "does not fit"),
        })
    if preset not in ("koala-v", "koala-diag"):  # (diag: its one entry missing is a layer not updated yet)
        cases["a layer tensor missing"] = (drop_layer, "lacks")
    return cases


@pytest.mark.parametrize("preset,case", [(p, c) for p in PRESETS for c in _corruptions(p)])
def test_a_corrupt_checkpoint_is_refused_and_changes_nothing(preset, case):
    edit, message = _corruptions(preset)[case]
    model, opt = _trained(preset)
    saved = copy.deepcopy(opt.state_dict())
    edit(saved)
    theta, state = flat(model), _filter_state(opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        opt.load_state_dict(saved)
    assert _same(_filter_state(opt), state) and torch.equal(flat(model), theta)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    train(opt, model, range(3, 4))
    assert bool(torch.isfinite(flat(model)).all())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_zero_dim_state_entry_is_checked_for_its_shape(preset):
    """Each 0-d group tensor given a shape (1,) is refused (the layout knows every 0-d entry)."""
    model, opt = _trained(preset)
    layout = state_layout(opt, opt.param_groups[0])
    zero_dim = [k for k, spec in layout["group"].items() if not isinstance(spec, dict) and spec.shape == ()]
    assert "R" in zero_dim and "steps" in zero_dim
    for key in zero_dim:
        saved = copy.deepcopy(opt.state_dict())
        saved["state"]["group0"][key] = saved["state"]["group0"][key].reshape(1)
        with pytest.raises(ValueError, match=r"has shape \(1,\)"):
            opt.load_state_dict(saved)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_valid_checkpoint_with_global_granularity_round_trips(preset):
    model, opt = _trained(preset, granularity="global")
    fresh_model = copy.deepcopy(model)
    fresh = kalmanopt.create(preset, fresh_model.parameters(), granularity="global")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(opt, model, range(3, 5))
    train(fresh, fresh_model, range(3, 5))
    assert torch.equal(flat(model), flat(fresh_model))


# ----------------------------------------------------------------------------- engine behaviour
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_nan_loss_at_the_first_step_is_identical_to_skipping_that_batch(preset, implementation):
    runs = []
    for nan_first in (True, False):
        model = tiny_model()
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if nan_first:
                losses = backward_losses(opt, model, 99)
                opt.step(loss=torch.full_like(losses, math.nan))
            train(opt, model, range(4))
        runs.append((flat(model), _filter_state(opt)))
    assert torch.equal(runs[0][0], runs[1][0]) and _same(runs[0][1], runs[1][1])


def _counters(opt) -> dict:
    return {path: t.clone() for path, t in state_tensors(opt.state_dict()["state"]) if not t.is_floating_point()}


@pytest.mark.parametrize("api", ["step", "two-phase"])
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_step_without_any_gradient_changes_nothing_and_warns_once(preset, implementation, api):
    model = tiny_model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    train(opt, model, range(2))
    opt.zero_grad()  # backward forgotten
    theta, state, counters = flat(model), _filter_state(opt), _counters(opt)
    with pytest.warns(RuntimeWarning, match="found no gradient") as record:
        for k in range(2):
            losses = tiny_losses(model, k).detach()
            if api == "step":
                opt.step(loss=losses)
            else:
                opt.predict()  # (stands: the step API already predicted; nothing to do)
                assert opt.update(losses.mean(), kalmanopt.loss_statistic(losses, "second_moment")) is False
    assert len([w for w in record if "gradient" in str(w.message)]) == 1
    assert torch.equal(flat(model), theta) and _same(_filter_state(opt), state) and _same(_counters(opt), counters)
    # the run goes on as if those calls never happened
    reference = tiny_model()
    ref_opt = kalmanopt.create(preset, reference.parameters(), implementation=implementation)
    train(ref_opt, reference, range(2))
    train(opt, model, range(2, 4))
    train(ref_opt, reference, range(2, 4))
    assert torch.equal(flat(model), flat(reference))


@pytest.mark.parametrize("preset,implementation", CASES)
def test_update_without_predict_equals_predict_then_update_or_raises(preset, implementation):
    """Where the predict leaves θ alone, update() predicts itself; where it moves θ (KOALA-M), it raises."""
    runs = []
    for explicit in (True, False):
        model = tiny_model()
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
        for k in range(3):
            if explicit:
                opt.predict()
            losses = backward_losses(opt, model, k)
            theta, state = flat(model), _filter_state(opt)
            try:
                opt.update(losses.mean(), kalmanopt.loss_statistic(losses, "second_moment"))
            except RuntimeError as exc:  # raising is allowed, if it says why, and changes nothing
                assert preset == "koala-m" and not explicit and k == 0
                assert "call opt.predict() before the forward and backward pass" in str(exc)
                assert torch.equal(flat(model), theta) and _same(_filter_state(opt), state)
                return
        runs.append(flat(model))
    assert preset != "koala-m"
    assert torch.equal(runs[0], runs[1])


def test_torch_compile_of_step_works_and_equals_the_eager_step():
    """``torch.compile(opt.step)`` runs the step as written (the driver is opaque to dynamo), also while the
    garbage collector runs during compilation: the same parameters as the eager step, bit for bit."""
    import gc

    runs = []
    threshold = gc.get_threshold()
    try:
        gc.set_threshold(5, 1, 1)  # (a weak dictionary changing under dynamo's guards made this flaky)
        for compiled in (False, True):
            torch._dynamo.reset()
            model = tiny_model(dtype=torch.float32)
            opt = kalmanopt.create("koala++", model.parameters())
            step = torch.compile(opt.step, backend="eager") if compiled else opt.step
            for k in range(3):
                for _ in range(3):  # optimizers that stepped and go away: the driver holds them weakly
                    other = torch.nn.Linear(3, 2)
                    dropped = kalmanopt.create("koala++", other.parameters())
                    other(torch.ones(1, 3)).sum().backward()
                    dropped.step(loss=torch.ones(2))
                    del dropped, other
                step(loss=backward_losses(opt, model, k))
            runs.append(flat(model))
    finally:
        gc.set_threshold(*threshold)
    assert torch.equal(runs[0], runs[1])
