"""Two CPU processes over gloo, for tests/test_distributed.py: ``python distributed_worker.py SCENARIOS OUT [BASE]``.

``SCENARIOS``: comma-separated names of the ``scenario_*`` functions below (``equality,checkpoint``).

Each rank trains on its half of a fixed global batch and writes what it saw to ``OUT/rank{r}.pt``;
the test compares that with one process on the whole batch (:func:`reference_run`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kalmanopt  # noqa: E402

PRESETS = ("koala++", "koala++-lr", "koala++-ns", "koala-diag", "koala-m", "koala-v", "koala-factored", "koala-kron")
ENGINES = ("reference", "foreach")
DTYPES = (torch.float32, torch.float64)
#: how far a distributed run may land from one process on the same global batch (relative), by dtype name
TOLERANCE = {str(torch.float32): 1e-6, str(torch.float64): 1e-10}
STEPS = 4
GLOBAL_BATCH = 8
#: the number of ranks of a launch (``DISTRIBUTED_WORKER_WORLD`` in the environment: 2 unless set)
WORLD = int(os.environ.get("DISTRIBUTED_WORKER_WORLD", "2"))
HP = {"weight_decay": 0.01}
#: presets run with state_dtype="bfloat16" under DDP and FSDP2
BF16_PRESETS = ("koala++", "koala-m")
#: presets whose surrogate is written per layer (gain()): DDP only (every built-in meets the contract)
PER_LAYER: tuple[str, ...] = ()
#: presets whose matrix stages read whole layers (under FSDP2 they gather them: docs/structured.md)
WHOLE_LAYER = ("koala-factored", "koala-kron")
#: presets that run under DDP only
DDP_ONLY = PER_LAYER
#: where the models and batches live: "cpu" (gloo), or "cuda" (NCCL, rank r on cuda:r; the cuda scenarios)
DEVICE = "cpu"
#: the engines of the CUDA scenario
CUDA_ENGINES = ("reference", "foreach", "fused")


def engines(preset: str) -> tuple[str, ...]:
    """The engines of ``ENGINES`` that run ``preset`` on the CPU."""
    from kalmanopt.engines import available_implementations

    usable = available_implementations(kalmanopt.create(preset, [torch.nn.Parameter(torch.ones(1))]).filter,
                                       {"params": [torch.ones(1)]})
    return tuple(e for e in ENGINES if usable[e] is None)


def mlp(seed: int) -> torch.nn.Sequential:
    """The tests' small MLP (float32, on the CPU), initialised from ``seed``: its shapes do not divide
    evenly over two ranks (uneven shards), and its one-row last layer leaves rank 1 an empty shard."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    """:func:`mlp` (seed 0) in ``dtype`` on this process's device."""
    return mlp(0).to(dtype).to(device())


def device() -> torch.device:
    """This process's device: the CPU, or its rank's GPU (one GPU in a one-process run)."""
    if DEVICE == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", dist.get_rank() if dist.is_initialized() else 0)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank and in the one-process run)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device()), y.to(device())


def losses_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(dim=1)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype, steps: range,
          rank: int | None, nan_step: int | None = None, count: list | None = None) -> None:
    """``steps`` plain-loop steps; ``rank`` None: the whole batch, else this rank's half."""
    for step in steps:
        x, y = batch(step, dtype)
        if rank is not None:
            half = GLOBAL_BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        losses = losses_of(model, x, y)
        losses.mean().backward()
        losses = losses.detach().clone()
        if nan_step == step and rank in (None, 1):
            losses[0] = float("nan")
        with counting() as calls:
            opt.step(loss=losses)
        if count is not None:
            count.append(len(calls))


def reference_run(preset: str, engine: str, dtype: torch.dtype, nan_step: int | None = None, **options) -> list:
    """One process, the whole global batch: the parameters after ``STEPS`` steps (``options``: the optimizer's)."""
    model = make_model(dtype)
    opt = kalmanopt.create(preset, model.parameters(), implementation=engine, process_group=None, **HP, **options)
    train(model, opt, dtype, range(STEPS), None, nan_step)
    return [p.detach().cpu().clone() for p in model.parameters()]


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "reduce_scatter", "all_to_all", "barrier", "gather", "scatter", "reduce")
_FUNCOL = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast")


