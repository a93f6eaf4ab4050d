"""``state_dtype="bfloat16"``: per-layer vectors stored in bfloat16, written with stochastic rounding.

The rounding itself (one of the two neighbours, exact where the value is representable, unbiased, NaN and
infinities kept, the documented hash), the option's checks, and what the state does with it on the torch
engines: its precision, training beside float32 state, checkpoints that resume the same roundings, a change
of the option between steps. The fused engine's kernels are compared with these engines in
``tests/test_fast_gpu.py`` (on a GPU, and on the CPU in Triton's interpreter).
"""

from __future__ import annotations

import io
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kalmanopt
from kalmanopt.engines import rounding

PRESETS = ("koala++", "koala-m", "koala-diag", "koala-adam-steady", "koala-adam", "koala++-lr", "koala-kron")
M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------- the rounding
def _mix_python(x: int) -> int:
    """The finaliser written with Python integers, from the constants the module documents."""
    s1, m1, s2, m2, s3 = rounding.MIX
    x ^= x >> s1
    x = (x * m1) & M32
    x ^= x >> s2
    x = (x * m2) & M32
    return x ^ (x >> s3)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values next to each float32 ``x``: its pattern cut to the high half, and the next one out."""
    bits = x.view(torch.int32)
    low = (bits & -65536).view(torch.float32)
    high = ((bits & -65536) + 65536).view(torch.float32)
    return low, high


def test_the_hash_is_the_documented_formula():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]
    got = rounding.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_mix_python(v) for v in values]
    steps = torch.tensor(7, dtype=torch.int64)
    key = rounding.rounding_key(steps, 3, 5, "v")
    k = _mix_python((7 ^ ((3 * 0x9E3779B9) & M32)) & M32)
    k = _mix_python(k ^ 5)
    assert int(key) == _mix_python(k ^ zlib.crc32(b"v"))
    for some in (key, torch.tensor(0), torch.tensor(2**32 - 1), torch.tensor(2**31)):
        bits = rounding.random_bits(some, 5000).tolist()
        assert bits == [_mix_python(i ^ int(some)) & 0xFFFF for i in range(5000)]
        assert rounding.random_bits(some, 7, 2**31 - 7).tolist() == [
            _mix_python(i ^ int(some)) & 0xFFFF for i in range(2**31 - 7, 2**31)]


def test_a_vector_rounded_in_pieces_draws_the_bits_of_one_piece(monkeypatch):
    x = torch.randn(1000) * 1e3
    key = torch.tensor(99)
    whole, pieces = (torch.empty(1000, dtype=torch.bfloat16) for _ in range(2))
    rounding.round_into(whole, x, key)
    monkeypatch.setattr(rounding, "CPU_PIECE", 64)
    rounding.round_into(pieces, x, key)
    assert torch.equal(whole, pieces)


@settings(max_examples=200)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64),
       st.integers(0, 2**32 - 1))
def test_a_rounded_value_is_one_of_its_two_neighbours(values, key):
    x = torch.tensor(values, dtype=torch.float32)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    rounding.round_into(out, x, torch.tensor(key, dtype=torch.int64))
    low, high = _neighbours(x)
    got = out.float()
    assert bool(((got == low) | (got == high)).all())
    representable = x == x.to(torch.bfloat16).float()
    assert torch.equal(got[representable], x[representable])  # (±0 included: the sign is kept)
    assert torch.equal(torch.signbit(got), torch.signbit(x))


def test_nan_and_infinities_are_kept():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    for key in range(20):
        out = torch.empty(5, dtype=torch.bfloat16)
        rounding.round_into(out, x, torch.tensor(key))
        got = out.float()
        assert math.isnan(got[0]) and got[1] == float("inf") and got[2] == -float("inf")
        assert torch.equal(torch.signbit(got[3:]), torch.tensor([True, False]))


@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.14159, 1e-30, 7.5e5 + 0.3, 1.0 + 2**-20])
def test_the_rounding_is_unbiased(value):
    """Over many keys the mean of the rounded values is the value, within the sampling error; round-to-nearest
    is off by up to half a gap."""
    n = 1 << 16
    x = torch.full((n,), value, dtype=torch.float32)
    out = torch.empty(n, dtype=torch.bfloat16)
    rounding.round_into(out, x, torch.tensor(12345))  # (a new draw per element: one key, many indices)
    low, high = _neighbours(x[:1])
    gap = abs(float(high - low))  # (for a negative value the "high" neighbour is the one further from zero)
    mean = float(out.double().mean())
    exact = float(torch.tensor(value, dtype=torch.float32))
    p = abs(exact - float(low)) / gap
    sigma = gap * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(mean - exact) <= 5 * sigma + 1e-12 * abs(exact)


def test_different_keys_and_indices_draw_different_bits():
    a = rounding.random_bits(torch.tensor(1), 4096)
    b = rounding.random_bits(torch.tensor(2), 4096)
    assert float((a == b).double().mean()) < 0.01
    assert a.unique().numel() > 3900  # (of 65536 values: few repeats in 4096 draws)


# ---------------------------------------------------------------------------- the option
def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x.to(dtype), x[:, :4].argmax(1)


def _steps(model, opt, n, api="step"):
    x, y = _data(next(model.parameters()).dtype)
    for _ in range(n):
        if api == "two-phase":
            opt.predict()
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        if api == "step":
            opt.step(loss=losses)
        else:
            opt.update(losses.mean(), (losses.detach() ** 2).mean())
    return float(F.cross_entropy(model(x), y).detach())


@pytest.mark.parametrize("bad,error", [("float16", ValueError), (torch.float16, ValueError), (16, TypeError),
                                       ("bf16", ValueError)])
def test_a_bad_state_dtype_is_refused_naming_the_choices(bad, error):
    with pytest.raises(error, match="bfloat16"):
        kalmanopt.create("koala++", _model().parameters(), state_dtype=bad)


def test_torch_bfloat16_is_accepted_and_stored_as_its_name():
    opt = kalmanopt.create("koala++", _model().parameters(), state_dtype=torch.bfloat16)
    assert opt.param_groups[0]["state_dtype"] == "bfloat16"
    assert kalmanopt.create("koala++", _model().parameters()).param_groups[0]["state_dtype"] is None


def test_a_bad_value_written_into_a_group_refuses_the_step_and_changes_nothing():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), state_dtype="bfloat16")
    _steps(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["state_dtype"] = "int8"
    with pytest.raises(ValueError, match="state_dtype"):
        _steps(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------- the state
@pytest.mark.parametrize("implementation", ["reference", "foreach"])
@pytest.mark.parametrize("preset", PRESETS)
def test_vectors_are_stored_in_bfloat16_and_the_rest_in_float32(preset, implementation):
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, state_dtype="bfloat16")
    _steps(model, opt, 3)
    table = kalmanopt.plan.state_table(opt.filter)
    kept = set(table.stored_vector_keys)  # (empty for koala-kron: its factors and workspace stay float32)
    assert kept or preset == "koala-kron"
    for p in model.parameters():
        for name, t in opt.state[p].items():
            if not t.is_floating_point():
                continue
            want = torch.bfloat16 if name in kept else torch.float32
            assert t.dtype == want, (name, t.dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("api", ["step", "two-phase"])
def test_the_torch_engines_round_alike(preset, api):
    """reference and foreach run the same arithmetic and draw the same bits: the same bfloat16 state."""
    results = []
    for implementation in ("reference", "foreach"):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, state_dtype="bfloat16",
                               weight_decay=1e-3)
        _steps(model, opt, 6, api)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.state_dict()["state"]))
    (a, sa), (b, sb) = results
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for key in sa:
        for name, t in sa[key].items():
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                same = float((t == sb[key][name]).double().mean())
                assert same > 0.99, (key, name, same)  # (a float32 rounding apart can pick the other neighbour)


@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-adam-steady", "koala-diag"])
def test_training_with_bfloat16_state_follows_float32_state(preset):
    """Over 40 steps of a small classifier, bfloat16 state learns as float32 state does: their final losses
    are within 2 % of the starting loss."""
    losses = {}
    for state_dtype in (None, "bfloat16"):
        model = _model()
        opt = kalmanopt.create(preset, model.parameters(), state_dtype=state_dtype, weight_decay=1e-3)
        start = _steps(model, opt, 0)
        losses[state_dtype] = _steps(model, opt, 40)
    assert losses["bfloat16"] < 0.8 * start
    assert abs(losses["bfloat16"] - losses[None]) <= 0.02 * start


@pytest.mark.parametrize("implementation", ["reference", "foreach"])
@pytest.mark.parametrize("preset", ["koala++", "koala-m", "koala-adam-steady"])
def test_a_checkpoint_resumes_the_same_roundings(preset, implementation):
    """The random bits are a function of the group's step counter: a resumed run equals the straight run."""
    model = _model()
    opt = kalmanopt.create(preset, model.parameters(), implementation=implementation, state_dtype="bfloat16")
    _steps(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, 4)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert all(t.dtype == torch.bfloat16 for name, t in saved["opt"]["state"][0].items()
               if name in kalmanopt.plan.state_table(opt.filter).stored_vector_keys)
    again = _model()
    again.load_state_dict(saved["model"])
    resumed = kalmanopt.create(preset, again.parameters(), implementation=implementation)  # (the groups say bf16)
    resumed.load_state_dict(saved["opt"])
    _steps(again, resumed, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    for key, items in opt.state_dict()["state"].items():
        for name, t in items.items():
            if isinstance(t, torch.Tensor):
                other = resumed.state_dict()["state"][key][name]
                assert t.dtype == other.dtype and torch.equal(t, other), (key, name)


def test_a_float32_checkpoint_loads_into_bfloat16_state_where_its_groups_ask():
    """A checkpoint's groups carry ``state_dtype``: a float32 one written with the option switched on loads
    its vectors into bfloat16 (as a change between steps does)."""
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters())
    _steps(model, opt, 3)
    state = opt.state_dict()
    state["param_groups"][0]["state_dtype"] = "bfloat16"
    other = kalmanopt.create("koala++", _model().parameters())
    other.load_state_dict(state)
    p = next(iter(other.param_groups[0]["params"]))
    assert other.state[p]["v"].dtype == torch.bfloat16 and other.state[p]["S"].dtype == torch.float32


