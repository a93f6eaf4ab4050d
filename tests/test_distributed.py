"""Several processes (issue 11): DDP and FSDP2 on two CPU processes over gloo equal one process.

Two runs of tests/distributed_worker.py (two forked ranks each) do the distributed work; one process
in this test computes the same training on the whole global batch and compares.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import distributed_worker as w
import pytest
import torch

import kalmanopt
from kalmanopt.engines import distributed

ROOT = Path(__file__).resolve().parent.parent
_launch = w.launch
_rel = w.relative_difference


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of two ranks for every scenario; first, the checkpoints one process saves for them."""
    base = tmp_path_factory.mktemp("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.distributed.checkpoint in one process says so)
        w.save_one_process_checkpoints(base)
    return base, _launch("equality,masked,checkpoint,runner,benchmark", base / "out", str(base))


@pytest.fixture(scope="module")
def equality(launched):
    return launched[1]


TOLERANCE = w.TOLERANCE
CASES = [(str(dtype), mode, preset, engine) for dtype in w.DTYPES for mode in ("ddp", "fsdp") for preset in w.PRESETS
         for engine in w.engines(preset) if not (mode == "fsdp" and preset in w.DDP_ONLY)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c).replace("torch.", "") for c in CASES])
def test_two_processes_equal_one_process_on_the_global_batch(equality, case):
    dtype_name, mode, preset, engine = case
    dtype = torch.float32 if dtype_name == str(torch.float32) else torch.float64
    ref = w.reference_run(preset, engine, dtype)
    for rank in range(w.WORLD):
        params, _ = equality[rank][case]
        assert _rel(params, ref) <= TOLERANCE[dtype_name], (case, rank, _rel(params, ref))