@contextmanager
def counting():
    """Count every torch.distributed collective called inside (c10d and functional collectives)."""
    import torch.distributed._functional_collectives as funcol

    calls: list[str] = []
    saved = []
    for module, names in ((dist, _COLLECTIVES), (funcol, _FUNCOL)):
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)

            saved.append((module, name, fn))
            setattr(module, name, wrapper)
    try:
        yield calls
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()


def equality_runs(rank: int, out: dict, engines_of, nan_engine: str) -> None:
    """DDP and FSDP2 runs of every preset on ``engines_of(preset)``, and a NaN loss on rank 1 only (its
    gradients finite) at step 1, which every rank must skip (on ``nan_engine``)."""
    for dtype in DTYPES:
        for mode in ("ddp", "fsdp"):
            for preset in PRESETS:
                for engine in engines_of(preset):
                    if mode == "fsdp" and preset in DDP_ONLY:
                        continue
                    model = wrap(make_model(dtype), mode)
                    opt = kalmanopt.create(preset, model.parameters(), implementation=engine, **HP)
                    counts: list[int] = []
                    train(model, opt, dtype, range(STEPS), rank, count=counts)
                    out[(str(dtype), mode, preset, engine)] = ([full(p) for p in model.parameters()], counts)
                    if engine == "fused":  # whether the generated kernels ran (not the torch operations)
                        out[("kernels", str(dtype), mode, preset)] = ran_kernels(opt)
    for mode in ("ddp", "fsdp"):  # bf16 state: every rank draws the same rounding bits
        for preset in BF16_PRESETS:
            model = wrap(make_model(torch.float32), mode)
            opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", state_dtype="bfloat16", **HP)
            train(model, opt, torch.float32, range(STEPS), rank)
            out[("bf16 state", mode, preset)] = [full(p) for p in model.parameters()]
    for preset in WHOLE_LAYER:  # FSDP2, rank 1 without one layer's gradient: every rank refuses alike, no hang
        model = wrap(make_model(torch.float64), "fsdp")
        opt = kalmanopt.create(preset, model.parameters(), implementation=nan_engine, **HP)
        train(model, opt, torch.float64, range(1), rank)
        before = [full(p) for p in model.parameters()]
        x, y = batch(1, torch.float64)
        half = GLOBAL_BATCH // WORLD
        opt.zero_grad()
        losses = losses_of(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        losses.mean().backward()
        if rank == 1:
            list(model.parameters())[2].grad = None
        try:
            opt.step(loss=losses.detach())
            what = "stepped"
        except RuntimeError as exc:
            what = f"refused: {exc}"
        out[("one rank lacks a layer", preset)] = (
            what, all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters())))
    for mode in ("ddp", "fsdp"):
        model = wrap(make_model(torch.float64), mode)
        opt = kalmanopt.create("koala++", model.parameters(), implementation=nan_engine, **HP)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            train(model, opt, torch.float64, range(STEPS), rank, nan_step=1)
        out[("nan", mode)] = ([full(p) for p in model.parameters()], opt.diagnostics()["counters"])


#: presets and engines of the HSDP runs (a 2-D mesh: replicated over its first dimension, sharded over its second)
HSDP_CASES = (("koala++", "foreach"), ("koala++", "reference"), ("koala-m", "foreach"),
              ("koala-adam-steady", "foreach"), ("koala-kron", "foreach"), ("koala-factored", "foreach"))


