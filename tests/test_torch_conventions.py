"""torch.optim conventions a torch user relies on (issue: pass PyTorch's generic optimizer tests).

Each test here pins one convention directly, for every preset and every engine usable on the
CPU; ``tests/test_torch_generic.py`` runs torch's own generic tests on top.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import warnings

import pytest
import torch
from cases import CASES, PRESETS
from conformance import flat
from tiny_problem import tiny_losses, tiny_model, train

import kalmanopt
from kalmanopt.options import GROUP_OPTIONS, OPTIONS, implementation_from_torch_flags

#: the engine rewrite fixes these; the tests flip to passing then (strict xfail)
PRODUCT_PRESETS = ("koala++", "koala++-ns", "koala++-lr")

#: the shared small model, in float32 unless a test asks for another dtype
_model = functools.partial(tiny_model, dtype=torch.float32)


# ----------------------------------------------------------------------------- 1. load-state-dict hooks
@pytest.mark.parametrize("preset,implementation", CASES)
def test_load_state_dict_runs_torch_pre_and_post_hooks_in_order(preset, implementation):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    train(opt, model, range(2))
    saved = opt.state_dict()
    calls = []

    def pre_edit(optimizer, state_dict):
        calls.append("pre-edit")
        state_dict["param_groups"][0]["lr"] = 0.5  # edits in place (on torch's shallow copy)

    def pre_replace(optimizer, state_dict):
        calls.append("pre-replace")
        replaced = copy.deepcopy(state_dict)
        replaced["param_groups"][0]["lr"] = 0.25
        return replaced

    def post(optimizer):
        calls.append(("post", optimizer.param_groups[0]["lr"]))

    opt.register_load_state_dict_pre_hook(pre_edit)
    opt.register_load_state_dict_pre_hook(pre_replace)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(saved)
    assert calls == ["pre-edit", "pre-replace", ("post", 0.25)]
    assert opt.param_groups[0]["lr"] == 0.25
    train(opt, model, range(2, 3))


def test_a_refused_state_runs_no_post_hook():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    ran = []
    opt.register_load_state_dict_post_hook(lambda optimizer: ran.append(True))
    with pytest.raises(ValueError):
        opt.load_state_dict({"state": {}, "param_groups": []})
    assert ran == []


# ----------------------------------------------------------------------------- 2. deepcopy and pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_copied_optimizer_steps_identically_to_the_original(preset, implementation, how):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, strict=True,
                           track_diagnostics=True, loss_statistic="variance", r=None)
    train(opt, model, range(2))
    bundle = {"model": model, "opt": opt}
    if how == "deepcopy":
        copied = copy.deepcopy(bundle)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(bundle))
    else:
        buffer = io.BytesIO()
        torch.save(bundle, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    model_c, opt_c = copied["model"], copied["opt"]
    for name in ("filter", "specs", "strict", "loss_statistic", "track_diagnostics"):
        assert repr(getattr(opt_c, name)) == repr(getattr(opt, name)), name
    assert {k for k in opt.__dict__ if not k.startswith("_")} == {k for k in opt_c.__dict__ if not k.startswith("_")}
    assert all(p in opt_c.state or not opt.state[q] for p, q in zip(model_c.parameters(), model.parameters()))
    train(opt, model, range(2, 5))
    train(opt_c, model_c, range(2, 5))
    assert torch.equal(flat(model), flat(model_c))
    assert opt.diagnostics() == opt_c.diagnostics()


# ----------------------------------------------------------------------------- 3. a tensor lr
@pytest.mark.parametrize("preset", PRESETS)
def test_a_one_element_tensor_lr_steps_as_the_float(preset):
    runs = []
    for lr in (0.5, torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters(), lr=lr)
        assert opt.param_groups[0]["lr"] == 0.5 and isinstance(opt.param_groups[0]["lr"], float)
        train(opt, model, range(3))
        runs.append(flat(model))
    assert all(torch.equal(runs[0], run) for run in runs[1:])


@pytest.mark.parametrize("lr,match", [(torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
                                      (torch.tensor([0.1j]), "Tensor lr must be real"),
                                      (torch.tensor(float("nan")), "'lr' = nan is out of range"),
                                      (torch.tensor(-1.0), "'lr' = -1.0 is out of range")])
def test_a_bad_tensor_lr_is_a_value_error(lr, match):
    with pytest.raises(ValueError, match=match):
        kalmanopt.create("koala++", _model().parameters(), lr=lr)


def test_a_tensor_is_accepted_for_lr_only():
    with pytest.raises(TypeError, match="'sigma' must be a number"):
        kalmanopt.create("koala++", _model().parameters(), sigma=torch.tensor(0.1))


# ----------------------------------------------------------------------------- 4. param_names
@pytest.mark.parametrize("named_saved,named_loaded", [(False, True), (True, False), (True, True)])
def test_param_names_survive_loading_as_in_torch(named_saved, named_loaded):
    model = _model()
    source = model.named_parameters() if named_saved else model.parameters()
    opt = kalmanopt.create("koala++", source)
    train(opt, model, range(2))
    saved = copy.deepcopy(opt.state_dict())
    target = model.named_parameters() if named_loaded else model.parameters()
    opt2 = kalmanopt.create("koala++", target)
    opt2.load_state_dict(saved)
    train(opt2, model, range(2, 3))
    assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_param_names_of_the_wrong_length_are_refused():
    model = _model()
    opt = kalmanopt.create("koala++", model.named_parameters())
    saved = opt.state_dict()
    saved["param_groups"][0]["param_names"] = ["a"]
    with pytest.raises(ValueError, match="'param_names' must be a list of 4 strings"):
        opt.load_state_dict(saved)


# ----------------------------------------------------------------------------- 5. state precision
def _state_dtype_is_independent_of_the_engine_xfail(preset: str, implementation: str) -> list:
    return []  # (every engine keeps state in promote(dtype, float32) since the contract engines)


@pytest.mark.parametrize("preset,implementation", [
    pytest.param(p, i, marks=_state_dtype_is_independent_of_the_engine_xfail(p, i)) for p, i in CASES])
def test_filter_state_is_kept_in_the_parameter_precision_at_least_float32(preset, implementation):
    """A group of float64, float32, float16 and bfloat16 parameters: each one's state in promote(dtype, float32)."""
    torch.manual_seed(0)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    params = [torch.nn.Parameter(torch.randn(2, 3).to(dtype)) for dtype in dtypes]
    opt = kalmanopt.create(preset, params, implementation=implementation)
    for k in range(2):
        for p in params:
            p.grad = torch.randn(2, 3).to(p.dtype)
        opt.step(loss=torch.rand(6) + k)
    for p in params:
        wanted = torch.promote_types(p.dtype, torch.float32)
        for key, value in opt.state[p].items():
            if value.is_floating_point():
                assert value.dtype == wanted, (p.dtype, key, value.dtype)


