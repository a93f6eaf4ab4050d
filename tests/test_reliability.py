"""What the optimizer does with bad input: non-finite steps, the guard, the step-size rule, long runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, PRESETS
from conformance import flat

import kalmanopt
from kalmanopt.covariance.product import GUARD_EPS

PRODUCT_PRESETS = ["koala++", "koala++-ns", "koala++-lr"]


def _model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def _batch(seed: int, dtype: torch.dtype = torch.float64, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _state(opt) -> dict:
    """A deep copy of the optimizer state, without the event counters."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items() if k != "nonfinite_steps"}
        return value
    return copy(opt.state_dict()["state"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


# ----------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("preset,implementation", CASES)
@pytest.mark.parametrize("kind", ["loss", "statistic", "gradient", "inf-gradient"])
def test_non_finite_input_skips_the_step_warns_once_and_counts(preset, implementation, kind):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    for k in range(3):
        x, y = _batch(k)
        losses = _losses(model, x, y)
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    theta, state = flat(model), _state(opt)
    counters = opt.diagnostics()["counters"]
    x, y = _batch(10)
    messages: list[list[str]] = []
    for _ in range(2):
        losses = _losses(model, x, y)
        opt.zero_grad()
        losses.mean().backward()
        losses = losses.detach().clone()
        if kind == "loss":
            losses[3] = math.nan
        elif kind == "statistic":  # finite mean, second moment overflows
            losses[3] = 1e200
        elif kind == "gradient":
            model[0].weight.grad[1, 2] = math.nan
        else:
            model[2].bias.grad[0] = -math.inf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(loss=losses)
            opt.diagnostics()  # a host sync: a device-side implementation reports by here
        messages.append([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    # a warning the first time (one per kind: a NaN sample makes the loss and the statistic non-finite)
    assert 1 <= len(messages[0]) <= 2 and all("skipped" in m for m in messages[0])
    assert messages[1] == []  # once per kind
    assert torch.equal(flat(model), theta)
    assert _same(_state(opt), state)
    after = opt.diagnostics()["counters"]
    assert after["nonfinite_steps"] == counters["nonfinite_steps"] + 2
    assert after["steps"] == counters["steps"]


@pytest.mark.parametrize("implementation", ["reference", "foreach"])
@pytest.mark.parametrize("bad", [None, 0, 1, "loss"])
def test_a_non_finite_gradient_in_any_group_skips_every_group(implementation, bad):
    """Two groups of different dtypes (float32 matrices, float64 vectors): a NaN or an infinite gradient in
    either group, or an infinite loss, skips the step of both groups, warns, and counts it in each group;
    with every input finite both groups take the step."""
    torch.manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 2))]
    vectors = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = kalmanopt.create("koala++", [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}],
                           implementation=implementation, weight_decay=1e-3)
    for k in range(3):
        for p in matrices + vectors:
            p.grad = torch.randn_like(p)
        losses = torch.rand(8) + 0.1
        if k == 2 and bad == 0:
            matrices[1].grad[0, 1] = math.nan
        elif k == 2 and bad == 1:
            vectors[0].grad[2] = -math.inf
        elif k == 2 and bad == "loss":
            losses[1] = math.inf
        before = [p.detach().clone() for p in matrices + vectors]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(loss=losses)
            counts = opt.diagnostics()["counters"]  # (a host read: a deferred report lands by here)
        skipped = k == 2 and bad is not None
        assert [not torch.equal(a, p) for a, p in zip(before, matrices + vectors)] == [not skipped] * 3, k
        assert any("skipped" in str(w.message) for w in caught) == skipped, k
    # (the counters add up over the two groups)
    assert counts["nonfinite_steps"] == (2 if bad is not None else 0)
    assert counts["steps"] == 2 * (2 if bad is not None else 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_skipped_step_leaves_no_trace_in_the_run(preset):
    """A run with a NaN batch in the middle equals the run without that batch, bit for bit."""
    results = []
    for inject in (True, False):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters())
        for k in range(6):
            x, y = _batch(k)
            if k == 3 and not inject:
                continue
            losses = _losses(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            if k == 3:
                losses = torch.full_like(losses, math.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(loss=losses)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("preset", PRESETS)
def test_two_phase_api_skipped_update_leaves_no_trace(preset):
    """predict(); update(NaN) returns False; the next predict() does not predict a second time."""
    results = []
    for inject in (True, False):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters())
        for k in range(6):
            if k == 3 and not inject:
                continue
            opt.predict()
            x, y = _batch(k)
            losses = _losses(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            statistic = kalmanopt.loss_statistic(losses, "second_moment")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                applied = opt.update(losses.mean() if k != 3 else torch.tensor(math.inf), statistic)
            assert applied == (k != 3)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("preset", PRESETS)
def test_strict_raises_non_finite_error_and_changes_nothing(preset):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), strict=True)
    x, y = _batch(0)
    losses = _losses(model, x, y)
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)
    theta, state = flat(model), _state(opt)
    losses = _losses(model, x, y)
    opt.zero_grad()
    losses.mean().backward()
    model[0].bias.grad[0] = math.nan
    with pytest.raises(kalmanopt.NonFiniteError, match="non-finite gradient.*strict=True"):
        opt.step(loss=losses)
    with pytest.raises(kalmanopt.NonFiniteError, match="non-finite loss"):
        opt.update(math.nan, 1.0)
    assert isinstance(kalmanopt.NonFiniteError("x"), FloatingPointError)
    assert torch.equal(flat(model), theta) and _same(_state(opt), state)
    assert opt.diagnostics()["counters"]["nonfinite_steps"] == 0