def test_ddp_ranks_are_bit_identical(equality):
    for case in CASES:
        if case[1] == "ddp":
            a, b = equality[0][case][0], equality[1][case][0]
            assert all(torch.equal(x, y) for x, y in zip(a, b)), case


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("preset", w.BF16_PRESETS)
def test_bfloat16_state_keeps_the_ranks_equal_and_follows_one_process(equality, mode, preset):
    """The rounding bits are a function of the step, the layer and the element: DDP's replicas stay bit for
    bit equal, and two ranks follow one process on the global batch to bf16 state's precision (a float32
    sum in another order can pick the other neighbour; FSDP2's shards number their elements from 0)."""
    ref = w.reference_run(preset, "foreach", torch.float32, state_dtype="bfloat16")
    a, b = equality[0][("bf16 state", mode, preset)], equality[1][("bf16 state", mode, preset)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # (DDP: the same bits as one process, 3e-7 apart; FSDP2: other bits, as far as bf16 state is from float32)
    assert _rel(a, ref) <= (1e-5 if mode == "ddp" else 1e-2), _rel(a, ref)


def test_exactly_one_collective_per_step(equality):
    for case in CASES:
        _, mode, preset, _ = case
        if mode == "fsdp" and preset in w.WHOLE_LAYER:
            # the step's one all-reduce, and the matrix stages' gathers of the sharded layers (made inside
            # DTensor, where the count may not see them): the same every step
            for rank in range(w.WORLD):
                counts = equality[rank][case][1]
                assert len(set(counts)) == 1 and counts[0] >= 1, (case, rank, counts)
            continue
        k = w.predict_collectives(preset) if mode == "fsdp" else 0
        # the first step also runs the first predict
        expected = [1 + 2 * k] + [1 + k] * (w.STEPS - 1)
        for rank in range(w.WORLD):
            assert equality[rank][case][1] == expected, (case, rank)
    assert w.predict_collectives("koala-m") == 1 and w.predict_collectives("koala++") == 0


def test_a_rank_without_a_layers_gradient_is_refused_alike_under_fsdp2_matrix_stages(equality):
    """The matrix stages gather a sharded layer on every rank (zeros where a rank has no gradient), so the
    step's census still runs everywhere and refuses the step on every rank, changing nothing."""
    for preset in w.WHOLE_LAYER:
        for rank in range(w.WORLD):
            what, unchanged = equality[rank][("one rank lacks a layer", preset)]
            assert what.startswith("refused") and "rank" in what and unchanged, (preset, rank, what)


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(equality):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = w.reference_run("koala++", "foreach", torch.float64, nan_step=1)
    w.assert_the_nan_step_was_skipped_on_every_rank(equality, ref)


MASKED_CASES = [(str(dtype), mode, preset) for dtype in w.DTYPES for mode in ("ddp", "fsdp") for preset in w.PRESETS
                if not (mode == "fsdp" and preset in w.DDP_ONLY)]


@pytest.mark.parametrize("case", MASKED_CASES, ids=["-".join(c).replace("torch.", "") for c in MASKED_CASES])
def test_the_foreach_device_path_in_buckets_on_two_ranks_equals_one_process(equality, case):
    """The foreach engine's masked, bucketed passes (the CUDA path, forced on the CPU ranks): DDP and FSDP2
    shards — the one-row layer's empty on rank 1 — equal to one process, one collective per step, DDP's
    ranks bit-identical."""
    dtype_name, mode, preset = case
    dtype = torch.float32 if dtype_name == str(torch.float32) else torch.float64
    ref = w.reference_run(preset, "foreach", dtype)
    k = w.predict_collectives(preset) if mode == "fsdp" else 0
    runs = [equality[rank]["masked"][(dtype_name, mode, preset, "foreach")] for rank in range(w.WORLD)]
    for rank, (params, counts) in enumerate(runs):
        assert _rel(params, ref) <= TOLERANCE[dtype_name], (case, rank, _rel(params, ref))
        assert counts == [1 + 2 * k] + [1 + k] * (w.STEPS - 1), (case, rank, counts)
    if mode == "ddp":
        assert all(torch.equal(x, y) for x, y in zip(runs[0][0], runs[1][0])), case


def test_a_nan_loss_on_one_rank_skips_the_bucketed_foreach_step_on_every_rank(equality):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = w.reference_run("koala++", "foreach", torch.float64, nan_step=1)
    w.assert_the_nan_step_was_skipped_on_every_rank([r["masked"] for r in equality], ref)


CUDA_CASES = [(str(dtype), mode, preset, engine) for dtype in w.DTYPES for mode in ("ddp", "fsdp")
              for preset in w.PRESETS for engine in w.CUDA_ENGINES]


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    """One launch of two ranks over NCCL, rank r on cuda:r (skipped without two CUDA devices)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < w.WORLD:
        pytest.skip(f"needs {w.WORLD} CUDA devices")
    return _launch("cuda", tmp_path_factory.mktemp("cuda"))


def _on_one_gpu(preset: str, engine: str, dtype: torch.dtype, nan_step: int | None = None) -> list:
    saved, w.DEVICE = w.DEVICE, "cuda"
    try:
        return w.reference_run(preset, engine, dtype, nan_step)
    finally:
        w.DEVICE = saved


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=["-".join(c).replace("torch.", "") for c in CUDA_CASES])
def test_two_gpus_equal_one_gpu_on_the_global_batch(two_gpus, case):
    """NCCL, every engine (fused included): the same equality as over gloo, and one collective per step."""
    dtype_name, mode, preset, engine = case
    dtype = torch.float32 if dtype_name == str(torch.float32) else torch.float64
    ref = _on_one_gpu(preset, engine, dtype)
    k = w.predict_collectives(preset) if mode == "fsdp" else 0
    for rank in range(w.WORLD):
        params, counts = two_gpus[rank][case]
        assert _rel(params, ref) <= TOLERANCE[dtype_name], (case, rank, _rel(params, ref))
        assert counts == [1 + 2 * k] + [1 + k] * (w.STEPS - 1), (case, rank, counts)
    if mode == "ddp":
        assert all(torch.equal(x, y) for x, y in zip(two_gpus[0][case][0], two_gpus[1][case][0]))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", w.PRESETS)
def test_the_fused_kernels_run_on_fsdp_shards_as_on_whole_tensors(two_gpus, preset):
    """The fused engine runs its generated kernels on DTensor shards wherever it runs them on DDP's whole
    tensors (no fall-back to the torch operations because a parameter is sharded)."""
    for rank in range(w.WORLD):
        for dtype in w.DTYPES:
            ddp, fsdp = (two_gpus[rank][("kernels", str(dtype), mode, preset)] for mode in ("ddp", "fsdp"))
            assert fsdp == ddp, (rank, dtype, ddp, fsdp)
            if preset.startswith("koala++"):
                assert fsdp, (rank, dtype)


@pytest.mark.gpu
def test_a_nan_loss_on_one_gpu_skips_the_step_on_both(two_gpus):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _on_one_gpu("koala++", "fused", torch.float64, nan_step=1)
    w.assert_the_nan_step_was_skipped_on_every_rank(two_gpus, ref)


def test_opting_out_leaves_each_rank_to_its_own_loss(equality):
    a, b = equality[0]["opt-out"], equality[1]["opt-out"]
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_input_names_the_parameter(equality):
    errors = equality[0]["errors"]
    assert "group 0, parameter 1" in errors["meshes"] and "device mesh" in errors["meshes"]
    assert "group 0, parameter 1" in errors["partial"] and "Partial" in errors["partial"]
    assert "parameter 0" in errors["per-layer"] and "gain()" in errors["per-layer"]
    assert "'auto'" in errors["option"] and "ProcessGroup" in errors["option"]


@pytest.fixture(scope="module")
def checkpoints(launched):
    return launched


@pytest.mark.parametrize("preset", w.CHECKPOINT_PRESETS)
def test_checkpoints_reshard_between_two_ranks_and_one(checkpoints, preset):
    base, ranks = checkpoints
    ref = w.reference_run(preset, "foreach", torch.float64)
    for rank in range(w.WORLD):
        assert _rel(ranks[rank][("saved", preset)], ref) <= 1e-10  # two ranks, uninterrupted
        assert _rel(ranks[rank][("loaded", preset)], ref) <= 1e-10  # one process saved, two ranks resumed
    # two ranks saved, one process resumes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = w.resume_in_one_process(preset, base / "two" / preset)
    assert _rel(resumed, ref) <= 1e-10


@pytest.fixture(scope="module")
def four_ranks(launched):
    """What two ranks saved, resumed by four (gloo, four processes); and HSDP on those four (a 2 × 2 mesh)."""
    base, _ = launched
    return _launch("reload,hsdp", base / "four", str(base), world=4)


@pytest.mark.parametrize("preset", w.CHECKPOINT_PRESETS)
def test_a_checkpoint_of_two_ranks_resumes_on_four(four_ranks, preset):
    """Resharding 2 → 4 (empty shards of the 3-row and the 1-row layers): the uninterrupted run's result."""
    ref = w.reference_run(preset, "foreach", torch.float64)
    for rank, out in enumerate(four_ranks):
        assert _rel(out[("reloaded", preset)], ref) <= 1e-10, (preset, rank)


HSDP_CASES = [(str(dtype), preset, engine) for preset, engine in w.HSDP_CASES for dtype in w.DTYPES]


@pytest.mark.parametrize("case", HSDP_CASES, ids=["-".join(c).replace("torch.", "") for c in HSDP_CASES])
def test_hsdp_equals_one_process_on_the_global_batch(four_ranks, case):
    """HSDP (replicated over 2, sharded over 2): each layer's partial sums count once per shard, not once per
    replica, so four ranks follow one process on the global batch; every rank holds the same parameters, and
    a step makes one collective (and the predict's of a dynamics with predict reductions)."""
    dtype, preset, engine = case
    ref = w.reference_run(preset, engine, getattr(torch, dtype.removeprefix("torch.")))
    params, counts = four_ranks[0][("hsdp", *case)]
    assert _rel(params, ref) <= TOLERANCE[dtype], _rel(params, ref)
    for out in four_ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[("hsdp", *case)][0], params))
    if preset not in w.WHOLE_LAYER:  # (their matrix stages gather whole layers: DTensor's own collectives)
        assert counts[1:] == [1 + w.predict_collectives(preset)] * (w.STEPS - 1), counts