def wrap_hsdp(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2's HSDP: ``fully_shard`` on a ``(replicate, shard)`` mesh of 2 × WORLD/2 ranks (its parameters are
    DTensors placed ``(Replicate(), Shard(0))``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device().type, (2, WORLD // 2), mesh_dim_names=("replicate", "shard"))
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    return model


def scenario_hsdp(rank: int, out: dict, base: str) -> None:
    """HSDP on WORLD ranks (four: 2 replicas × 2 shards), every rank its own part of the global batch: the
    presets of ``HSDP_CASES`` in both dtypes, bf16 state, and checkpoints saved after two steps
    (``base/hsdp/<preset>``) then resumed by FSDP2 on the same ranks (another mesh: one dimension of four)."""
    from kalmanopt.engines.distributed import save_checkpoint

    for preset, engine in HSDP_CASES:
        for dtype in DTYPES:
            model = wrap_hsdp(make_model(dtype))
            opt = kalmanopt.create(preset, model.parameters(), implementation=engine, **HP)
            counts: list[int] = []
            train(model, opt, dtype, range(STEPS), rank, count=counts)
            out[("hsdp", str(dtype), preset, engine)] = ([full(p) for p in model.parameters()], counts)
    model = wrap_hsdp(make_model(torch.float32))
    opt = kalmanopt.create("koala++", model.parameters(), implementation="foreach", state_dtype="bfloat16", **HP)
    train(model, opt, torch.float32, range(STEPS), rank)
    out[("hsdp bf16 state", "koala++")] = [full(p) for p in model.parameters()]
    for preset in CHECKPOINT_PRESETS:
        model = wrap_hsdp(make_model(torch.float64))
        opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
        train(model, opt, torch.float64, range(2), rank)
        save_checkpoint(opt, f"{base}/hsdp/{preset}", model.state_dict())
        train(model, opt, torch.float64, range(2, STEPS), rank)
        out[("hsdp saved", preset)] = [full(p) for p in model.parameters()]
        dist.barrier()
        out[("hsdp resumed by fsdp", preset)] = resume(preset, f"{base}/hsdp/{preset}", rank)


def ran_kernels(opt: kalmanopt.KalmanOptimizer) -> bool:
    """Whether the fused engine ran its generated kernels on the optimizer's group (it keeps a plan)."""
    from kalmanopt.engines.fused import FusedEngine

    return FusedEngine.runs_kernels(opt.runtime, 0, opt.param_groups[0])


def scenario_equality(rank: int, out: dict, *_: str) -> None:
    equality_runs(rank, out, engines, "foreach")
    # opting out: each rank filters its own loss (the replicas drift apart, as before)
    model = wrap(make_model(torch.float64), "ddp")
    opt = kalmanopt.create("koala++", model.parameters(), process_group=None, **HP)
    train(model, opt, torch.float64, range(STEPS), rank)
    out["opt-out"] = [full(p) for p in model.parameters()]
    out["errors"] = bad_input(rank)


def scenario_cuda(rank: int, out: dict, *_: str) -> None:
    """NCCL on two GPUs: :func:`scenario_equality`'s runs on every engine, fused included."""
    equality_runs(rank, out, lambda preset: CUDA_ENGINES, "fused")


def scenario_interpreted(rank: int, out: dict, *_: str) -> None:
    """The fused engine on CPU ranks, its kernels run by Triton's interpreter (the launch sets
    ``TRITON_INTERPRET=1``): :func:`scenario_equality`'s runs on it."""
    equality_runs(rank, out, lambda preset: ("fused",), "fused")


def scenario_masked(rank: int, out: dict, *_: str) -> None:
    """The foreach engine's device path on CPU ranks: masked writes and buckets of small layers (several
    buckets of the test MLP's layers; on the CPU the engine would branch on the host instead), under
    DDP and FSDP2 shards: :func:`scenario_equality`'s runs, kept in ``out["masked"]``."""
    from kalmanopt.engines import buckets, torch_ops

    original = torch_ops.TorchEngine._host, buckets.CONFIG["elements"]
    torch_ops.TorchEngine._host = lambda self, like: self.host_branches
    buckets.CONFIG["elements"] = 20
    try:
        masked: dict = {}
        equality_runs(rank, masked, lambda preset: ("foreach",), "foreach")
        out["masked"] = masked
    finally:
        torch_ops.TorchEngine._host, buckets.CONFIG["elements"] = original


ODD_PRESETS = ("koala++", "koala-m")


def _odd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, odd: int, case: str) -> tuple:
    """One step of the ``odd`` scenario: rank ``odd`` is the odd one in the way ``case`` says. Returns (what
    happened: "stepped", "refused: <message>" or "warned: <message>", the collectives of the step)."""
    import warnings

    x, y = batch(step, torch.float64)
    half = GLOBAL_BATCH // WORLD
    x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    if case == "empty" and rank == odd:
        x, y = x[:0], y[:0]
    two_phase = case.endswith("(update)")
    case = case.replace(" (update)", "")
    if two_phase:
        opt.predict()
    opt.zero_grad()
    losses = losses_of(model, x, y)
    if case != "none":  # "none": no rank runs backward
        (losses.sum() / GLOBAL_BATCH).backward()
    if case == "dropped" and rank == odd:
        for p in model.parameters():
            p.grad = None
    if case == "one layer" and rank == odd:
        list(model.parameters())[2].grad = None
    with counting() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if two_phase:
                mean = losses.detach().mean() if losses.numel() else torch.zeros((), dtype=losses.dtype)
                applied = opt.update(mean, kalmanopt.loss_statistic(losses.detach(), "second_moment")
                                     if losses.numel() else torch.zeros((), dtype=losses.dtype))
                what = "stepped" if applied else "skipped"
            else:
                opt.step(loss=losses.detach())
                what = "stepped"
        except RuntimeError as e:
            what = f"refused: {e}"
    messages = [str(w.message) for w in caught if "no gradient" in str(w.message)]
    if what in ("stepped", "skipped") and messages:
        what = f"warned: {messages[0]}"
    return what, len(calls)


def scenario_odd(rank: int, out: dict, *_: str) -> None:
    """Issue 27, item 1: each rank in turn the odd one — its gradients dropped (all, or one layer's), an empty
    micro-batch — and no rank with a gradient, under DDP and FSDP2. Every rank takes part in every collective
    (a gloo hang or read error otherwise) and all ranks do the same: step, refuse or skip together."""
    for mode in ("ddp", "fsdp"):
        for preset in ODD_PRESETS:
            for case in ("dropped", "one layer", "empty", "none", "dropped (update)", "none (update)"):
                for odd in range(WORLD) if not case.startswith("none") else (0,):
                    model = wrap(make_model(torch.float64), mode)
                    opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
                    first, _ = _odd_step(model, opt, 0, rank, odd, "ok")  # a normal step: the state exists
                    before = [full(p) for p in model.parameters()]
                    counters = dict(opt.diagnostics()["counters"])
                    what, calls = _odd_step(model, opt, 1, rank, odd, case)
                    unchanged = all(torch.equal(a, full(p)) for a, p in zip(before, model.parameters())) and \
                        opt.diagnostics()["counters"] == counters
                    after, _ = _odd_step(model, opt, 2, rank, odd, "ok")  # and the run goes on
                    out[("odd", mode, preset, case, odd)] = (first, what, calls, unchanged, after,
                                                             [full(p) for p in model.parameters()],
                                                             opt.diagnostics()["counters"])


CHECKPOINT_PRESETS = ("koala++", "koala-m", "koala-kron", "koala-factored")


def scenario_checkpoint(rank: int, out: dict, base: str) -> None:
    """FSDP: save after two steps on two ranks (``base/two/<preset>``) and go on; load what one process
    saved (``base/one/<preset>``) and go on; a load into an optimizer on the wrong process group fails."""
    from kalmanopt.engines.distributed import load_checkpoint, save_checkpoint

    dtype = torch.float64
    for preset in CHECKPOINT_PRESETS:
        model = wrap(make_model(dtype), "fsdp")
        opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
        train(model, opt, dtype, range(2), rank)
        save_checkpoint(opt, f"{base}/two/{preset}", model.state_dict())
        train(model, opt, dtype, range(2, STEPS), rank)
        out[("saved", preset)] = [full(p) for p in model.parameters()]
        out[("loaded", preset)] = resume(preset, f"{base}/one/{preset}", rank)
    # the wrong process group: refused, naming the parameter, and nothing changes
    subgroups = [dist.new_group([r]) for r in range(WORLD)]
    model = wrap(make_model(dtype), "fsdp")
    opt = kalmanopt.create("koala++", model.parameters(), **HP)
    opt.process_group = subgroups[rank]
    before = [full(p) for p in model.parameters()]
    try:
        load_checkpoint(opt, f"{base}/two/koala++", model.state_dict())
    except ValueError as e:
        out["mismatch"] = str(e)
    out["mismatch unchanged"] = (not opt.state and all(torch.equal(a, full(p)) for a, p in
                                                       zip(before, model.parameters())))
    try:
        kalmanopt.create("koala++", model.parameters(), process_group=subgroups[rank])
    except ValueError as e:
        out["mismatch create"] = str(e)


def scenario_structured(rank: int, out: dict, *_: str) -> None:
    """The presets whose matrix stages read whole layers, over ``WORLD`` ranks (three: uneven shards, and the
    one-row last layer leaves two ranks an empty shard) under DDP and FSDP2, two samples per rank: each rank's
    parameters after ``STEPS`` steps, for comparison with one process on the ``2 · WORLD`` samples."""
    for mode in ("ddp", "fsdp"):
        for preset in WHOLE_LAYER:
            model = wrap(make_model(torch.float64), mode)
            opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **_refresh(preset), **HP)
            for step in range(STEPS):
                x, y = batch(step, torch.float64)
                x, y = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
                opt.zero_grad()
                losses = losses_of(model, x, y)
                losses.mean().backward()
                opt.step(loss=losses.detach())
            out[("structured", mode, preset)] = [full(p) for p in model.parameters()]


