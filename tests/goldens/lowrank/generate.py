"""Whole-run float64 numbers of the per-layer LowRankSurrogate before the two-pass contract.

Generated once at commit e8014cf (the last commit whose ``kalmanopt/covariance/lowrank.py`` computed
the surrogate per layer with ``gain()``), on the reference engine, with::

    PYTHONPATH=$PWD python3 tests/goldens/lowrank/generate.py tests/goldens/lowrank/previous_implementation.json

``tests/test_lowrank_contract.py`` replays the runs on every engine and compares to 1e-10.
The runs with guard restarts were chosen among those whose restarts do not amplify rounding: the
previous implementation itself, started from parameters perturbed by 1e-16 (relative), ends
within 1e-12 of its own run (some settings with restarts amplify it to 1e-11, too close to the
comparison's bound to tell a changed algorithm from a changed rounding).
"""
import json
import sys

import torch
import torch.nn.functional as F

import kalmanopt


def mlp(sizes, seed):
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], dtype=torch.float64))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def data(sizes, seed, steps, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, sizes[0], generator=gen, dtype=torch.float64),
             torch.randint(0, sizes[-1], (batch,), generator=gen)) for _ in range(steps)]


CASES = [
    dict(name="m2-symmetric", sizes=[5, 4, 3], seed=1, steps=12, kw=dict(memory=2)),
    dict(name="m3-symmetric-wd", sizes=[5, 6, 4, 3], seed=2, steps=12, kw=dict(memory=3, weight_decay=5e-4)),
    dict(name="m3-vanilla", sizes=[5, 4, 3], seed=3, steps=12,
         compose=dict(surrogate="lowrank", estimator="vanilla", memory=3), kw=dict(q=0.1)),
    dict(name="m4-symmetric-q0", sizes=[4, 3, 3], seed=4, steps=15, kw=dict(memory=4, q=0.0, sigma=1.0)),
    dict(name="m2-vanilla-restarts", sizes=[4, 3, 3], seed=9, steps=15,
         compose=dict(surrogate="lowrank", estimator="vanilla", memory=2), kw=dict(q=0.0, sigma=10.0, r=0.01)),
    dict(name="m3-symmetric-restarts", sizes=[4, 3, 3], seed=8, steps=15, kw=dict(memory=3, q=0.0, sigma=1.0, r=0.1)),
    dict(name="m2-symmetric-skips", sizes=[4, 3, 3], seed=6, steps=15, kw=dict(memory=2, q=0.0, sigma=1.0, r=0.001)),
]

if __name__ != "__main__":
    CASES = []
out = []
for case in CASES:
    model = mlp(case["sizes"], case["seed"])
    init = torch.nn.utils.parameters_to_vector(model.parameters()).detach().tolist()
    if "compose" in case:
        comp = kalmanopt.compose(**case["compose"])
        opt = kalmanopt.KalmanOptimizer(model.parameters(), comp, implementation="reference", **case["kw"])
    else:
        opt = kalmanopt.create("koala++-lr", model.parameters(), implementation="reference", **case["kw"])
    traj = {}
    # inputs rounded to 3 decimals so that the golden stores them in few characters
    batches = [(torch.round(x * 1e3) / 1e3, y) for x, y in data(case["sizes"], case["seed"], case["steps"])]
    snap = sorted({1, 2, 3, case["steps"] // 2, case["steps"]})
    for k, (x, y) in enumerate(batches, 1):
        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses)
        if k in snap:
            traj[str(k)] = torch.nn.utils.parameters_to_vector(model.parameters()).detach().tolist()
    counters = opt.diagnostics()["counters"]
    rows_kept = [int(opt.state[p]["rows_kept"]) for p in model.parameters()]
    out.append(dict(name=case["name"], sizes=case["sizes"], seed=case["seed"], steps=case["steps"],
                    compose=case.get("compose"), keywords=case["kw"], initial=init, parameters=traj,
                    inputs=[x.tolist() for x, _ in batches], targets=[y.tolist() for _, y in batches],
                    counters={k: int(v) for k, v in counters.items()}, rows_kept=rows_kept))
    print(case["name"], {k: int(v) for k, v in counters.items()}, rows_kept)
if __name__ == "__main__":
    json.dump(out, open(sys.argv[1], "w"))