def test_hsdp_keeps_bfloat16_state_equal_on_every_rank(four_ranks):
    ref = w.reference_run("koala++", "foreach", torch.float32, state_dtype="bfloat16")
    first = four_ranks[0][("hsdp bf16 state", "koala++")]
    assert all(torch.equal(a, b) for out in four_ranks[1:] for a, b in zip(out[("hsdp bf16 state", "koala++")], first))
    assert _rel(first, ref) <= 1e-2  # (as FSDP2's: the shards number their elements from 0)


@pytest.mark.parametrize("preset", w.CHECKPOINT_PRESETS)
def test_an_hsdp_checkpoint_resumes_under_fsdp2_and_in_one_process(four_ranks, launched, preset):
    """Saved by HSDP after two steps, resumed by FSDP2 on four ranks (a mesh of one dimension) and by one
    process: the next steps equal the uninterrupted run's."""
    base, _ = launched
    ref = w.reference_run(preset, "foreach", torch.float64)
    for out in four_ranks:
        assert _rel(out[("hsdp saved", preset)], ref) <= 1e-10
        assert _rel(out[("hsdp resumed by fsdp", preset)], ref) <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.distributed.checkpoint in one process says so)
        assert _rel(w.resume_in_one_process(preset, base / "hsdp" / preset), ref) <= 1e-10