# ----------------------------------------------------------------------------- the guard
def _quadratic_step(opt, theta, target, scale):
    """One step on L(θ) = ½ scale ‖θ − target‖² (per-sample losses: the same value twice)."""
    loss = 0.5 * scale * (theta - target).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step(loss=loss.detach().expand(2).clone())
    return float(loss.detach())


@pytest.mark.parametrize("preset", PRODUCT_PRESETS)
def test_guard_restarts_a_layer_whose_S_is_not_positive_and_counts_it(preset):
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    target = torch.zeros(3, dtype=torch.float64)
    opt = kalmanopt.create(preset, [theta], r=1.0, q=0.0, track_diagnostics=True)
    _quadratic_step(opt, theta, target, 1.0)
    # corrupt v_{k-1} so that the recursion's S_k is negative: v = −10 H_{k-1}
    opt.state[theta]["v"] = -10.0 * opt.state[theta]["H"]
    before = float(0.5 * theta.detach().pow(2).sum())
    after_loss = _quadratic_step(opt, theta, target, 1.0)
    assert after_loss == pytest.approx(before)
    layer = next(iter(opt.diagnostics()["layers"].values()))
    assert opt.diagnostics()["counters"]["guard_restarts"] == 1
    assert layer["S"] >= 1.0  # a restart gives S_k ≥ R_k
    assert layer["gain_scale"] > 0
    assert float(0.5 * theta.detach().pow(2).sum()) < before  # the step went downhill


@pytest.mark.parametrize("preset", PRODUCT_PRESETS)
def test_guard_off_reproduces_the_raw_recursion(preset):
    """guard=False: the same corrupted state gives S_k < 0 and a step uphill, as the released code."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    target = torch.zeros(3, dtype=torch.float64)
    opt = kalmanopt.create(preset, [theta], r=1.0, q=0.0, guard=False, track_diagnostics=True)
    _quadratic_step(opt, theta, target, 1.0)
    opt.state[theta]["v"] = -10.0 * opt.state[theta]["H"]
    before = float(0.5 * theta.detach().pow(2).sum())
    _quadratic_step(opt, theta, target, 1.0)
    layer = next(iter(opt.diagnostics()["layers"].values()))
    assert opt.diagnostics()["counters"]["guard_restarts"] == 0
    assert layer["S"] < GUARD_EPS
    assert layer["gain_scale"] < 0  # the step size η L / S_k is negative: what the guard prevents
    assert float(0.5 * theta.detach().pow(2).sum()) != pytest.approx(before)


@pytest.mark.parametrize("preset", PRESETS)
def test_guard_does_not_change_healthy_runs(preset):
    runs = []
    for guard in (True, False):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters(), guard=guard)
        for k in range(20):
            x, y = _batch(k)
            losses = _losses(model, x, y)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
        assert opt.diagnostics()["counters"]["guard_restarts"] == 0
        runs.append(flat(model))
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------- the step-size rule
@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_negative_loss_does_not_move_the_weights(preset, implementation):
    """L* = 0 is the target: with the guard, a loss below it gives a zero step, never a negative one."""
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, weight_decay=0.0)
    x, y = _batch(0)
    losses = _losses(model, x, y)
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)
    theta = flat(model)
    losses = _losses(model, x, y)
    opt.zero_grad()
    losses.mean().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(loss=-losses.detach() - 1.0)
    if implementation == "reference":  # the reference path warns (a host sync the fast paths avoid)
        assert any("the loss is negative" in str(w.message) for w in caught)
    moved = flat(model) - theta
    if preset == "koala-m":
        # only the predict of the next step moves θ (by the velocity u, unchanged by the zero step)
        velocities = torch.cat([opt.state[p]["u"] for p in model.parameters()])
        a = opt.param_groups[0]["a"]
        assert torch.allclose(moved, velocities / a, rtol=1e-12, atol=1e-15)
    else:
        assert torch.equal(moved, torch.zeros_like(moved))
    assert opt.diagnostics()["counters"]["steps"] == 2


def test_a_negative_loss_with_guard_off_steps_uphill_as_released():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = kalmanopt.create("koala++", [theta], guard=False, r=1.0)
    loss = 0.5 * theta.pow(2).sum()
    loss.backward()
    opt.step(loss=(-loss.detach()).expand(2).clone())
    assert float(0.5 * theta.detach().pow(2).sum()) > float(loss.detach())


@pytest.mark.parametrize("preset", PRESETS)
def test_gain_scale_is_never_negative(preset):
    """η L_ℓ × gain coefficient ≥ 0 for every layer, over a run whose losses change sign."""
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), track_diagnostics=True, weight_decay=1e-3)
    for k in range(12):
        x, y = _batch(k)
        losses = _losses(model, x, y) - (0.0 if k % 3 else 5.0)
        opt.zero_grad()
        losses.mean().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(loss=losses)
        for name, layer in opt.diagnostics()["layers"].items():
            assert layer["gain_scale"] >= 0.0, (k, name)
            assert layer["S"] > 0.0, (k, name)


@pytest.mark.parametrize("preset,implementation", CASES)
def test_negative_variance_from_rounding_counts_as_zero(preset, implementation):
    """A variance computed as E[ℓ²] − E[ℓ]² may round below 0; R_k never goes below 0 because of it."""
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = kalmanopt.create(preset, [theta], alpha_r=0.0, implementation=implementation)
    opt.predict()
    (0.5 * theta.pow(2).sum()).backward()
    assert opt.update(2.5, -1e-3)
    assert float(opt.state["group0"]["R"]) == torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("preset,implementation", CASES)
def test_zero_losses_forever_keep_R_positive_and_the_weights_finite(preset, implementation):
    """R follows a statistic of 0 down to the floor (smallest normal), never to 0: S_k > 0 stays."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
    noise = {"qw": 0.0, "qv": 0.0} if preset == "koala-m" else {"q": 0.0}
    opt = kalmanopt.create(preset, [theta], alpha_r=0.5, implementation=implementation, **noise)
    for _ in range(200):
        opt.zero_grad()
        theta.grad = torch.tensor([1e-4, 2e-4, -1e-4])
        opt.step(loss=torch.zeros(4))
    assert float(opt.state["group0"]["R"]) == torch.finfo(torch.float32).tiny
    assert bool(torch.isfinite(theta).all())


