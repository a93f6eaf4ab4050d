r"""
5. Training on several processes: DDP and FSDP2
===============================================

With data parallelism each process (a *rank*) computes the loss and the gradients of its own
slice of the global batch. For SGD or Adam that is all: DDP averages the gradients, every rank
takes the same step. A Kalman optimizer also *measures the loss*: :math:`L_k` is its measurement,
the online noise estimate :math:`R_k` follows the loss statistic :math:`s_k`, and the innovation
:math:`L_k - \hat L_k` scales the step. Each rank's own loss gives its own :math:`L_k`, its own
:math:`R_k` and its own innovation, hence a different step on every rank, although the gradients
agree, and the replicas drift apart.

kalmanopt therefore measures the **global** batch on every rank. This tutorial says what travels
between the ranks, then shows it: two CPU processes train a small network with DDP and with
FSDP2 (``fully_shard``), one process trains the same network on the whole global batch, and we
compare the parameters step by step, then turn the collective off to watch the drift.
"""

# %%
# What kalmanopt all-reduces
# --------------------------
#
# An optimizer step runs in two passes (see :doc:`../design`): pass 1 computes per-layer sums
# (:math:`\lVert H_k\rVert^2`, :math:`H_k\cdot v_{k-1}`, ...), the coefficients follow from those
# sums and the loss, and pass 2 updates every element. Between the two passes the step driver
# calls one hook, :func:`kalmanopt.engines.distributed.synchronize_update`, which packs into ONE
# tensor and sums with ONE ``all_reduce``:
#
# * this rank's loss moments :math:`\sum_i \ell_i`, :math:`\sum_i \ell_i^2` and the sample count
#   :math:`n`, so that every rank gets the global batch's :math:`L_k = \sum \ell / N` and
#   :math:`s_k`;
# * under FSDP2, where each rank holds only a shard of every parameter, the rows of the
#   per-layer sums of the sharded layers: each reduction is a sum over the layer's elements, so
#   the sum of the ranks' partial sums is the layer's.
#
# After it every rank holds the same numbers and computes the same coefficients; pass 2 then runs
# on the local shards, and nothing is gathered. Under DDP the gradients are already averaged by
# DDP, so the payload is 3 numbers; under FSDP2 it is 3 plus (sharded layers × reductions).
# (KOALA-M's predict adds a second all-reduce under FSDP2, for :math:`\lVert \bar w - \theta\rVert^2`
# over the shards; KOALA++, used here, has none.)
#
# The plain loop does not change: with ``torch.distributed`` initialised, the default
# ``process_group="auto"`` uses the default process group. ``process_group=None`` opts out.
#
# The training of one rank
# ------------------------
#
# A 64-32-10 network on scikit-learn's 8×8 digits. Every step draws a global batch of 64 images
# (the same on every rank, from a seeded generator); rank ``r`` of ``world`` trains on its
# contiguous slice. After every step we keep the whole parameters (``full_tensor()`` gathers an
# FSDP2 shard; that gather is for the comparison only) and count the ``all_reduce`` calls made
# inside ``opt.step`` with the size of what they carried.

import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

import kalmanopt

# this file (sphinx-gallery runs it from its own folder, without ``__file__``)
THIS_FILE = os.path.abspath(globals().get("__file__", "plot_05_distributed_training.py"))
PACKAGE_ROOT = str(Path(kalmanopt.__file__).resolve().parents[1])  # the ranks import this kalmanopt
STEPS = 40
GLOBAL_BATCH = 64
WORLD = 2
HP = {"sigma": 0.1, "q": 0.5, "lr": 2.0}

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
Y = torch.tensor(digits.target)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every run and on every rank
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """DDP, or FSDP2: shard each layer, then the root (what the runner does)."""
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter as a flat vector (gathers a DTensor shard)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).clone()


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> dict:
    """``STEPS`` plain-loop steps on this rank's slice; the parameters and the all-reduces per step."""
    trajectory, payloads = [], []
    calls: list[int] = []
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):  # counts the collectives made inside opt.step
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(Y), (GLOBAL_BATCH,), generator=g)
        idx = torch.tensor_split(idx, world)[rank]  # this rank's share of the global batch
        losses = F.cross_entropy(model(X[idx]), Y[idx], reduction="none")
        opt.zero_grad()
        losses.mean().backward()  # DDP / FSDP2 average the gradients over the ranks here
        calls.clear()
        dist.all_reduce = counted
        try:
            opt.step(loss=losses)
        finally:
            dist.all_reduce = original
        payloads.append(list(calls))
        trajectory.append(torch.cat([full(p) for p in model.parameters()]))
    return {"trajectory": torch.stack(trajectory), "payloads": payloads}