# ----------------------------------------------------------------------------- 6. no empty state entries
@pytest.mark.parametrize("preset,implementation", [
    pytest.param(p, i) for p, i in CASES])
def test_no_empty_per_parameter_state_entries(preset, implementation):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    train(opt, model, range(2))
    assert all(len(entry) > 0 for entry in opt.state.values())


# ----------------------------------------------------------------------------- 7. older state dicts
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_state_dict_without_options_and_with_int_counters_loads_and_steps(preset, implementation):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, granularity="layer")
    train(opt, model, range(2))
    reference = copy.deepcopy({"model": model, "opt": opt})
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for name in GROUP_OPTIONS:
            group.pop(name)
    group_state = old["state"]["group0"]
    for name in ("steps", "nonfinite_steps", "skipped_layers", "guard_restarts"):
        group_state[name] = int(group_state[name])
    group_state["predicted"] = bool(group_state["predicted"])
    del group_state["rows_dropped"]  # a counter added after the checkpoint was written starts at 0
    opt.load_state_dict(old)
    assert {name: opt.param_groups[0][name] for name in GROUP_OPTIONS} == \
        {name: reference["opt"].param_groups[0][name] for name in GROUP_OPTIONS}
    assert opt.state["group0"]["steps"].dtype == torch.int64
    train(opt, model, range(2, 4))
    train(reference["opt"], reference["model"], range(2, 4))
    assert torch.equal(flat(model), flat(reference["model"]))
    assert opt.diagnostics()["counters"]["steps"] == 4


# ----------------------------------------------------------------------------- 8. a closure returning a number
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_closure_returning_a_python_number_is_a_scalar_loss(preset, implementation):
    runs = []
    for as_number in (True, False):
        model = _model(dtype=torch.float64)
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, r=1.0)

        def closure(model=model, opt=opt, as_number=as_number):
            opt.zero_grad()
            loss = tiny_losses(model, 0).mean()
            loss.backward()
            return loss.item() if as_number else loss

        result = opt.step(closure)
        assert isinstance(result, float) == as_number
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])


