"""A rank whose gradients differ from the others' (issue 27, item 1; kalmanopt/engines/ranks.py).

Both APIs: ``step(loss=...)`` and the two-phase ``predict()``/``update(mean, statistic)``.

Gloo on the CPU, 2 and 3 ranks, DDP and FSDP2, each rank in turn the odd one: its gradients dropped
(all of them, or one layer's), an empty micro-batch, and no rank with a gradient. Every rank takes
part in the step's one all-reduce, and all do the same: refuse together (a layer's gradient on some
ranks only), skip together (on none), or step together (an empty micro-batch adds no samples).
Before, the odd rank left ``step()`` before the all-reduce: gloo failed with a collective mismatch.
"""

from __future__ import annotations

import distributed_worker as w
import pytest
import torch

CASES = [(mode, preset, case) for mode in ("ddp", "fsdp") for preset in w.ODD_PRESETS
         for case in ("dropped", "one layer", "empty", "none", "dropped (update)", "none (update)")]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory) -> tuple[dict, ...]:
    return w.launch("odd", tmp_path_factory.mktemp(f"odd-{request.param}"), world=request.param)


def _runs(ranks, mode, preset, case):
    odds = range(len(ranks)) if not case.startswith("none") else (0,)
    for odd in odds:
        yield odd, [r[("odd", mode, preset, case, odd)] for r in ranks]


@pytest.mark.parametrize("mode, preset, case", CASES, ids=["-".join(c) for c in CASES])
def test_every_rank_does_the_same_whatever_the_odd_rank_lacks(ranks, mode, preset, case):
    k = w.predict_collectives(preset) if mode == "fsdp" else 0
    for odd, runs in _runs(ranks, mode, preset, case):
        outcomes = {run[1].split(":")[0] for run in runs}
        assert len(outcomes) == 1, (odd, [run[1] for run in runs])  # all ranks alike
        for rank, (first, what, calls, unchanged, after, _params, counters) in enumerate(runs):
            assert first == "stepped" and after == "stepped", (odd, rank, first, after)
            if case in ("dropped", "one layer", "dropped (update)"):
                assert what.startswith("refused: the ranks disagree"), (odd, rank, what)
                layer = "layer 2" if case == "one layer" else "layer 0"
                assert f"group 0, {layer} has a gradient on {len(ranks) - 1} of {len(ranks)} ranks" in what
                assert calls == 1 and unchanged, (odd, rank, calls, unchanged)
                assert counters["steps"] == 2
            elif case.startswith("none"):
                call = "update()" if case.endswith("(update)") else "step()"
                assert what.startswith(f"warned: {call} found no gradient"), (odd, rank, what)
                assert calls == 1 and unchanged and counters["steps"] == 2, (odd, rank, calls, unchanged)
            else:  # an empty micro-batch: the step runs on every rank, one collective (+ a sharded predict's)
                assert what == "stepped" and calls == 1 + k and not unchanged, (odd, rank, what, calls)
                assert counters["steps"] == 3 and counters["nonfinite_steps"] == 0
        # the ranks hold the same weights (DDP's replicas; FSDP2's gathered shards)
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0][5], run[5])), (odd, mode, preset, case)
            assert all(bool(torch.isfinite(a).all()) for a in run[5])