@pytest.mark.parametrize("preset,implementation", CASES)
def test_a_layer_whose_squared_gradient_overflows_is_skipped_and_counted(preset, implementation):
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    opt = kalmanopt.create(preset, [a, b], implementation=implementation)
    a.grad = torch.tensor([3e19, -3e19])  # finite; ‖g‖² overflows float32
    b.grad = torch.tensor([0.1, 0.2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(loss=torch.tensor([1.0, 1.0]))
    if implementation == "reference":
        assert any("overflows" in str(w.message) for w in caught)
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    assert opt.diagnostics()["counters"]["skipped_layers"] >= 1
    if preset != "koala-m":
        assert torch.equal(a.detach(), torch.tensor([1.0, 2.0]))
        assert not torch.equal(b.detach(), torch.tensor([0.5, -0.5]))


# ----------------------------------------------------------------------------- long runs
def _ill_conditioned_problem(n: int = 20, condition: float = 1e4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    A = (q * eigenvalues) @ q.T
    return A.float(), torch.randn(n, generator=g).float()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_thousands_of_steps_on_an_ill_conditioned_problem_stay_finite(preset):
    """2000 noisy steps on ½ (θ − θ*)ᵀ A (θ − θ*) with cond(A) = 1e4 in float32: finite throughout."""
    A, theta_star = _ill_conditioned_problem()
    theta = torch.nn.Parameter(torch.zeros_like(theta_star))
    opt = kalmanopt.create(preset, [theta])
    g = torch.Generator().manual_seed(1)
    first = None
    for k in range(2000):
        noise = 0.1 * torch.randn(8, 20, generator=g)
        # per-sample losses ℓ_i = ½ (d + ε_i)ᵀ A (d + ε_i), d = θ − θ*;  ∇ mean_i ℓ_i = A (d + mean_i ε_i)
        shifted = theta.detach() - theta_star + noise
        losses = 0.5 * ((shifted @ A) * shifted).sum(dim=1)
        theta.grad = A @ shifted.mean(dim=0)
        opt.step(loss=losses)
        if k == 0:
            first = float(losses.mean().detach())
    assert bool(torch.isfinite(theta).all())
    final = float((0.5 * (theta - theta_star) @ A @ (theta - theta_star)).detach())
    counters = opt.diagnostics()["counters"]
    assert counters["steps"] == 2000 and counters["nonfinite_steps"] == 0
    assert final < first


# ----------------------------------------------------------------------------- the floors
@pytest.mark.parametrize("implementation", [i for p, i in CASES if p == "koala-m"])
@pytest.mark.parametrize("sw,sv", [(10.0, 10.0), (10.0, 0.7), (10.0, 0.1), (0.3, 0.7)])
def test_koala_m_with_a_singular_P0_keeps_a_covariance_at_the_R_floor(implementation, sw, sv):
    """sc = −√(sw·sv) (P_0 singular, allowed) on zero-initialised weights with qw = qv = 0 and zero losses:
    P̂₀₀ = (√sw − √sv)² rounds to ±0 and R falls to its floor. The released posterior P − (‖H‖²/S) P e eᵀ P
    then gave ∞ · 0 = NaN, or a P₀₀ rounded below 0 and S < 0 (a negative step size); found by a probe."""
    theta = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = kalmanopt.create("koala-m", [theta], sw=sw, sv=sv, sc=-math.sqrt(sw * sv), qw=0.0, qv=0.0, r=None,
                           alpha_r=0.0, lr=1.0, implementation=implementation, track_diagnostics=True)
    for k in range(6):
        theta.grad = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64) * 10.0 ** (3 * k % 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(loss=torch.full((3,), float(k % 2), dtype=torch.float64))
        P = opt.state["group0"]["P"]
        assert bool(torch.isfinite(theta).all()) and bool(torch.isfinite(P).all()), k
        # (the predict's F P Fᵀ of a singular P is singular to rounding; the update reads it as a covariance)
        assert P[0, 0] >= 0 and P[1, 1] >= 0 and P[1, 0] ** 2 <= P[0, 0] * P[1, 1] * (1 + 1e-12), (k, P)
        for layer in opt.diagnostics()["layers"].values():
            assert layer["S"] > 0 and layer["gain_scale"] >= 0, (k, layer)


@pytest.mark.parametrize("preset,implementation", [(p, i) for p, i in CASES if p in ("koala-v", "koala-diag")])
def test_a_step_that_overflows_leaves_the_layer_where_it_is_and_warns(preset, implementation):
    """H = g + wd θ = 0 with g ≠ 0 (g = −wd θ) and R = 1e-30: S = R and η L K overflows float32; the layer does
    not move (rather than taking ∞ or ∞ · 0 = NaN), the step counts, and a warning says so once."""
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = kalmanopt.create(preset, [theta], weight_decay=0.5, r=1e-30, implementation=implementation)
    for _ in range(2):
        theta.grad = -0.5 * theta.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(loss=torch.full((2,), 1e10))
        messages = [str(w.message) for w in caught if "overflows the state precision" in str(w.message)]
        assert len(messages) == (1 if _ == 0 else 0)
    assert torch.equal(theta.detach(), torch.tensor([1.0, 2.0]))
    assert opt.diagnostics()["counters"]["steps"] == 2


@pytest.mark.parametrize("preset,implementation", [(p, i) for p, i in CASES if p != "koala++-lr"])
def test_weights_near_the_top_of_float32_keep_the_filter_state_finite(preset, implementation):
    """Weights of 1e19 to 1e30 in float32 are finite input: ‖w̄ − θ‖² overflows (KOALA-M's q_w kept its value
    rather than going to ∞, and P̂ and the posterior to ∞ and NaN; found by a probe), ‖θ‖² with weight decay
    overflows (the layer is skipped). Parameters and filter state stay finite."""
    for scale, wd in ((1e19, 0.0), (1e30, 0.1)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8) * scale), torch.nn.Parameter(torch.randn(3))]
        opt = kalmanopt.create(preset, params, implementation=implementation, weight_decay=wd, lr=1.0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(loss=torch.rand(4))
        assert all(bool(torch.isfinite(p).all()) for p in params)
        assert all(bool(torch.isfinite(t).all()) for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point())


# ----------------------------------------------------------------------------- the guarantees' tests exist
def test_every_test_the_guarantees_name_exists():
    """docs/reliability.md's last section names a test per guarantee: every `file.py::test_name` (and `::test_name`,
    which continues the last file named in the same cell) is a test function defined in that file."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = text[text.index("Each guarantee and the test that holds it"):]
    named = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| guarantee"):
            continue
        cell = line.rstrip(" |").rsplit(" | ", 1)[-1]
        current = None
        for file, name in re.findall(r"`(?:tests/)?([\w]+\.py)?::(\w+)`", cell):
            current = file or current
            assert current is not None, f"'::{name}' names no file: {line}"
            named.append((current, name))
        for file in re.findall(r"`(?:tests/)?(\w+\.py)`", cell):
            assert (root / "tests" / file).is_file(), file
    assert len(named) >= 40
    missing = [f"{file}::{name}" for file, name in named
               if not re.search(rf"^def {name}\(", (root / "tests" / file).read_text(encoding="utf-8"), re.M)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