def test_a_closure_returning_an_integer_tensor_is_refused():
    opt = kalmanopt.create("koala++", _model().parameters())
    with pytest.raises(TypeError, match="floating-point tensor"):
        opt.step(lambda: torch.tensor([1]))


# ----------------------------------------------------------------------------- 9. foreach= / fused=
@pytest.mark.parametrize("kwargs,implementation", [
    ({"foreach": True}, "foreach"), ({"foreach": False}, "reference"), ({"fused": True}, "fused"),
    ({"foreach": False, "fused": True}, "fused"), ({"fused": False}, None), ({"foreach": None}, None),
    ({"foreach": True, "implementation": "foreach"}, "foreach"), ({}, None)])
def test_torch_flags_are_aliases_of_implementation(kwargs, implementation):
    kwargs = dict(kwargs)
    assert implementation_from_torch_flags(kwargs.pop("implementation", None), kwargs.get("foreach"),
                                           kwargs.get("fused")) == implementation


@pytest.mark.parametrize("flag,implementation", [("foreach", "foreach"), ("foreach", "reference")])
def test_create_takes_the_foreach_flag(flag, implementation):
    opt = kalmanopt.create("koala++", _model().parameters(), foreach=implementation == "foreach")
    assert opt.param_groups[0]["implementation"] == implementation
    assert "foreach" not in opt.param_groups[0] and "fused" not in opt.param_groups[0]


def test_a_group_may_carry_torch_flags_too():
    model = _model()
    params = list(model.parameters())
    opt = kalmanopt.create("koala++", [{"params": params[:2], "foreach": False}, {"params": params[2:]}],
                           foreach=True)
    assert [g["implementation"] for g in opt.param_groups] == ["reference", "foreach"]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"foreach": True, "fused": True}, ValueError, "foreach=True and fused=True"),
    ({"foreach": True, "implementation": "reference"}, ValueError, "implementation='reference' was given too"),
    ({"fused": True, "implementation": "foreach"}, ValueError, "asks for implementation='fused'"),
    ({"foreach": "yes"}, TypeError, "foreach must be True or False"),
    ({"fused": 1}, TypeError, "fused must be True or False")])
