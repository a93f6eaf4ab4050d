"""The fast paths equal the reference path (CPU: the multi-tensor path; the fused path needs CUDA).

float64 to 1e-10, float32 to 1e-5, on random multi-layer problems and hypothesis-drawn shapes
(empty, scalar, odd sizes, layers without a gradient or with a vanishing one), through both
APIs, across checkpoints from one implementation to another.
"""

from __future__ import annotations

import gc
import re
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from conformance import GOLDEN_FILES, batches, build_model, flat, load, per_sample_losses, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt

FAST_PRESETS = ("koala++", "koala++-ns", "koala-v", "koala-m", "koala-diag", "koala++-lr", "koala-adam",
                "koala-adam-steady")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(sizes: list[int], dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1], dtype=dtype), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _train(preset: str, implementation: str, *, dtype=torch.float64, steps=6, api="step", seed=0,
           device="cpu", **kw) -> tuple[torch.Tensor, kalmanopt.KalmanOptimizer]:
    model = _model([6, 9, 7, 4], dtype, seed).to(device)
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(12, 6, generator=gen, dtype=dtype).to(device)
        y = torch.randint(0, 4, (12,), generator=gen).to(device)
        _one_step(opt, model, x, y, api)
    return flat(model), opt


def _one_step(opt, model, x, y, api):
    if api == "two-phase":
        opt.predict()
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    if api == "step":
        opt.step(loss=losses)
    else:
        assert opt.update(losses.mean(), (losses.detach() ** 2).mean())


def _state_error(a: kalmanopt.KalmanOptimizer, b: kalmanopt.KalmanOptimizer) -> float:
    """Largest relative difference over every state tensor of two optimizers on the same model shape."""
    worst = 0.0
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        items_a = sa[key].get("global", sa[key]) if isinstance(sa[key], dict) else sa[key]
        items_b = sb[key].get("global", sb[key]) if isinstance(sb[key], dict) else sb[key]
        assert set(items_a) == set(items_b), key
        for name, ta in items_a.items():
            tb = items_b[name]
            if isinstance(ta, dict):
                continue
            if ta.is_floating_point():
                scale = float(ta.abs().max()) if ta.numel() else 0.0
                diff = float((ta - tb).abs().max()) if ta.numel() else 0.0
                worst = max(worst, diff / scale if scale else diff)
            else:
                assert torch.equal(ta, tb), (key, name)
    return worst


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("api", ["step", "two-phase"])
def test_foreach_equals_reference(preset, dtype, weight_decay, api):
    want, ref = _train(preset, "reference", dtype=dtype, weight_decay=weight_decay, api=api)
    got, fast = _train(preset, "foreach", dtype=dtype, weight_decay=weight_decay, api=api)
    assert relative_error(got, want) <= TOLERANCE[dtype]
    assert _state_error(fast, ref) <= 100 * TOLERANCE[dtype]
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]


@pytest.mark.parametrize("preset", FAST_PRESETS)
def test_foreach_global_granularity_equals_reference(preset):
    want, ref = _train(preset, "reference", granularity="global", weight_decay=1e-3)
    got, fast = _train(preset, "foreach", granularity="global", weight_decay=1e-3)
    assert relative_error(got, want) <= 1e-10
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("api", ["step", "two-phase"])
def test_foreach_reproduces_golden(path, api):
    golden = load(path)
    model = build_model(golden)
    opt = kalmanopt.create(golden["preset"], model.parameters(), loss_statistic=golden["loss_statistic"],
                           implementation="foreach", **golden["hyperparameters"])
    a = golden["hyperparameters"].get("a", 0.9)
    for k, (x, y) in enumerate(batches(golden)):
        if api == "two-phase":
            opt.predict()
        losses = per_sample_losses(model, x, y)
        opt.zero_grad()
        losses.mean().backward()
        if api == "step":
            opt.step(loss=losses)
        else:
            assert opt.update(losses.mean(), kalmanopt.loss_statistic(losses, golden["loss_statistic"]))
        got = flat(model)
        if api == "step" and golden["preset"] == "koala-m":  # the step API leaves θ_k + u_k
            got = got - torch.cat([opt.state[p]["u"] for p in model.parameters()]) / a
        want = torch.tensor(golden["parameters_after_step"][k], dtype=torch.float64)
        assert relative_error(got, want) <= 1e-10, f"step {k}"


SHAPES = st.lists(
    st.sampled_from([(), (0,), (1,), (3,), (5, 7), (2, 0), (13,), (4, 3, 2)]), min_size=1, max_size=5)
