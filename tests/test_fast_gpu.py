"""The fused (Triton) and multi-tensor paths on CUDA: equal to the reference path, no host sync
in a step, capturable in a CUDA graph, non-finite steps masked on the device.

With ``KALMANOPT_FUSED_TEST_DEVICE=cpu`` and ``TRITON_INTERPRET=1`` in the environment the same tests run on
the CPU, the fused engine's kernels executed by Triton's interpreter (``tests/test_fused_interpreted.py``
runs them so); the tests of what only a GPU has (host syncs, CUDA graphs, CUDA memory) are skipped there.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import pytest
import torch
from conformance import flat, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from language_cases import FORMS, SPECIAL, expected, probe_composition, run_probe
from test_fast import FAST_PRESETS, GRADS, SHAPES, TOLERANCE, _shaped_run, _train

import kalmanopt

#: where the tests run: "cuda", or "cpu" with the fused kernels in Triton's interpreter
CUDA = os.environ.get("KALMANOPT_FUSED_TEST_DEVICE", "cuda")

pytestmark = [pytest.mark.gpu] if CUDA == "cuda" else []
#: a test of what only a GPU has (host synchronisation, CUDA graphs, CUDA memory)
needs_cuda = pytest.mark.skipif(CUDA != "cuda", reason="a GPU-only property (the interpreter runs on the CPU)")


def _synchronize() -> None:
    if CUDA == "cuda":
        torch.cuda.synchronize()


def _compare_states(fast: kalmanopt.KalmanOptimizer, ref: kalmanopt.KalmanOptimizer, tol: float) -> None:
    """States present on the reference path agree; a layer the fast path holds state for and the
    reference does not was skipped at its first update (S = 0 marks it as not updated yet)."""
    sf, sr = fast.state_dict()["state"], ref.state_dict()["state"]
    for key, items in sr.items():
        items = items.get("global", items)
        other = sf[key].get("global", sf[key])
        for name, want in items.items():
            if isinstance(want, dict):
                continue
            got = other[name].to(want.device)
            if want.is_floating_point() and not bool(torch.isfinite(want).all()):
                continue  # the reference's KOALA-M q_w divides by n_total = 0 when every parameter is empty
            if want.is_floating_point() and want.numel():
                scale = float(want.abs().max()) or 1.0
                assert float((got - want).abs().max()) / scale <= tol, (key, name)
            elif not want.is_floating_point():
                assert torch.equal(got, want), (key, name)
    for key, items in sf.items():
        ref_items = sr.get(key, {})
        items = items.get("global", items)
        ref_items = ref_items.get("global", ref_items)
        if "S" in items and "S" not in ref_items:
            assert float(items["S"]) == 0.0


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("api", ["step", "two-phase"])
def test_cuda_paths_equal_reference(implementation, preset, dtype, weight_decay, api):
    want, ref = _train(preset, "reference", dtype=dtype, weight_decay=weight_decay, api=api, device=CUDA)
    got, fast = _train(preset, implementation, dtype=dtype, weight_decay=weight_decay, api=api, device=CUDA)
    assert relative_error(got, want) <= TOLERANCE[dtype]
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
    _compare_states(fast, ref, 100 * TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_riding_predict_runs_in_the_updates_pass_and_equals_the_reference(dtype, monkeypatch):
    """KOALA-M under ``step()``: its predict rides on the update's element-wise pass (one reduction and one
    element-wise kernel a step, not two of each), with the reference path's result through a layer skipped
    for its zero gradient, a non-finite step (nothing moves) and a step with a parameter without gradient
    (then the predict runs on its own). Every step runs eagerly, so that its launches can be counted (a
    replayed CUDA graph launches nothing from the host)."""
    from kalmanopt.engines import graphs, triton_source

    monkeypatch.setattr(graphs, "WARMUP_STEPS", 10**9)

    launches: list[str] = []
    for kind in ("reduce", "apply"):
        original = getattr(triton_source.Kernels, f"launch_{kind}")

        def counted(self, *args, _original=original, _kind=kind, **kw):
            launches.append(_kind)
            return _original(self, *args, **kw)

        monkeypatch.setattr(triton_source.Kernels, f"launch_{kind}", counted)
    runs = {}
    for implementation in ("reference", "fused"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 300),
                                    torch.nn.Linear(300, 3)).to(dtype=dtype, device=CUDA)
        opt = kalmanopt.create("koala-m", model.parameters(), implementation=implementation, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(1)
        per_step = []
        for k in range(7):
            x = torch.randn(16, 6, generator=gen, dtype=dtype).to(CUDA)
            losses = model(x).square().mean(1)
            opt.zero_grad()
            losses.mean().backward()
            if k == 2:
                model[0].weight.grad.zero_()  # that layer is skipped, the others update; every layer predicts
            if k == 3:
                model[2].bias.grad[0] = float("nan")  # the step is skipped: nothing moves
            if k == 4:
                model[3].bias.grad = None  # a layer without gradient: the predict runs on its own
            launches.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(loss=losses)
            _synchronize()
            per_step.append((launches.count("reduce"), launches.count("apply")))
        runs[implementation] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt, per_step)
    (want, ref, _), (got, fused, per_step) = runs["reference"], runs["fused"]
    assert relative_error(got, want) <= TOLERANCE[dtype]
    _compare_states(fused, ref, 100 * TOLERANCE[dtype])
    assert fused.diagnostics()["counters"] == ref.diagnostics()["counters"]
    # the first step: a predict of its own before the update; step 4: the layer without gradient
    assert per_step[0] == (2, 2) and per_step[4] == (2, 2)
    assert all(per_step[k] == (1, 1) for k in (1, 2, 3, 5, 6)), per_step


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("api", ["step", "two-phase"])
def test_bfloat16_state_on_the_fused_engine_rounds_as_the_reference(preset, api):
    """``state_dtype="bfloat16"``: the kernels store the vectors in bfloat16 with the same random bits as the
    torch engines (a riding predict's rounding included), so the runs agree to float32 arithmetic's order;
    KOALA++-LR's least squares over its stored rows turn an occasional neighbour picked otherwise into
    larger differences."""
    kw = {"dtype": torch.float32, "steps": 6, "api": api, "device": CUDA, "state_dtype": "bfloat16",
          "weight_decay": 1e-2}
    want, ref = _train(preset, "reference", **kw)
    got, fast = _train(preset, "fused", **kw)
    assert relative_error(got, want) <= (2e-2 if preset == "koala++-lr" else 1e-4)
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
    stored = kalmanopt.plan.state_table(fast.filter).stored_vector_keys
    for p, q in zip(fast.param_groups[0]["params"], ref.param_groups[0]["params"]):
        for name in stored:
            if name not in ref.state[q]:
                continue
            a, b = fast.state[p][name], ref.state[q][name].to(CUDA)
            assert a.dtype == b.dtype == torch.bfloat16, name
            if preset != "koala++-lr":
                assert float((a == b).double().mean()) >= 0.95, name


@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-adam-steady"])
@needs_cuda
def test_bfloat16_state_replays_in_a_cuda_graph(preset):
    """The rounding keys come from the group's step counter on the device: a replayed step draws new bits
    each time, as an eager step does."""
    params, twin, opt, eager, graph, losses = _captured_step(preset, [(37, 19), (19,), (5, 3, 3)],
                                                             state_dtype="bfloat16")
    for _ in range(6):
        eager.step(loss=losses.clone())
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for p, t in zip(params, twin):
        assert relative_error(p.detach().reshape(-1), t.detach().reshape(-1)) <= 1e-5
        for name, value in opt.state[p].items():
            assert torch.equal(value, eager.state[t][name]), name


@pytest.mark.parametrize("preset", FAST_PRESETS)
def test_fused_global_granularity_equals_reference(preset):
    want, _ = _train(preset, "reference", granularity="global", weight_decay=1e-3, device=CUDA)
    got, _ = _train(preset, "fused", granularity="global", weight_decay=1e-3, device=CUDA)
    assert relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("chunk,block", [(16, 8), (8192, 1024)])
@settings(max_examples=12, deadline=None)
@given(preset=st.sampled_from(FAST_PRESETS), shapes=SHAPES, data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_fused_equals_reference_on_drawn_shapes(chunk, block, preset, shapes, data, dtype):
    from kalmanopt.engines import fused

    plan = data.draw(st.lists(st.lists(GRADS, min_size=len(shapes), max_size=len(shapes)), min_size=1,
                              max_size=4))
    saved = dict(fused.CONFIG)
    fused.CONFIG.update(chunk=chunk, block=block)
    try:
        want, ref = _shaped_run(preset, "reference", shapes, plan, dtype, device=CUDA)
        got, fast = _shaped_run(preset, "fused", shapes, plan, dtype, device=CUDA)
    finally:
        fused.CONFIG.update(saved)
    for a, b in zip(got, want):
        if b.numel():
            assert relative_error(a.detach().reshape(-1), b.detach().reshape(-1)) <= TOLERANCE[dtype]
    assert fast.diagnostics()["counters"] == ref.diagnostics()["counters"]
    _compare_states(fast, ref, 100 * TOLERANCE[dtype])


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
@pytest.mark.parametrize("preset", FAST_PRESETS)
@needs_cuda
def test_step_does_not_synchronise(implementation, preset):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(CUDA)
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, weight_decay=1e-4)
    x, y = torch.randn(16, 32, device=CUDA), torch.randint(0, 8, (16,), device=CUDA)

    def step():
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad(set_to_none=False)
        losses.mean().backward()
        opt.step(loss=losses)

    for _ in range(3):  # first steps create the state and the plans
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _captured_step(preset: str, shapes: list[tuple[int, ...]], **options: Any) -> tuple:
    """An optimizer over parameters of ``shapes`` that took three eager steps and captured its fourth in a CUDA
    graph (not run yet), and an eager twin on copies of the parameters and the same gradients:
    ``(params, twin, optimizer, eager twin, graph, losses)``."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=CUDA)) for s in shapes]
    grads = [torch.randn(p.shape, device=CUDA) for p in params]
    losses = torch.rand(8, device=CUDA) + 0.5
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = kalmanopt.create(preset, params, implementation="fused", **options)
    eager = kalmanopt.create(preset, twin, implementation="fused", **options)
    for p, t, g in zip(params, twin, grads):
        p.grad, t.grad = g, g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.step(loss=losses)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(loss=losses)
    return params, twin, opt, eager, graph, losses


@pytest.mark.parametrize("preset", FAST_PRESETS)
@needs_cuda
def test_fused_step_captures_in_a_cuda_graph(preset):
    params, twin, opt, eager, graph, losses = _captured_step(preset, [(37, 19), (19,), (5, 3, 3), ()])
    for _ in range(3):  # the three warm-up steps (the capture itself runs nothing)
        eager.step(loss=losses.clone())
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for _ in range(3):
        eager.step(loss=losses.clone())
    for p, t in zip(params, twin):
        assert relative_error(p.detach().reshape(-1), t.detach().reshape(-1)) <= 1e-5


@pytest.mark.parametrize("preset", FAST_PRESETS)
def test_nonfinite_gradient_skips_the_step_on_the_device(preset):
    params, opt = _shaped_run(preset, "fused", [(40, 3), (7,)], [["random", "random"]] * 2, torch.float32,
                              device=CUDA)
    before = [p.detach().clone() for p in params]
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[1, 2] = float("inf")
    with _reported("non-finite gradient", at_once=True):
        opt.step(loss=torch.rand(5, device=CUDA))
    _synchronize()
    with _reported("non-finite gradient", at_once=False):  # a GPU reports at a later step
        params[0].grad[1, 2] = float("nan")
        opt.step(loss=torch.rand(5, device=CUDA))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    counters = opt.diagnostics()["counters"]
    assert counters["nonfinite_steps"] == 2 and counters["steps"] == 2
    after = opt.state_dict()["state"]
    for key, items in state_before.items():
        for name, t in items.items():
            if name != "nonfinite_steps":
                assert torch.equal(after[key][name], t), (key, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _reported("non-finite loss", at_once=True):
            opt.step(loss=torch.tensor([float("nan"), 1.0], device=CUDA))
        _synchronize()
        with _reported("non-finite loss", at_once=False):
            opt.step(loss=torch.rand(5, device=CUDA))


@contextlib.contextmanager
def _syncs_refused(refused: bool = True) -> Iterator[None]:
    """Inside, a host synchronisation raises (CUDA's sync debug mode); nothing to refuse on the CPU."""
    if CUDA != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error" if refused else 0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _reported(message: str, at_once: bool) -> Any:
    """Expect the warning ``message`` here: a GPU step reports it at a later step (it never waits for the
    device), a CPU step at once (its flags are free to read); where it is not expected, nothing."""
    if at_once == (CUDA != "cuda"):
        return pytest.warns(RuntimeWarning, match=message)
    return contextlib.nullcontext()


@pytest.mark.parametrize("preset", FAST_PRESETS)
def test_grad_scaler_on_the_fused_engine_skips_overflows_without_a_host_sync(preset):
    """GradScaler hands the scale and the overflow flag to the step: a power-of-two scale equals the unscaled
    run bit for bit, an overflow skips the step on the device, and ``scaler.step`` never synchronises (on a
    GPU; the CPU has nothing to synchronise with)."""
    def run(scaled: bool, overflow_at: int | None = None) -> tuple[torch.nn.Module, kalmanopt.KalmanOptimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(CUDA)
        opt = kalmanopt.create(preset, model.parameters(), implementation="fused")
        scaler = torch.amp.GradScaler(CUDA, init_scale=2.0 ** 12, growth_interval=1000)
        gen = torch.Generator(device=CUDA).manual_seed(1)
        for k in range(6):
            x = torch.randn(16, 32, device=CUDA, generator=gen)
            y = torch.randint(0, 8, (16,), device=CUDA, generator=gen)
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            if not scaled:
                losses.mean().backward()
                opt.step(loss=losses.detach())
                continue
            scaler.scale(losses.mean()).backward()
            if k == overflow_at:
                model[0].weight.grad[0, 0] = float("inf")
            with _syncs_refused(k >= 3):
                scaler.step(opt, loss=losses.detach())
            scaler.update()
        return model, opt

    plain, _ = run(False)
    scaled, opt = run(True)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)
    skipped, opt = run(True, overflow_at=4)
    counters = opt.diagnostics()["counters"]
    assert counters["steps"] == 5 and counters["nonfinite_steps"] == 0
    assert all(bool(torch.isfinite(p).all()) for p in skipped.parameters())


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("first,second", [("fused", "reference"), ("reference", "fused"), ("fused", "foreach")])
def test_cuda_checkpoint_resumes_across_implementations(preset, first, second):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double().to(CUDA)
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 6, generator=gen, dtype=torch.float64).to(CUDA),
             torch.randint(0, 4, (12,), generator=gen).to(CUDA)) for _ in range(6)]

    def run(steps, opt):
        for x, y in steps:
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses)

    run(data, kalmanopt.create(preset, model.parameters(), implementation="reference"))
    want = flat(model)
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    opt = kalmanopt.create(preset, model.parameters(), implementation=first)
    run(data[:3], opt)
    resumed = kalmanopt.create(preset, model.parameters(), implementation=second)
    resumed.load_state_dict(opt.state_dict())
    run(data[3:], resumed)
    assert relative_error(flat(model), want) <= 1e-10


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.skipif(CUDA != "cuda", reason="Triton's interpreter converts float32 to bfloat16 by truncation (a GPU "
                    "rounds to nearest, as this test requires)")