def test_conflicting_or_non_boolean_torch_flags_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        kalmanopt.create("koala++", _model().parameters(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of the CUDA-only engine")
def test_fused_true_on_the_cpu_says_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (Triton's interpreter would run it on the CPU)
    with pytest.raises(ValueError, match="implementation 'fused' cannot run"):
        kalmanopt.create("koala++", _model().parameters(), fused=True)


# ----------------------------------------------------------------------------- the options table
def test_the_options_table_lists_every_option_create_accepts():
    keywords = kalmanopt.preset_keywords("koala++")
    for name, option in OPTIONS.items():
        assert keywords[name] == option.default
        assert option.doc and option.scope in ("group", "optimizer")
        opt = kalmanopt.create("koala++", _model().parameters(), **{name: option.default})
        where = opt.param_groups[0] if option.scope == "group" else opt.__dict__
        assert where[name] == option.default


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.type is str])
def test_an_unknown_choice_is_refused_with_the_valid_ones(name):
    with pytest.raises(ValueError, match=f"unknown {name} 'nonsense'; valid choices: ") as info:
        kalmanopt.create("koala++", _model().parameters(), **{name: "nonsense"})
    assert all(str(choice) in str(info.value) for choice in OPTIONS[name].choices)


@pytest.mark.parametrize("value", ["false", "True", 0, 1, None, 1.0])
@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.type is bool])
def test_a_boolean_option_takes_only_a_boolean(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        kalmanopt.create("koala++", _model().parameters(), **{name: value})


def test_a_numpy_bool_is_a_boolean():
    np = pytest.importorskip("numpy")
    opt = kalmanopt.create("koala++", _model().parameters(), strict=np.bool_(True), guard=np.bool_(False))
    assert opt.strict is True and opt.param_groups[0]["guard"] is False


def test_the_optimizer_module_keeps_its_group_option_defaults():
    from kalmanopt.optimizer import OPTIONS as GROUP_DEFAULTS

    assert GROUP_DEFAULTS == {name: option.default for name, option in GROUP_OPTIONS.items()}


def test_no_warning_from_a_plain_construction():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kalmanopt.create("koala++", _model().parameters(), foreach=False)


# ----------------------------------------------------------------------------- GradScaler
def _scaled_run(preset: str, implementation: str, *, scaler: bool, overflow_at: int | None = None):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaler else None
    for k in range(4):
        losses = tiny_losses(model, k)
        opt.zero_grad()
        if amp is None:
            losses.mean().backward()
            opt.step(loss=losses.detach())
            continue
        amp.scale(losses.mean()).backward()
        if k == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the scaler's own skip is not warned about
            amp.step(opt, loss=losses.detach())
        amp.update()
    return model, opt, amp


@pytest.mark.parametrize("preset,implementation", CASES)
def test_grad_scaler_steps_equal_unscaled_steps(preset, implementation):
    """GradScaler hands the scale to the step (``_step_supports_amp_scaling``): the gradients are unscaled
    by a power of two, so the run equals the unscaled one exactly."""
    plain, _, _ = _scaled_run(preset, implementation, scaler=False)
    scaled, opt, _ = _scaled_run(preset, implementation, scaler=True)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert opt.diagnostics()["counters"]["nonfinite_steps"] == 0


@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_grad_scaler_overflow_skips_the_step_and_changes_nothing(preset, implementation):
    model, opt, amp = _scaled_run(preset, implementation, scaler=True, overflow_at=3)
    # three steps, then one that changed nothing: the same as a run stopped after three
    stopped = _model()
    stopped_opt = kalmanopt.create(preset, stopped.parameters(), implementation=implementation)
    stopped_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for k in range(3):
        losses = tiny_losses(stopped, k)
        stopped_opt.zero_grad()
        stopped_amp.scale(losses.mean()).backward()
        stopped_amp.step(stopped_opt, loss=losses.detach())
        stopped_amp.update()
    for p, q in zip(stopped.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    counters = opt.diagnostics()["counters"]
    # skipped on the device, as the scaler would skip it: not counted as non-finite input
    assert counters["nonfinite_steps"] == 0 and counters["steps"] == 3
    assert amp.get_scale() == 2.0 ** 11  # the scaler backed off


@pytest.mark.parametrize("preset,implementation", CASES)
def test_found_inf_set_by_hand_skips_the_step(preset, implementation):
    """torch's form of the protocol (``test_fused_does_not_step_if_foundinf``), on every engine."""
    for grad_scale in (None, torch.ones(())):
        params = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)]
        opt = kalmanopt.create(preset, params, implementation=implementation)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.grad_scale, opt.found_inf = grad_scale, torch.ones(())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(loss=torch.ones(4))
        assert all(float(p.detach()) == 1.0 for p in params)
        counters = opt.diagnostics()["counters"]
        assert counters["steps"] == 0 and counters["nonfinite_steps"] == 0


def test_a_scaler_skip_under_strict_skips_without_raising():
    """``strict=True`` raises on non-finite input; a loss scaler's overflow is the scaler's business."""
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = kalmanopt.create("koala++", params, strict=True)
    params[0].grad = torch.ones(2)
    opt.grad_scale, opt.found_inf = None, torch.ones(())
    opt.step(loss=torch.ones(4))
    assert torch.equal(params[0].detach(), torch.ones(2))


def test_unscale_then_clip_then_scaler_step_equals_the_plain_clipped_step():
    """``scaler.unscale_(opt)`` first (to clip): the step gets ``grad_scale=None`` and does not unscale again."""
    def run(scaled: bool) -> torch.nn.Module:
        model = _model()
        opt = kalmanopt.create("koala++", model.parameters())
        amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        for k in range(3):
            losses = tiny_losses(model, k)
            opt.zero_grad()
            if scaled:
                amp.scale(losses.mean()).backward()
                amp.unscale_(opt)
            else:
                losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            if scaled:
                amp.step(opt, loss=losses.detach())
                amp.update()
            else:
                opt.step(loss=losses.detach())
        return model

    for p, q in zip(run(False).parameters(), run(True).parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_fp16_gradients_are_unscaled_in_float32():
    """1 / 2¹⁶ is subnormal in fp16: the gradients are unscaled by a float32 factor, rounded once."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64).half())
    opt = kalmanopt.create("koala++", [p])
    scaled = (torch.rand(64) * 3.0).half()
    p.grad = scaled.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0 ** 16), torch.zeros(())
    opt.step(loss=torch.ones(4))
    assert torch.equal(p.grad, (scaled.float() * 2.0 ** -16).half())
