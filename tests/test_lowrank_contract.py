"""The low-rank surrogate (koala++-lr) on the two-pass contract.

- whole runs equal the per-layer implementation it replaced (float64 goldens, 1e-10), on every engine;
- one step from any state equals that implementation's per-layer algorithm (an oracle kept here):
  rows kept and dropped, the guard's restart, the carried products;
- the batched coefficients of many layers equal each layer's alone (the row selection is per layer);
- the coefficients read nothing on the host (they run on the meta device);
- the Jacobi eigenvalues equal LAPACK's; memory 1 equals koala++ on every engine;
- an estimator without the batched methods is named by the contract check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.contract import CoefficientStage
from kalmanopt.covariance.base import LeastSquaresEstimator, UpdateContext
from kalmanopt.covariance.least_squares import SymmetricLeastSquares, VanillaLeastSquares
from kalmanopt.covariance.lowrank import CONDITION_RTOL, LowRankSurrogate, symmetric_eigen
from kalmanopt.covariance.product import GUARD_EPS
from kalmanopt.program import Reduction, Vec, reduce_layer

DT = torch.float64
GOLDEN = Path(__file__).parent / "goldens" / "lowrank" / "previous_implementation.json"
ESTIMATORS = {"symmetric": SymmetricLeastSquares(), "vanilla": VanillaLeastSquares()}
IMPLEMENTATIONS = ["reference", "foreach",
                   pytest.param("fused", marks=pytest.mark.gpu)]


# ----------------------------------------------------------------------------- whole runs: the previous implementation
def _golden_run(case: dict, implementation: str,
                device: str) -> tuple[dict[str, torch.Tensor], kalmanopt.KalmanOptimizer, torch.nn.Module]:
    sizes = case["sizes"]
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], dtype=DT))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    torch.nn.utils.vector_to_parameters(torch.tensor(case["initial"], dtype=DT), model.parameters())
    model = model.to(device)
    if case["compose"]:
        opt = kalmanopt.KalmanOptimizer(model.parameters(), kalmanopt.compose(**case["compose"]),
                                        implementation=implementation, **case["keywords"])
    else:
        opt = kalmanopt.create("koala++-lr", model.parameters(), implementation=implementation, **case["keywords"])
    snapshots = {}
    for k, (x, y) in enumerate(zip(case["inputs"], case["targets"]), 1):
        losses = F.cross_entropy(model(torch.tensor(x, dtype=DT, device=device)),
                                 torch.tensor(y, device=device), reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
        if str(k) in case["parameters"]:
            snapshots[str(k)] = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu()
    return snapshots, opt, model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_whole_runs_equal_the_previous_per_layer_implementation(implementation):
    device = "cuda" if implementation == "fused" else "cpu"
    cases = json.loads(GOLDEN.read_text())
    assert {c["name"] for c in cases} >= {"m2-vanilla-restarts", "m3-symmetric-restarts", "m4-symmetric-q0"}
    for case in cases:
        snapshots, opt, model = _golden_run(case, implementation, device)
        for step, want in case["parameters"].items():
            want = torch.tensor(want, dtype=DT)
            error = float((snapshots[step] - want).abs().max() / want.abs().max())
            assert error <= 1e-10, (case["name"], step, error)
        counters = {k: int(v) for k, v in opt.diagnostics()["counters"].items()}
        assert counters == case["counters"], case["name"]
        assert [int(opt.state[p]["rows_kept"]) for p in model.parameters()] == case["rows_kept"], case["name"]


@pytest.mark.parametrize("implementation", ["reference", "foreach"])
def test_memory_one_equals_koala_pp_on_every_engine(implementation):
    sizes = [5, 4, 3]
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 5, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(8)]
    flats = {}
    for preset, extra in (("koala++", {}), ("koala++-lr", {"memory": 1})):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1], dtype=DT), torch.nn.Tanh(),
                                    torch.nn.Linear(sizes[1], sizes[2], dtype=DT))
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, weight_decay=5e-4, **extra)
        for x, y in batches:
            losses = F.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)
        flats[preset] = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    error = float((flats["koala++-lr"] - flats["koala++"]).abs().max() / flats["koala++"].abs().max())
    assert error <= 1e-12


# ----------------------------------------------------------------------------- one step: the per-layer oracle
def _oracle(estimator: LeastSquaresEstimator, memory: int, A: torch.Tensor | None, W: torch.Tensor | None,
            H: torch.Tensor, S_prev: float, R: float, q: float, sigma: float) -> dict:
    """One step of the per-layer implementation this contract replaced (eigvalsh, an m × m inverse, a loop).

    ``A``, ``W``: [H_{k-1}; the kept older rows] and their products; None on a first update.
    """
    tol = float(torch.finfo(H.dtype).eps) ** 0.5
    R_t = torch.tensor(R, dtype=H.dtype)

    def step(A, W, S_prev):
        dropped = 0
        while True:
            gram = A @ A.T
            eig = torch.linalg.eigvalsh(gram)
            if A.shape[0] == 1 or (bool(eig[0] > CONDITION_RTOL * eig[-1]) and estimator.admits(A, W, tol)):
                break
            A, W, dropped = A[:-1], W[:-1], dropped + 1
        a, b = estimator.coefficients(A, W, H, torch.linalg.inv(gram))
        u = W[0] + q * A[0]
        lam = torch.dot(H, u) / S_prev
        v = a @ W + b @ A + q * H - lam * u
        S = torch.dot(v + q * H, H) + R_t
        return v, S, A, W, dropped

    def stand_in():
        return H[None], sigma * H[None], float(torch.dot(sigma * H + q * H, H) + R_t)

    first = A is None
    if first:
        A, W, S_prev = stand_in()
    v, S, A2, W2, dropped = step(A, W, S_prev)
    restart = not bool(torch.isfinite(S)) or bool(S <= GUARD_EPS * R)
    if restart:
        first = True
        A, W, S_prev = stand_in()
        v, S, A2, W2, _ = step(A, W, S_prev)
        if not bool(torch.isfinite(S)) or bool(S <= GUARD_EPS * R):
            return {"skip": True, "dropped": dropped, "restart": True}
    u = W2[0] + q * A2[0]
    W2 = W2 + q * A2 - torch.outer(A2 @ u, u) / S_prev
    keep = 0 if first else min(memory - 1, A2.shape[0])
    return {"skip": False, "dropped": dropped, "restart": restart, "v": v, "S": S, "rows": A2[:keep],
            "products": W2[:keep]}


def _random_state(draw_seed: int, memory: int, n: int, kept: int, kind: str) -> tuple:
    """Rows A = [H_{k-1}; older], products W, H_k: consistent with an SPD P, degenerate, or inconsistent."""
    gen = torch.Generator().manual_seed(draw_seed)
    A = torch.randn(kept + 1, n, generator=gen, dtype=DT)
    M = torch.randn(n, n, generator=gen, dtype=DT)
    P = M @ M.T / n + 0.1 * torch.eye(n, dtype=DT)
    W = A @ P
    if kind == "degenerate" and kept:
        A[-1] = A[0] + 1e-5 * A[-1]   # the oldest row nearly repeats H_{k-1}: ill-conditioned, dropped
        W[-1] = A[-1] @ P
    elif kind == "inconsistent":
        W = torch.randn(kept + 1, n, generator=gen, dtype=DT)  # no SPD P; S_k may come out ≤ 0
    H = torch.randn(n, generator=gen, dtype=DT)
    return A, W, H


def _layer_state(A: torch.Tensor, W: torch.Tensor, S_prev: float, memory: int) -> dict:
    state = {"v": W[0].clone(), "H": A[0].clone(), "S": torch.tensor(S_prev, dtype=DT),
             "rows_kept": torch.tensor(float(A.shape[0] - 1), dtype=DT)}
    for j in range(1, memory):
        state[f"row{j}"] = A[j].clone() if j < A.shape[0] else A.new_zeros(A.shape[1])
        state[f"prod{j}"] = W[j].clone() if j < A.shape[0] else A.new_zeros(A.shape[1])
    return state


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), memory=st.integers(1, 4), extra=st.integers(0, 4),
       kind=st.sampled_from(["consistent", "degenerate", "inconsistent", "first"]),
       estimator=st.sampled_from(sorted(ESTIMATORS)), q=st.sampled_from([0.0, 0.01, 0.1, 1.0]),
       R=st.sampled_from([1e-3, 0.1, 1.0]), S_prev=st.sampled_from([0.05, 1.0, 10.0]), data=st.data())
def test_one_step_equals_the_per_layer_oracle(seed, memory, extra, kind, estimator, q, R, S_prev, data):
    n = memory + 1 + extra
    kept = data.draw(st.integers(0, memory - 1), label="kept")
    A, W, H = _random_state(seed, memory, n, kept, kind)
    surrogate = LowRankSurrogate(ESTIMATORS[estimator], memory=memory)
    first = kind == "first"
    want = _oracle(surrogate.estimator, memory, None if first else A, None if first else W, H, S_prev, R, q, 0.1)
    state = {} if first else _layer_state(A, W, S_prev, memory)
    before = {k: v.clone() for k, v in state.items()}
    ctx = UpdateContext(group_state={}, F=torch.ones((1, 1), dtype=DT), Q=torch.full((1,), q, dtype=DT))
    gain = surrogate.gain(ctx, state, H, H, torch.tensor(R, dtype=DT), {"sigma": 0.1})
    assert ctx.counters.get("rows_dropped", 0) == want["dropped"]
    assert ctx.counters.get("guard_restarts", 0) == int(want["restart"])
    if want["skip"]:
        assert ctx.counters.get("skipped_layers", 0) == 1
        assert float(gain.coefficients.abs().max()) == 0.0
        for k, v in before.items():
            assert torch.equal(state[k], v), k
        return
    # v_k, S_k, the kept rows and their products carried to P_{k-1}
    scale = float(max(W.abs().max(), A.abs().max(), H.abs().max()))
    tol = 1e-9 * scale * (1.0 + float(want["v"].abs().max()) / scale)
    assert float((state["v"] - want["v"]).abs().max()) <= tol
    assert abs(float(state["S"]) - float(want["S"])) <= 1e-9 * max(1.0, abs(float(want["S"])), float(H @ H))
    rows, products = surrogate.older_rows(state)
    assert rows.shape == want["rows"].shape and torch.equal(rows, want["rows"])
    if products.numel():
        assert float((products - want["products"]).abs().max()) <= tol * (1 + float(want["products"].abs().max()))
    # the unused slots are zero, H_{k-1} is H_k, and the gain is (v_k + Q H_k) / S_k
    for j in range(int(state["rows_kept"]) + 1, memory):
        assert float(state[f"row{j}"].abs().max()) == 0.0 and float(state[f"prod{j}"].abs().max()) == 0.0
    assert torch.equal(state["H"], H)
    torch.testing.assert_close(gain.direction * gain.coefficients[0], (want["v"] + q * H) / want["S"],
                               rtol=1e-7, atol=1e-9 * float(((want["v"] + q * H) / want["S"]).abs().max()))


# ----------------------------------------------------------------------------- batched = per layer
def _batch(surrogate: LowRankSurrogate, states: list[dict], Hs: list[torch.Tensor], R: float, q: float,
           diagnostics: bool) -> CoefficientStage:
    reductions = (Reduction("hh", Vec("H") * Vec("H")),) + surrogate.reductions({}, diagnostics)
    table = surrogate.state_table()
    rows = []
    for state, H in zip(states, Hs):
        env = {"H": H}
        env.update({f"state.{e.name}": state[e.name] for e in table.vectors})
        rows.append(torch.stack(reduce_layer(reductions, env, {}, H.new_zeros(()))))
    sums = torch.stack(rows)
    n = len(states)
    like = torch.zeros((), dtype=DT)
    b = CoefficientStage(hp={"sigma": 0.1, "q": q}, red={r.name: sums[:, i] for i, r in enumerate(reductions)},
                         layer={e.name: torch.stack([s[e.name] for s in states]) for e in table.scalars}, group={},
                         numel=torch.tensor([H.numel() for H in Hs]), loss=like, statistic=None,
                         ok=torch.ones((), dtype=torch.bool), skip=torch.zeros(n, dtype=torch.bool),
                         diagnostics=diagnostics)
    b.R = torch.tensor(R, dtype=DT)
    return b


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), memory=st.integers(1, 4), q=st.sampled_from([0.0, 0.1]),
       kinds=st.lists(st.sampled_from(["consistent", "degenerate", "inconsistent", "first"]), min_size=1,
                      max_size=6),
       diagnostics=st.booleans(), data=st.data())
def test_coefficients_of_many_layers_equal_each_layer_alone(seed, memory, q, kinds, diagnostics, data):
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=memory)
    table = surrogate.state_table()
    states, Hs = [], []
    for i, kind in enumerate(kinds):
        n = memory + 1 + i
        kept = data.draw(st.integers(0, memory - 1), label=f"kept{i}")
        A, W, H = _random_state(seed + i, memory, n, kept, kind)
        if kind == "first":
            state: dict = {}
            table.init_layer(state, n, {"sigma": 0.1}, DT, torch.device("cpu"))
        else:
            state = _layer_state(A, W, 1.0, memory)
        states.append(state)
        Hs.append(H)
    together = _batch(surrogate, states, Hs, 0.5, q, diagnostics)
    surrogate.coefficients(together)
    counters = {k: 0 for k in together.counters}
    for i in range(len(kinds)):
        alone = _batch(surrogate, states[i:i + 1], Hs[i:i + 1], 0.5, q, diagnostics)
        surrogate.coefficients(alone)
        assert bool(alone.skip[0]) == bool(together.skip[i])
        for name, column in alone.coef.items():
            torch.testing.assert_close(together.coef[name][i], column[0], rtol=1e-12, atol=0.0, msg=name)
        for source, mine in ((together.new_layer, alone.new_layer), (together.info, alone.info)):
            for name, value in mine.items():
                torch.testing.assert_close(source[name][i], value[0], rtol=1e-12, atol=0.0, msg=name)
        for name, count in alone.counters.items():
            counters[name] += int(count)
    assert counters == {k: int(v) for k, v in together.counters.items()}


@pytest.mark.parametrize("memory", [1, 2, 4])
def test_coefficients_read_nothing_on_the_host(memory):
    # on the meta device a tensor has no value: any host read (bool(), int(), .item()) would raise
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=memory)
    meta = {"dtype": DT, "device": "meta"}
    layers = 5
    red = {r.name: torch.zeros(layers, **meta) for r in surrogate.reductions({}, diagnostics=True)}
    red["hh"] = torch.zeros(layers, **meta)
    like = torch.zeros((), **meta)
    b = CoefficientStage(hp={"sigma": 0.1, "q": 0.1}, red=red,
                         layer={e.name: torch.zeros(layers, **meta) for e in surrogate.state_table().scalars}, group={},
                         numel=torch.ones(layers, dtype=torch.int64, device="meta"), loss=like, statistic=None,
                         ok=torch.ones((), dtype=torch.bool, device="meta"),
                         skip=torch.zeros(layers, dtype=torch.bool, device="meta"), diagnostics=True)
    b.R = like
    surrogate.coefficients(b)
    columns = {"ch", "q"} | {f"cw{j}" for j in range(1, memory + 1)} | {f"ca{j}" for j in range(1, memory + 1)}
    assert columns <= set(b.coef)
    assert set(b.counters) == {"rows_dropped", "guard_restarts"}
    assert all(t.shape == (layers,) for t in b.coef.values())


# ----------------------------------------------------------------------------- the pieces
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), log_ratio=st.floats(0.0, 12.0),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_jacobi_eigenvalues_equal_lapack(seed, n, log_ratio, dtype):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 3 * n, generator=gen, dtype=DT)
    if n > 1:
        A[-1] = A[0] + 10.0 ** (-log_ratio / 2) * A[-1]   # λ_min / λ_max down to 1e-12
    G = (A @ A.T).to(dtype)
    lam, V = symmetric_eigen(torch.stack([G, 2.0 * G]))
    want = torch.linalg.eigvalsh(G.double())
    eps = float(torch.finfo(dtype).eps)
    for scale, got in ((1.0, lam[0]), (2.0, lam[1])):
        assert float((got.double().sort().values - scale * want).abs().max()) <= 50 * n * eps * scale * float(
            want.abs().max())
    # G = V diag(λ) Vᵀ with V orthogonal
    torch.testing.assert_close((V[0] * lam[0][None, :]) @ V[0].T, G, rtol=0, atol=50 * n * eps * float(G.abs().max()))
    torch.testing.assert_close(V[0] @ V[0].T, torch.eye(n, dtype=dtype), rtol=0, atol=50 * n * eps)


def test_jacobi_gives_non_finite_eigenvalues_for_non_finite_input():
    G = torch.tensor([[1.0, math.inf], [math.inf, 1.0]], dtype=DT)
    lam, _ = symmetric_eigen(G)
    assert not bool(torch.isfinite(lam).all())


def test_select_rows_drops_the_oldest_rows_by_the_batched_rule():
    surrogate = LowRankSurrogate(SymmetricLeastSquares(), memory=3)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, generator=gen, dtype=DT)
    P = torch.eye(6, dtype=DT) * 0.5
    kept_A, kept_W, inverse = surrogate.select_rows(A, A @ P)
    assert kept_A.shape[0] == 3
    torch.testing.assert_close(inverse, torch.linalg.inv(A @ A.T))
    A[2] = A[0]  # the oldest row repeats the newest: dropped
    kept_A, kept_W, inverse = surrogate.select_rows(A, A @ P)
    assert torch.equal(kept_A, A[:2]) and torch.equal(kept_W, (A @ P)[:2])
    torch.testing.assert_close(inverse, torch.linalg.inv(A[:2] @ A[:2].T))


def test_state_table_follows_the_memory():
    table = LowRankSurrogate(memory=3).state_table()
    assert [e.name for e in table.vectors] == ["v", "H", "row1", "row2", "prod1", "prod2"]
    assert [e.name for e in table.scalars] == ["S", "rows_kept"]
    assert [e.name for e in LowRankSurrogate(memory=1).state_table().vectors] == ["v", "H"]


class _MatrixOnlyEstimator(SymmetricLeastSquares):
    """An estimator written with matrices only (no batched coefficients)."""

    coefficients_from_dots = LeastSquaresEstimator.coefficients_from_dots


class _AdmitsOnlyEstimator(VanillaLeastSquares):
    """An estimator with its own admits() rule but no batched one."""

    def admits(self, A, W, rtol):
        return False


@pytest.mark.parametrize("estimator, missing", [(_MatrixOnlyEstimator(), "coefficients_from_dots"),
                                                (_AdmitsOnlyEstimator(), "admits_from_dots")])
def test_an_estimator_without_batched_methods_is_named(estimator, missing):
    composition = kalmanopt.compose(surrogate="lowrank", memory=2)
    composition = kalmanopt.Composition(composition.measurement, composition.dynamics,
                                        LowRankSurrogate(estimator, memory=2))
    assert missing in composition.surrogate.contract_gap()
    params = [torch.nn.Parameter(torch.randn(4, dtype=DT))]
    with pytest.raises(ValueError, match=missing):
        kalmanopt.KalmanOptimizer(params, composition, implementation="foreach")


@pytest.mark.parametrize("memory", [1, 3])
def test_diagnostics_are_those_of_the_step(memory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5, dtype=DT), torch.nn.Tanh(), torch.nn.Linear(5, 3, dtype=DT))
    opt = kalmanopt.create("koala++-lr", model.parameters(), memory=memory, track_diagnostics=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
    layers = opt.diagnostics()["layers"]
    assert len(layers) == 4
    for p, (name, info) in zip(model.parameters(), layers.items()):
        state = opt.state[p]
        # after the step the state holds H_k and v_k: cos ∠(H_k, v_k) from the dots equals the vectors'
        H, v = state["H"], state["v"]
        assert info["cos_Hv"] == pytest.approx(float(H @ v / (H.norm() * v.norm())), abs=1e-10), name
        assert info["S"] == pytest.approx(float(state["S"]), rel=1e-12), name
        assert 1 <= info["rows_kept"] <= memory and int(state["rows_kept"]) <= memory - 1
        assert {"lambda", "alpha", "w", "gain_scale"} <= set(info)