def test_bfloat16_parameters_fused(preset):
    """bf16 parameters keep float32 state; θ is rounded to nearest, as the reference path's copy_."""
    want, _ = _train(preset, "reference", dtype=torch.bfloat16, steps=3, device=CUDA)
    got, fast = _train(preset, "fused", dtype=torch.bfloat16, steps=3, device=CUDA)
    for p in fast.param_groups[0]["params"]:
        for t in fast.state[p].values():
            if t.is_floating_point():
                assert t.dtype == torch.float32
    assert relative_error(got.float(), want.float()) <= 8e-3  # at most about two bf16 ulps


@needs_cuda
def test_none_picks_fused_on_cuda():
    from kalmanopt.engines import resolve_engine as resolve_implementation

    opt = kalmanopt.create("koala++", [torch.nn.Parameter(torch.randn(3, device=CUDA))])
    assert resolve_implementation(opt.filter, opt.param_groups[0]).name == "fused"


@pytest.mark.parametrize("preset", FAST_PRESETS)
def test_fused_non_contiguous_parameters(preset):
    """channels_last and transposed parameters run on contiguous copies, equal to the reference."""
    results = []
    for implementation in ("reference", "fused"):
        torch.manual_seed(0)
        conv = torch.randn(8, 4, 3, 3, dtype=torch.float64, device=CUDA).to(memory_format=torch.channels_last)
        params = [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64, device=CUDA).t()),
                  torch.nn.Parameter(torch.randn(7, dtype=torch.float64, device=CUDA))]  # noqa: E501
        opt = kalmanopt.create(preset, params, implementation=implementation)
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(CUDA)
            params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
            opt.step(loss=torch.rand(5, generator=gen, dtype=torch.float64).to(CUDA) + 0.5)
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
        assert not params[0].is_contiguous()
    assert relative_error(results[1], results[0]) <= 1e-10


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
@pytest.mark.parametrize("preset", FAST_PRESETS)
@needs_cuda
def test_replayed_steps_equal_the_reference_through_schedules_moves_and_changes(preset, implementation):
    """The fused and foreach engines replay a captured step once steady (kalmanopt.engines.graphs); η changing
    every step, gradient buffers that move, a hyper-parameter change and a non-finite loss must not make it
    differ from the reference engine."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5)).to(CUDA).double()
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [kalmanopt.create(preset, m.parameters(), implementation=impl, weight_decay=1e-3)
            for m, impl in zip(models, ("reference", implementation))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + 0.1 * k)) for o in opts]
    x, y = torch.randn(32, 24, device=CUDA, dtype=torch.float64), torch.randint(0, 5, (32,), device=CUDA)
    for k in range(14):
        for model, opt, sched in zip(models, opts, scheds):
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad(set_to_none=k in (7, 8))  # new gradient buffers at steps 7 and 8
            losses.mean().backward()
            if k == 10:
                losses = losses * float("nan")  # a skipped step, on the device
            if k == 9:
                opt.param_groups[0]["weight_decay"] = 2e-3  # a baked-in value changes: captured again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(loss=losses)
            sched.step()
    assert opts[1].runtime.graph is not None and opts[1].runtime.graph.graph is not None
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        assert relative_error(a.detach().reshape(-1), b.detach().reshape(-1)) <= 1e-10
    assert opts[1].diagnostics()["counters"] == opts[0].diagnostics()["counters"]


@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-adam-steady"])
@needs_cuda
def test_two_groups_and_new_gradient_buffers_every_step_replay_one_captured_step(preset, monkeypatch):
    """What trainers do: two parameter groups (weight decay on the matrices only, a schedule over both) and
    torch's default ``zero_grad()`` (``set_to_none=True``: each backward allocates new gradient buffers,
    wherever the allocator puts them). The fused engine captures the step once and replays it on the moved
    gradients, equal to the reference engine."""
    from kalmanopt.engines import graphs

    replays = []
    original = graphs.graphed_step
    monkeypatch.setattr(graphs, "graphed_step", lambda *a: replays.append(original(*a)) or replays[-1])
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5)).to(CUDA).double()
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = []
    for model, impl in zip(models, ("reference", "fused")):
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": 1e-3},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, "lr": 0.5}]
        opts.append(kalmanopt.create(preset, groups, implementation=impl))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + 0.1 * k)) for o in opts]
    x, y = torch.randn(32, 24, device=CUDA, dtype=torch.float64), torch.randint(0, 5, (32,), device=CUDA)
    addresses = set()
    spacers = []
    for k in range(12):
        for model, opt, sched in zip(models, opts, scheds):
            opt.zero_grad()
            spacers.append(torch.empty(4096 * (1 + k % 3), device=CUDA))  # the allocator hands other blocks
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            if opt is opts[1]:
                addresses.add(tuple(p.grad.data_ptr() for p in model.parameters()))
            opt.step(loss=losses)
            sched.step()
        if k % 2:
            spacers.clear()
    assert len(addresses) > 2  # (the gradients did move)
    fused_replays = replays[1::2]
    assert all(fused_replays[-6:]), fused_replays  # steady steps replay
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        assert relative_error(a.detach().reshape(-1), b.detach().reshape(-1)) <= 1e-10
    assert opts[1].diagnostics()["counters"] == opts[0].diagnostics()["counters"]


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
@pytest.mark.parametrize("preset", ["koala++", "koala-m"])
@needs_cuda
def test_a_deleted_optimizer_leaves_no_gpu_memory_behind(preset, implementation):
    """The fused engine's per-optimizer plans, staging buffers and captured graphs go with the optimizer:
    parameters and state are freed, and the allocated memory returns to where it was (small tables of
    sizes and offsets excepted)."""
    from test_fast import train_and_forget

    train_and_forget(preset, implementation, CUDA)  # (compiles; fills the process-wide caches)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        refs = train_and_forget(preset, implementation, CUDA)
        assert all(r() is None for r in refs)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 64 * 1024


@pytest.mark.parametrize("op", sorted(FORMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_the_languages_operations_on_the_fused_engine_equal_torch(op, dtype, monkeypatch):
    """Each operation of the element-wise language (tests/language_cases.py: abs, sign, exp, log, pow, minimum,
    maximum, where, in the forms an engine evaluates differently) in the generated kernels equals torch's value,
    on every pair of special values (zeros of both signs, ±1, ±inf, NaN) and ordinary ones. On a GPU the kernels
    take libdevice's exp, log and pow; in the interpreter numpy's exp and log, and a pow built from them in
    float64 (within a few ulps of C's)."""
    from kalmanopt.engines import compiled, fused

    monkeypatch.setitem(compiled.CONFIG, "enabled", False)  # (a composition per form: none compiled)
    monkeypatch.setitem(fused.CONFIG, "chunk", 64)  # a full chunk (the unmasked loop) and partial ones
    monkeypatch.setitem(fused.CONFIG, "block", 32)
    grid = torch.tensor(SPECIAL, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    xs = [grid.repeat_interleave(len(SPECIAL)), torch.randn(37, generator=gen, dtype=dtype) * 3]
    ys = [grid.repeat(len(SPECIAL)), torch.randn(37, generator=gen, dtype=dtype) * 3]
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, form in FORMS[op]:
        composition = probe_composition(form)
        for k, c in ((-2.5, 1.5), (800.0, -0.0))[:2 if dtype == torch.float64 else 1]:
            got = run_probe(composition, "fused", [x.to(CUDA) for x in xs], [y.to(CUDA) for y in ys], k, c,
                            device=CUDA)
            for out, x, y in zip(got, xs, ys):
                torch.testing.assert_close(out, expected(form, x, y, k, c), equal_nan=True, **tol,
                                           msg=lambda m, name=name, k=k, c=c: f"{name} (k={k}, c={c}): {m}")