#: what happens to a parameter's gradient at a step: a random one, none, zero, or below 1e-9
GRADS = st.sampled_from(["random", "random", "random", "none", "zero", "tiny"])


def _shaped_run(preset, implementation, shapes, plan, dtype, device="cpu", **kw):
    gen = torch.Generator().manual_seed(len(shapes))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]
    opt = kalmanopt.create(preset, params, implementation=implementation, **kw)
    for step_plan in plan:
        losses = torch.rand(5, generator=gen, dtype=dtype).to(device) + 0.1
        for p, kind in zip(params, step_plan):
            g = torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
            p.grad = {"random": g, "none": None, "zero": torch.zeros_like(p), "tiny": 1e-12 * g}[kind]
        opt.step(loss=losses)
    return params, opt


@settings(max_examples=20, deadline=None)
@given(preset=st.sampled_from(FAST_PRESETS), shapes=SHAPES, data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_foreach_equals_reference_on_drawn_shapes(preset, shapes, data, dtype):
    plan = data.draw(st.lists(st.lists(GRADS, min_size=len(shapes), max_size=len(shapes)), min_size=1,
                              max_size=4))
    want, ref = _shaped_run(preset, "reference", shapes, plan, dtype)
    got, fast = _shaped_run(preset, "foreach", shapes, plan, dtype)
    for a, b in zip(got, want):
        if b.numel():
            assert relative_error(a.detach().reshape(-1), b.detach().reshape(-1)) <= TOLERANCE[dtype]
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
    assert _state_error(fast, ref) <= 100 * TOLERANCE[dtype]


@settings(max_examples=30, deadline=None)
@given(preset=st.sampled_from(FAST_PRESETS), shapes=SHAPES, data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32]), weight_decay=st.sampled_from([0.0, 1e-3]),
       cap=st.sampled_from([1, 8, 40, 1 << 23]))
def test_buckets_of_small_layers_equal_the_layer_by_layer_masked_pass(preset, shapes, data, dtype, weight_decay, cap):
    """Where the engine masks on the device (forced here on the CPU), layers in buckets — concatenated, sums by
    segments, one program per bucket — end where the layer-by-layer masked pass ends: parameters, state and
    counters, through skipped layers, missing gradients, non-finite steps and buckets cut at every size."""
    from kalmanopt.engines import buckets, torch_ops

    plan = data.draw(st.lists(st.lists(GRADS, min_size=len(shapes), max_size=len(shapes)), min_size=1,
                              max_size=4))
    nan_step = data.draw(st.integers(-1, len(plan) - 1))
    runs = []
    original_host, original_cap = torch_ops.TorchEngine._host, buckets.CONFIG["elements"]
    try:
        torch_ops.TorchEngine._host = lambda self, like: self.host_branches  # (the device's masked pass)
        for elements in (0, cap):
            buckets.CONFIG["elements"] = elements
            gen = torch.Generator().manual_seed(len(shapes))
            params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
            opt = kalmanopt.create(preset, params, implementation="foreach", weight_decay=weight_decay)
            for k, step_plan in enumerate(plan):
                losses = torch.rand(5, generator=gen, dtype=dtype) + 0.1
                for p, kind in zip(params, step_plan):
                    g = torch.randn(p.shape, generator=gen, dtype=dtype)
                    p.grad = {"random": g, "none": None, "zero": torch.zeros_like(p), "tiny": 1e-12 * g}[kind]
                if k == nan_step and params[0].grad is not None and params[0].numel():
                    params[0].grad.view(-1)[0] = float("nan")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    opt.step(loss=losses)
            runs.append((params, opt))
    finally:
        torch_ops.TorchEngine._host, buckets.CONFIG["elements"] = original_host, original_cap
    (want, ref), (got, fast) = runs
    for a, b in zip(got, want):
        if b.numel():
            assert relative_error(a.detach().reshape(-1), b.detach().reshape(-1)) <= TOLERANCE[dtype]
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
    assert _state_error(fast, ref) <= 100 * TOLERANCE[dtype]


