"""``distributed = "ddp" | "fsdp"``: a grid trained by several processes that ``torchrun`` started.

Every rank runs the same runs in the same order; each takes its slice of every global minibatch
(``batch_size`` is the global batch), the model is wrapped in ``DistributedDataParallel`` or
sharded with FSDP2's ``fully_shard`` (each top-level child module, then the root), and the Kalman
optimizers measure the global batch (:mod:`kalmanopt.engines.distributed`). Rank 0 writes the
results; the other ranks write into a throw-away folder. Launch::

    torchrun --nproc-per-node 2 -m kalmanopt.cli run configs/my.toml --out runs/my
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from kalmanopt.runner.errors import ConfigError

__all__ = ["MODES", "Launch", "launch", "device_of", "wrap_model", "local_batch", "global_mean", "finish",
           "check_mode"]

#: the values of the ``distributed`` key
MODES = ("none", "ddp", "fsdp")


class Launch:
    """This process's place in a distributed grid (``world == 1``: not distributed)."""

    def __init__(self, mode: str = "none", rank: int = 0, world: int = 1) -> None:
        self.mode, self.rank, self.world = mode, rank, world

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.mode != "none"

    @property
    def writes(self) -> bool:
        """Whether this process writes the results (rank 0)."""
        return self.rank == 0


def launch(mode: str, device: torch.device) -> Launch:
    """Join the process group ``torchrun`` set up (gloo on the CPU, NCCL on CUDA); ``"none"``: nothing.

    Raises:
        ConfigError: ``distributed`` is set but the process was not started by ``torchrun``.
    """
    if mode == "none":
        return Launch()
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"distributed = {mode!r} needs the processes torchrun starts: torchrun --nproc-per-node N "
                          "-m kalmanopt.cli run CONFIG --out FOLDER (or set distributed = \"none\")")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Launch(mode, dist.get_rank(), dist.get_world_size())


def device_of(config_device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else the config's."""
    if config_device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    return config_device


def wrap_model(model: nn.Module, run: Launch) -> nn.Module:
    """The model as the ranks train it: DDP, or FSDP2 (each top-level child sharded, then the root)."""
    if run.mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if run.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
    return model


def local_batch(inputs: Tensor, targets: Tensor, run: Launch) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of a global minibatch."""
    if not run.active:
        return inputs, targets
    return torch.tensor_split(inputs, run.world)[run.rank], torch.tensor_split(targets, run.world)[run.rank]


def global_mean(value: Tensor, run: Launch) -> Tensor:
    """The mean over the ranks of a per-rank value (for the logged training loss)."""
    if not run.active:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / run.world


def finish(run: Launch) -> None:
    """The end of a distributed grid: every rank waits until rank 0 has written everything."""
    if run.active:
        import torch.distributed as dist

        dist.barrier()


def check_mode(value: Any) -> str | None:
    """The problem with a ``distributed`` value, or None."""
    if value not in MODES:
        return f"distributed must be one of {', '.join(repr(m) for m in MODES)}, got {value!r}"
    return None