# %%
# Each rank joins a gloo process group (the CPU backend; on GPUs it would be NCCL), runs three
# trainings — DDP, FSDP2, and DDP with ``process_group=None`` — and saves what it saw into a
# temporary folder. The collective has a timeout, so a rank that dies cannot leave the other one
# waiting forever.


def run_rank(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine: one thread each
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        out = {}
        for name, mode, group in (("DDP", "ddp", "auto"), ("FSDP2", "fsdp", "auto"),
                                  ("DDP, process_group=None", "ddp", None)):
            model = wrap(make_model(), mode)
            opt = kalmanopt.create("koala++", model.parameters(), process_group=group, **HP)
            out[name] = train(model, opt, rank, WORLD)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if "KALMANOPT_TUTORIAL_RANK" in os.environ:  # this file run as one rank by ``launch`` below
    run_rank(int(os.environ["KALMANOPT_TUTORIAL_RANK"]), int(os.environ["KALMANOPT_TUTORIAL_PORT"]),
             os.environ["KALMANOPT_TUTORIAL_FOLDER"])
    raise SystemExit(0)


# %%
# Launching two processes
# -----------------------
#
# Each rank is a fresh Python process running this file with its rank in the environment (the
# lines just above send it to ``run_rank``): what ``torchrun`` does for a script, by hand. We ask the
# operating system for a free port (no clash with anything else running) and wait with a deadline:
# if the ranks have not finished in time they are killed and the tutorial fails with a clear
# message instead of hanging; a rank that fails shows its output.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folder: str, timeout: float = 240.0) -> list[dict]:
    port = free_port()
    ranks = []
    for rank in range(WORLD):
        env = dict(os.environ, KALMANOPT_TUTORIAL_RANK=str(rank), KALMANOPT_TUTORIAL_PORT=str(port),
                   KALMANOPT_TUTORIAL_FOLDER=folder, MPLBACKEND="Agg", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
        ranks.append(subprocess.Popen([sys.executable, THIS_FILE], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        for rank, proc in enumerate(ranks):
            output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            if proc.returncode != 0:
                raise RuntimeError(f"rank {rank} failed (exit {proc.returncode}):\n{output}")
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout:.0f} s") from None
    finally:
        for proc in ranks:  # clean shutdown: nothing outlives the launch
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return [torch.load(Path(folder) / f"rank{r}.pt") for r in range(WORLD)]


start = time.perf_counter()
with tempfile.TemporaryDirectory() as folder:
    ranks = launch(folder)
print(f"two ranks, three trainings of {STEPS} steps each: {time.perf_counter() - start:.1f} s")

# %%
# The reference: one process, the whole global batch of every step (no process group, so
# ``process_group="auto"`` is the one-process step).

model = make_model()
opt = kalmanopt.create("koala++", model.parameters(), **HP)
one = []
for step in range(STEPS):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, len(Y), (GLOBAL_BATCH,), generator=g)
    losses = F.cross_entropy(model(X[idx]), Y[idx], reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    opt.step(loss=losses)
    one.append(torch.cat([full(p) for p in model.parameters()]))
one = torch.stack(one)

# %%
# One collective per step
# -----------------------
#
# The number of ``all_reduce`` calls inside ``opt.step`` and the numbers each carried, on rank 0.
# Under DDP: one call of 3 numbers (the loss moments). Under FSDP2: one call, the 3 loss moments
# plus one row of per-layer sums (KOALA++'s pass 1 has six) for each of the four sharded
# parameters (two weights, two biases): 3 + 4 × 6 = 27 numbers. With ``process_group=None``:
# none.

for name, run in ranks[0].items():
    payloads = run["payloads"]
    same = all(p == payloads[1] for p in payloads[1:])
    print(f"{name:24s} step 0: {payloads[0]}, steps 1..{STEPS - 1}: {payloads[1]}"
          f"{' every step' if same else ' (varies)'}")

# %%
# The replicas equal one process
# ------------------------------
#
# The largest relative difference of the parameters, :math:`\max_i |\theta_i - \theta^{1}_i| /
# \max_i |\theta^{1}_i|`, after every step, between each rank and the one-process run
# :math:`\theta^1`, and between the two ranks.


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per step: max |a - b| / max |b| over the parameters."""
    return (a - b).abs().amax(dim=1) / b.abs().amax(dim=1)


curves = {}
for name in ranks[0]:
    vs_one = torch.maximum(*(rel(r[name]["trajectory"], one) for r in ranks))
    between = rel(ranks[0][name]["trajectory"], ranks[1][name]["trajectory"])
    curves[name] = (vs_one, between)
    print(f"{name:24s} vs one process: max {vs_one.max():.1e}, last {vs_one[-1]:.1e};"
          f"  rank 0 vs rank 1: max {between.max():.1e}")

# %%
# With the collective, DDP and FSDP2 stay at float32 rounding from the one-process run at every
# step: about 1e-7 at first, a few times 1e-6 at most after 40 steps (the sums over the batch and
# over the ranks are added in a different order, nothing more; in float64 the same comparison
# stays at about 1e-15). The two ranks are bit-identical, under DDP and, gathered, under
# FSDP2. Without it (``process_group=None``) each rank filters its own half of the batch: its own
# :math:`L_k`, :math:`R_k` and innovation, so the two ranks step differently although DDP gives
# them the same gradient, and they move away from each other and from the one-process
# run. A DDP model whose replicas differ is no longer one model: nothing brings them back, and
# every later gradient is averaged over replicas that disagree.

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
styles = {"DDP": "C0", "FSDP2": "C1", "DDP, process_group=None": "C3"}
for name, (vs_one, between) in curves.items():
    steps = range(1, STEPS + 1)
    axes[0].semilogy(steps, vs_one.clamp_min(1e-12), color=styles[name], label=name)
    axes[1].semilogy(steps, between.clamp_min(1e-12), color=styles[name], label=name)
axes[0].set_title("each rank vs one process on the global batch")
axes[1].set_title("rank 0 vs rank 1 (identical ranks: 0, drawn at 1e-12)")
for ax in axes:
    ax.axhline(torch.finfo(torch.float32).eps, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
axes[0].set_ylabel("largest relative difference of the parameters")
axes[0].legend()
fig.tight_layout()
plt.show()

# %%
# The dotted line is float32's machine epsilon.
#
# Checkpoints
# -----------
#
# Under FSDP2 the filter state is sharded like the parameters (each state vector has the length of
# the local shard). :func:`kalmanopt.engines.distributed.save_checkpoint` and
# :func:`~kalmanopt.engines.distributed.load_checkpoint` go through ``torch.distributed.checkpoint``:
# each per-layer state vector is saved shaped as its parameter, with the parameter's mesh and
# placements, so a checkpoint saved on two ranks loads on one, or on four, and the other way
# round::
#
#     from kalmanopt.engines.distributed import load_checkpoint, save_checkpoint
#
#     save_checkpoint(opt, "ckpt/step1000", model.state_dict())   # on every rank
#     state = model.state_dict()
#     load_checkpoint(opt, "ckpt/step1000", state)
#     model.load_state_dict(state)
#
# Under DDP the state is replicated, so the plain ``opt.state_dict()`` of rank 0 works too.
#
# With the runner
# ---------------
#
# The experiment runner (:doc:`../runner`) does all of this from a config: add
# ``distributed = "ddp"`` or ``distributed = "fsdp"`` and launch it with ``torchrun``, which
# starts the processes and sets each one's rank::
#
#     torchrun --nproc-per-node 2 -m kalmanopt.cli run configs/my.toml --out runs/my
#
# ``batch_size`` is then the global batch; each rank trains its contiguous slice of every
# minibatch, rank 0 writes the results folder. On GPUs use NCCL; nothing else changes. The
# details, the refused inputs and the measurements are in :doc:`../distributed`.