def test_buckets_are_runs_of_one_dtype_up_to_the_cap_and_a_larger_layer_is_alone():
    from kalmanopt.engines import buckets

    def env(n, dtype=torch.float32):
        return {"theta": torch.zeros(n, dtype=dtype)}

    before = buckets.CONFIG["elements"]
    try:
        buckets.CONFIG["elements"] = 10
        envs = [env(3), env(4), env(3), env(2), env(20), env(1), env(1, torch.float64), env(2, torch.float64)]
        assert buckets.plan_buckets(envs) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 8)]
        assert buckets.plan_buckets([]) == []
        layers, buckets.CONFIG["layers"] = buckets.CONFIG["layers"], 2
        try:
            assert buckets.plan_buckets([env(1)] * 5) == [(0, 2), (2, 4), (4, 5)]
        finally:
            buckets.CONFIG["layers"] = layers
    finally:
        buckets.CONFIG["elements"] = before


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000) | st.sampled_from([0, 1, 31, 32, 33, 1024, 1025]), min_size=1,
                      max_size=12),
       n_values=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), nan_layer=st.integers(-1, 11))
def test_bucket_sums_by_blocks_equal_each_layers_own_sum_and_keep_its_nan(sizes, n_values, seed, nan_layer):
    """A bucket's layer sums (padded blocks, then each layer's blocks) are each layer's sum, whatever the
    sizes (empty layers, one element, block boundaries); a NaN stays in its own layer; padding never counts."""
    from kalmanopt.engines import buckets

    gen = torch.Generator().manual_seed(seed)
    where = buckets.Layout(sizes, torch.device("cpu"))
    assert where.block & (where.block - 1) == 0 and buckets.BLOCK_MIN <= where.block
    assert where.block_index.shape[1] <= max(buckets.MOST_BLOCKS, 1)
    layers = [[torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes] for _ in range(n_values)]
    if 0 <= nan_layer < len(sizes) and sizes[nan_layer]:
        layers[0][nan_layer][-1] = float("nan")
    # the padding holds what a program makes of zeros: here garbage, which the mask must drop
    envs = [{"x": layers[0][i], "y": layers[-1][i]} for i in range(len(sizes))]
    padded = where.padded(envs, ["x", "y"])
    assert padded["x"].numel() == sum(n + pad for n, pad in zip(sizes, where.pads))
    values = []
    for j in range(n_values):
        flat = torch.cat([torch.cat([layer, torch.full((pad,), 7.0, dtype=torch.float64)])
                          for layer, pad in zip(layers[j], where.pads)])
        values.append(flat)
    got = where.layer_sums(values)
    want = torch.tensor([[float(layers[j][i].sum()) for j in range(n_values)] for i in range(len(sizes))],
                        dtype=torch.float64).reshape(len(sizes), n_values)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(padded["y"], torch.cat([torch.cat([layer, torch.zeros(pad, dtype=torch.float64)])
                                                       for layer, pad in zip(layers[-1], where.pads)]),
                               equal_nan=True)


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("first,second", [("reference", "foreach"), ("foreach", "reference")])
def test_checkpoint_resumes_across_implementations(preset, first, second):
    want, _ = _train(preset, "reference", steps=6)
    model = _model([6, 9, 7, 4], torch.float64, 0)
    opt = kalmanopt.create(preset, model.parameters(), implementation=first)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (12,), generator=gen))
            for _ in range(6)]
    for x, y in data[:3]:
        _one_step(opt, model, x, y, "step")
    saved = opt.state_dict()
    resumed = kalmanopt.create(preset, model.parameters(), implementation=second)
    resumed.load_state_dict(saved)
    for x, y in data[3:]:
        _one_step(resumed, model, x, y, "step")
    assert relative_error(flat(model), want) <= 1e-10