def test_the_option_changed_between_steps_moves_the_vectors():
    model = _model()
    opt = kalmanopt.create("koala-adam-steady", model.parameters())
    _steps(model, opt, 3)
    p = model[0].weight
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    _steps(model, opt, 1)
    assert opt.state[p]["m"].dtype == torch.bfloat16 and opt.state[p]["k"].dtype == torch.float32
    opt.param_groups[0]["state_dtype"] = None
    _steps(model, opt, 1)
    assert opt.state[p]["m"].dtype == torch.float32
    assert math.isfinite(_steps(model, opt, 2))


def test_global_granularity_and_float64_parameters():
    model = _model()
    opt = kalmanopt.create("koala++", model.parameters(), state_dtype="bfloat16", granularity="global")
    _steps(model, opt, 3)
    state = opt.state["group0"]["global"]
    assert state["v"].dtype == torch.bfloat16 and state["S"].dtype == torch.float32
    model = _model(torch.float64)
    opt = kalmanopt.create("koala++", model.parameters(), state_dtype="bfloat16")
    _steps(model, opt, 3)
    assert opt.state[model[0].weight]["v"].dtype == torch.bfloat16
    assert opt.state[model[0].weight]["S"].dtype == torch.float64


def test_the_state_takes_half_the_memory():
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    sizes = {}
    for state_dtype in (None, "bfloat16"):
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
        opt = kalmanopt.create("koala++", model.parameters(), state_dtype=state_dtype)
        x = torch.randn(16, 256)
        losses = F.cross_entropy(model(x), torch.zeros(16, dtype=torch.long), reduction="none")
        losses.mean().backward()
        opt.step(loss=losses)
        sizes[state_dtype] = state_bytes(opt)
    assert 0.49 <= sizes["bfloat16"] / sizes[None] <= 0.51