def _refresh(preset: str) -> dict:
    """koala-kron refreshes its factors every second step here (the interval counted alike on every rank)."""
    return {"refresh": 2} if preset == "koala-kron" else {}


def structured_reference(preset: str, world: int) -> list[torch.Tensor]:
    """One process on the ``2 · world`` samples of :func:`scenario_structured`."""
    model = make_model(torch.float64)
    opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", process_group=None,
                           **_refresh(preset), **HP)
    for step in range(STEPS):
        x, y = batch(step, torch.float64)
        opt.zero_grad()
        losses = losses_of(model, x[:2 * world], y[:2 * world])
        losses.mean().backward()
        opt.step(loss=losses.detach())
    return [p.detach().clone() for p in model.parameters()]


RUNNER_CONFIG = """
name = "dist"
task = "digits"
model = "mlp"
seeds = [0]
steps = 4
batch_size = 32
device = "cpu"
threads = 1
log_every = 2
diagnostics = false
distributed = "fsdp"

[model_options]
hidden = 8

[[optimizers]]
preset = "koala++"

[[optimizers]]
torch = "adamw"
lr = 1e-2
"""


def resume(preset: str, path: str, rank: int) -> list[torch.Tensor]:
    """FSDP2 on this launch's ranks: load the checkpoint at ``path`` into a model of other initial values,
    train the steps after it (2, 3) and return the gathered parameters."""
    from kalmanopt.engines.distributed import load_checkpoint

    dtype = torch.float64
    model = wrap(mlp(1).to(dtype), "fsdp")
    opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
    state = model.state_dict()
    load_checkpoint(opt, path, state)
    model.load_state_dict(state)
    train(model, opt, dtype, range(2, STEPS), rank)
    return [full(p) for p in model.parameters()]