def test_nonfinite_step_changes_nothing_and_warns_once():
    params, opt = _shaped_run("koala++", "foreach", [(4, 3), (5,)], [["random", "random"]] * 2, torch.float64)
    before = [p.detach().clone() for p in params]
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[2] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step(loss=torch.rand(5, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kind
        opt.step(loss=torch.rand(5, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    counters = opt.diagnostics()["counters"]
    assert counters["nonfinite_steps"] == 2 and counters["steps"] == 2
    after = opt.state_dict()["state"]
    for key, items in state_before.items():
        for name, t in items.items():
            if name not in ("nonfinite_steps",):
                assert torch.equal(after[key][name], t), (key, name)


def test_implementation_choice_and_errors():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="fused kernels need CUDA tensors"):
        kalmanopt.create("koala++", params, implementation="fused")
    with pytest.raises(ValueError, match="two-pass contract"):
        kalmanopt.KalmanOptimizer(params, _per_layer_composition(), implementation="foreach")
    from kalmanopt.engines import resolve_engine as resolve_implementation

    for preset, want in (("koala++", "foreach"), ("koala-m", "foreach"), ("koala++-lr", "foreach")):
        opt = kalmanopt.create(preset, params)
        assert resolve_implementation(opt.filter, opt.param_groups[0]).name == want
    opt = kalmanopt.KalmanOptimizer(params, _per_layer_composition())
    assert resolve_implementation(opt.filter, opt.param_groups[0]).name == "reference"


def _per_layer_composition() -> kalmanopt.Composition:
    """A surrogate written per layer with gain() only (P = sigma I, no posterior): the reference engine's."""

    class FixedCovariance(kalmanopt.CovarianceSurrogate):
        hyperparameters = (kalmanopt.HyperParameter("sigma", 0.5, kalmanopt.Range(0.0, low_open=True)),)

        def gain(self, ctx, layer_state, H, g, R, hp):
            # S = sigma ‖H‖² + R;  K = sigma H / S
            S = hp["sigma"] * torch.dot(H, H) + R
            return kalmanopt.Gain(direction=H, coefficients=(hp["sigma"] / S).reshape(1), S=S)

    base = kalmanopt.compose(surrogate="scalar")
    return kalmanopt.Composition(base.measurement, base.dynamics, FixedCovariance())


def test_cpu_fast_path_does_not_import_triton():
    sys.modules.pop("kalmanopt.engines.triton_source", None)  # (other tests generate source without a GPU)
    _train("koala++", "foreach", steps=2)
    assert "kalmanopt.engines.triton_source" not in sys.modules


def test_bfloat16_parameters_keep_float32_state():
    want, ref = _train("koala++", "reference", dtype=torch.bfloat16, steps=3)
    got, fast = _train("koala++", "foreach", dtype=torch.bfloat16, steps=3)
    for p in fast.param_groups[0]["params"]:
        assert fast.state[p]["v"].dtype == torch.float32 and fast.state[p]["H"].dtype == torch.float32
    assert relative_error(got.float(), want.float()) <= 2e-2  # bf16 rounding of θ may differ by an ulp


def train_and_forget(preset: str, implementation: str, device: str, steps: int = 8) -> list:
    """Train a small model, drop the model and the optimizer; weak references to its parameters and state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4)).to(device)
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation)
    for _ in range(steps):  # (on CUDA, enough steps for a captured and replayed step)
        losses = model(torch.randn(16, 64, device=device)).pow(2).mean(1)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step(loss=losses.detach())
    refs = [weakref.ref(p) for p in model.parameters()]
    refs += [weakref.ref(t) for entry in opt.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
    del model, opt, losses
    gc.collect()
    return refs


@pytest.mark.parametrize("implementation", ["reference", "foreach"])
@pytest.mark.parametrize("preset", ["koala++", "koala-m"])
def test_a_deleted_optimizer_keeps_no_parameter_or_state_alive(preset, implementation):
    """Engines are shared by every optimizer of the process: what they cache per optimizer goes with it
    (an ablation trains many optimizers in one process)."""
    refs = train_and_forget(preset, implementation, "cpu")
    assert len(refs) > 4 and all(r() is None for r in refs)


def test_an_offset_table_keeps_its_alignment_when_the_cache_of_tables_is_cleared():
    """The fused engine's offset tables (CPU-testable helpers): offsets from the first tensor, cached by
    address in the optimizer's runtime; whether a table may take the aligned kernel variant stays with the
    table when the cache, which FSDP2's new gradient buffers each step can fill, is cleared."""
    from kalmanopt.engines import fused
    from kalmanopt.engines.runtime import Runtime

    runtime = Runtime()  # (the cache lives in an optimizer's runtime)

    storage = torch.zeros(16 * 400)
    views = [storage[:16], storage[32:48], storage[64:80]]
    base, table = fused._slot(views, torch.device("cpu"), runtime)
    assert base is views[0] and table.tolist() == [0, 32, 64]
    assert fused._slot(views, torch.device("cpu"), runtime)[1] is table  # cached
    for i in range(300):  # other addresses, past the cache's bound: it is cleared
        fused._slot([storage[16 * (i + 5):], storage[:1]], torch.device("cpu"), runtime)
    assert fused._slot(views, torch.device("cpu"), runtime)[1] is not table  # (the cache forgot it)
    assert storage.data_ptr() % 16 == 0
    assert fused._aligned({"theta": (base, table)})  # the table in use still takes the aligned kernels
    odd = [storage[1:17], storage[4:20]]  # offsets not multiples of 16 elements
    assert not fused._aligned({"theta": (base, table), "g": fused._slot(odd, torch.device("cpu"), runtime)})


def _kernel_traffic(source: str, kernel: str) -> tuple[set[str], set[str]]:
    """The pointers a generated kernel loads from and stores to (``p_<slot>``), from its source."""
    parts = source.split("def ")
    body = next((p for p in parts if p.startswith(f"{kernel}_kernel(")), "")
    return set(re.findall(r"tl\.load\(p_(\w+) \+ idx", body)), set(re.findall(r"tl\.store\(p_(\w+) \+ idx", body))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
@pytest.mark.parametrize("preset", kalmanopt.presets())
def test_memory_traffic_is_what_the_generated_kernels_load_and_store(preset, weight_decay):
    """``memory_traffic`` counts exactly the vectors the generated Triton source loads and stores, pass by pass
    (the source is generated without a GPU)."""
    from kalmanopt.engines.fused import memory_traffic
    from kalmanopt.engines.triton_source import source_for
    from kalmanopt.plan import predict_plan, update_plan

    opt = kalmanopt.create(preset, torch.nn.Linear(3, 2).parameters(), weight_decay=weight_decay)
    group = opt.param_groups[0]
    traffic = memory_traffic(opt.filter, group)
    safe = {"theta": "theta", "g": "g"}
    up = update_plan(opt.filter, group)
    vectors = [f"state.{e.name}" for e in up.table.vectors]
    safe.update({v: v.replace(".", "_") for v in vectors})
    pp = predict_plan(opt.filter, group)
    ride = (pp.reductions, pp.program, pp.outputs) if pp.rides else ()
    source = source_for(up.pre, up.reductions, up.program, up.outputs, ["theta", "g", *vectors], ride)[0]
    assert {safe[k] for k in traffic.update_reduce} == _kernel_traffic(source, "reduce")[0]
    assert ({safe[k] for k in traffic.update_reads}, {safe[k] for k in traffic.update_writes}) == \
        _kernel_traffic(source, "apply")
    separate = pp.moves and not pp.rides
    source = source_for((), pp.reductions, pp.program, pp.outputs, ["theta", *vectors])[0] if separate else ""
    assert {safe[k] for k in traffic.predict_reduce} == _kernel_traffic(source, "reduce")[0]
    assert ({safe[k] for k in traffic.predict_reads}, {safe[k] for k in traffic.predict_writes}) == \
        _kernel_traffic(source, "apply")


def test_memory_traffic_of_koala_plus_plus_and_koala_m():
    """KOALA++: two passes, 10 accesses per parameter (11 with weight decay, which reads θ in the reduction
    pass); KOALA-M: its predict rides on the update's element-wise pass (8 accesses, not 14 in four passes);
    a part that does not meet the contract is refused."""
    from kalmanopt.engines.fused import memory_traffic

    def traffic(preset: str, **kw):
        opt = kalmanopt.create(preset, torch.nn.Linear(3, 2).parameters(), **kw)
        return memory_traffic(opt.filter, opt.param_groups[0])

    plain, decayed = traffic("koala++", weight_decay=0.0), traffic("koala++", weight_decay=1e-4)
    assert (plain.accesses, plain.passes, decayed.accesses) == (10, 2, 11)
    assert plain.update_reduce == ("g", "state.H", "state.v") and "theta" in decayed.update_reduce
    momentum = traffic("koala-m", weight_decay=0.0)
    assert (momentum.accesses, momentum.passes) == (8, 2)
    assert momentum.update_reduce == ("g",) and momentum.predict_reduce == momentum.predict_reads == ()
    assert set(momentum.update_reads) == {"g", "theta", "state.u", "state.w_bar"}
    assert set(momentum.update_writes) == {"theta", "state.u", "state.w_bar"}
    with pytest.raises(ValueError, match="does not run on the fused engine"):
        memory_traffic(_per_layer_composition(), {"weight_decay": 0.0})


def test_the_memory_traffic_table_of_the_benchmarks_page_is_the_scripts_output():
    """docs/benchmarks.md's traffic table is what benchmarks/memory_traffic.py prints from the page's own GPU
    table: the counts follow the declarations (a part changed without the page fails here)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    import memory_traffic

    page = root / "docs" / "benchmarks.md"
    want = memory_traffic.table(memory_traffic.traffic_rows(), memory_traffic.measured(page, "GPT-2 medium"),
                                "GPT-2 medium")
    assert want in page.read_text()