def test_a_process_group_mismatch_on_load_is_refused_before_anything_changes(checkpoints):
    _, ranks = checkpoints
    for rank in range(w.WORLD):
        out = ranks[rank]
        assert "group 0, parameter 0 (shape (5, 6))" in out["mismatch"] and "process group" in out["mismatch"]
        assert out["mismatch unchanged"]
        assert "group 0, parameter 0" in out["mismatch create"]


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_parameter(checkpoints):
    base, _ = checkpoints
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    opt = kalmanopt.create("koala++", model.parameters(), **w.HP)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"group 0, parameter 0 \(shape \(4, 6\)\)"):
        warnings.simplefilter("ignore")
        distributed.load_checkpoint(opt, str(base / "one" / "koala++"))
    assert not opt.state


def test_a_distributed_runner_grid_is_written_by_rank_0_and_resumes(launched):
    base, ranks = launched
    # (trained, skipped, wrote the folder, the folder) of two calls: the second resumes
    folder = str(base / "grid")
    assert ranks[0]["runner"] == [(2, 0, True, folder), (0, 2, True, folder)]
    assert ranks[1]["runner"] == [(2, 0, False, folder), (0, 2, False, folder)]
    from kalmanopt.runner.results import load_results

    records = load_results(base / "grid")
    assert sorted(r["optimizer"] for r in records) == ["adamw", "koala++"]
    assert [r["steps"] for r in records] == [4, 4]


def test_the_gpu_benchmark_runs_on_the_cpu_with_a_tiny_model(launched):
    rows, text = launched[1][0]["benchmark"]
    assert [r["optimizer"] for r in rows] == ["adamw", "koala++"]
    for r in rows:
        assert r["tokens_per_second"] > 0 and math.isfinite(r["final_loss"]) and r["peak_memory_gib"] > 0
    assert "| koala++ |" in text and "KOALA++ / AdamW: tokens/s" in text


def test_the_runner_refuses_distributed_without_torchrun(monkeypatch):
    from kalmanopt.runner import ConfigError
    from kalmanopt.runner.config import parse_config, parse_toml
    from kalmanopt.runner.distributed import launch

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node"):
        launch("ddp", torch.device("cpu"))
    with pytest.raises(ConfigError, match="distributed must be one of 'none', 'ddp', 'fsdp'"):
        parse_config(parse_toml(w.RUNNER_CONFIG.replace('"fsdp"', '"zero3"'))).check()


# ---------------------------------------------------------------------- one process
def test_process_group_option_is_checked_and_survives_copies():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="'auto'.*None.*ProcessGroup"):
        kalmanopt.create("koala++", [p], process_group=2)
    opt = kalmanopt.create("koala++", [p], process_group=None)
    assert opt.process_group is None and copy.deepcopy(opt).process_group is None
    assert kalmanopt.create("koala++", [p]).process_group == "auto"
    assert distributed.process_group(opt) is None  # torch.distributed is not initialised here


def test_without_torch_distributed_the_step_is_unchanged():
    """The default ("auto") with no process group takes exactly the one-process step."""
    results = []
    for group in ("auto", None):
        model = w.make_model(torch.float64)
        opt = kalmanopt.create("koala-m", model.parameters(), process_group=group, **w.HP)
        w.train(model, opt, torch.float64, range(3), None)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_the_equality_script_reports_every_row_within_the_tolerance(equality):
    """benchmarks/distributed_equality.py's table (docs/distributed.md) from this launch's ranks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import distributed_equality

    rows = [line.split("|")[1:-1] for line in distributed_equality.table(equality).splitlines()
            if line.startswith("| float")]
    assert len(rows) == len(w.DTYPES) * 2
    for dtype, mode, worst, where, tolerance, identical in rows:
        assert float(worst) <= float(tolerance) and identical.strip() == "yes", (dtype, mode, where)


@pytest.mark.parametrize("world", [2, 3])
def test_matrix_stages_on_uneven_shards_equal_one_process(tmp_path, world):
    """koala-kron and koala-factored over two and three gloo ranks (DDP, and FSDP2 with uneven row shards and
    empty ones), refreshing every second step: each rank's parameters equal one process on the same samples."""
    ranks = _launch("structured", tmp_path / "out", world=world)
    for mode in ("ddp", "fsdp"):
        for preset in w.WHOLE_LAYER:
            ref = w.structured_reference(preset, world)
            for rank in range(world):
                params = ranks[rank][("structured", mode, preset)]
                assert _rel(params, ref) <= 1e-10, (mode, preset, world, rank, _rel(params, ref))