def scenario_reload(rank: int, out: dict, base: str) -> None:
    """What two ranks saved (``base/two/<preset>``), resumed on this launch's ranks (four: shards of 2, 1, 1
    and 1 rows, the last rank's share of the 3-row layer empty)."""
    for preset in CHECKPOINT_PRESETS:
        out[("reloaded", preset)] = resume(preset, f"{base}/two/{preset}", rank)


def scenario_runner(rank: int, out: dict, base: str) -> None:
    """``distributed = "fsdp"`` in a runner config: rank 0 writes, and a second call resumes (trains nothing)."""
    from kalmanopt.runner import run_experiment
    from kalmanopt.runner.config import parse_config, parse_toml

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    folder = Path(base) / "grid"
    outcomes = []
    for _ in range(2):
        config = parse_config(parse_toml(RUNNER_CONFIG))
        config.check()
        outcome = run_experiment(config, folder)
        outcomes.append((outcome.trained, outcome.skipped, outcome.writer, str(outcome.out)))
    out["runner"] = outcomes


def scenario_benchmark(rank: int, out: dict, *_: str) -> None:
    """benchmarks/distributed_gpt.py with a tiny GPT on the CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import distributed_gpt as bench

    args = bench.parse_args(["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "2",
                             "--rounds", "1"])
    rows = bench.run_benchmark(args)
    out["benchmark"] = ([r.__dict__ for r in rows], bench.table(rows, args, WORLD, "cpu"))


def bad_input(rank: int) -> dict:
    """The messages of the refused inputs (and whether anything changed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    errors = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    other = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("other",))
    a = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.ones(5), other, [Shard(0)]))
    for name, params in (("meshes", [a, b]),):
        try:
            kalmanopt.create("koala++", params)
        except ValueError as e:
            errors[name] = str(e)
    partial = torch.distributed.tensor.DTensor.from_local(torch.ones(2, 3), mesh, [Partial()])
    try:
        kalmanopt.create("koala++", [a, torch.nn.Parameter(partial)])
    except ValueError as e:
        errors["partial"] = str(e)
    class PerLayer(kalmanopt.CovarianceSurrogate):
        """A prototype written per layer (gain() only)."""

        def gain(self, ctx, layer_state, H, g, R, hp):  # pragma: no cover (refused before any step)
            S = torch.dot(H, H) + R
            return kalmanopt.Gain(direction=H, coefficients=(1.0 / S).reshape(1), S=S)

    try:
        composition = kalmanopt.Composition(kalmanopt.LossMeasurement(), kalmanopt.RandomWalk(), PerLayer())
        kalmanopt.KalmanOptimizer([a], composition)
    except ValueError as e:
        errors["per-layer"] = str(e)
    try:
        kalmanopt.create("koala++", [a], process_group="world")
    except TypeError as e:
        errors["option"] = str(e)
    return errors


# ---------------------------------------------------------------------- for the parent process (tests, benchmarks)
def launch(scenarios: str, out: Path, *args: str, world: int = WORLD,
           env: dict[str, str] | None = None) -> tuple[dict, ...]:
    """Run ``scenarios`` (comma-separated) on ``world`` forked ranks (gloo, or NCCL for ``cuda``); each
    rank's results. ``args`` reach the scenarios (a folder of checkpoints); ``env`` adds to the ranks'
    environment."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", DISTRIBUTED_WORKER_WORLD=str(world), **(env or {}))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), scenarios, str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the ranks of {scenarios!r} failed:\n{done.stderr[-4000:]}")
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world))


def predict_collectives(preset: str) -> int:
    """A predict's all-reduces per step: only sharded layers under dynamics with predict reductions need one."""
    opt = kalmanopt.create(preset, [torch.nn.Parameter(torch.ones(2))])
    return 1 if opt.filter.dynamics.predict_reductions(opt.param_groups[0]) else 0


def assert_the_nan_step_was_skipped_on_every_rank(ranks: Sequence[dict], ref: list[torch.Tensor]) -> None:
    """The ``("nan", mode)`` runs of :func:`equality_runs`: on every rank one step counted as non-finite and
    skipped, and the parameters equal to ``ref`` (one process skipping the same step)."""
    for mode in ("ddp", "fsdp"):
        for rank, out in enumerate(ranks):
            params, counters = out[("nan", mode)]
            assert counters["nonfinite_steps"] == 1 and counters["steps"] == STEPS - 1, (mode, rank, counters)
            assert relative_difference(params, ref) <= 1e-10, (mode, rank)


def relative_difference(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest difference of any tensor from its reference, relative to the reference's largest entry."""
    return max(float((a.detach() - b).abs().max() / b.abs().max()) for a, b in zip(params, ref))


def save_one_process_checkpoints(base: Path) -> None:
    """What one process saves after two steps (``base/one/<preset>``), for the ranks to resume."""
    from kalmanopt.engines.distributed import save_checkpoint

    for preset in CHECKPOINT_PRESETS:
        model = make_model(torch.float64)
        opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
        train(model, opt, torch.float64, range(2), None)
        save_checkpoint(opt, str(base / "one" / preset), model.state_dict())


def resume_in_one_process(preset: str, path: Path) -> list[torch.Tensor]:
    """Load what ranks saved at ``path`` into one process (a model of other initial values) and train the
    steps after it; the parameters."""
    from kalmanopt.engines.distributed import load_checkpoint

    model = mlp(5).double()
    opt = kalmanopt.create(preset, model.parameters(), implementation="foreach", **HP)
    state = model.state_dict()
    load_checkpoint(opt, str(path), state)
    model.load_state_dict(state)
    train(model, opt, torch.float64, range(2, STEPS), None)
    return list(model.parameters())


def main(rank: int, scenario: str, out_dir: str, *args: str) -> None:
    global DEVICE
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.set_num_threads(1)
    if "cuda" in scenario.split(","):
        DEVICE = "cuda"
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=WORLD, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out: dict = {}
        for name in scenario.split(","):
            globals()[f"scenario_{name}"](rank, out, *args)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    # fork: the children inherit the imports (torch, FSDP, kalmanopt), which a spawn would repeat
    import torch.distributed.fsdp  # noqa: F401

    mp.start_processes(main, args=tuple(sys.argv[1:]), nprocs=WORLD, start_method="fork")
