"""Replaying a whole ``step`` of the fused or foreach engine as one CUDA graph (no host work per layer).

A step of the fused engine launches its two generated kernels and the parts' batched coefficient
functions: a few dozen small operations on ``[layers]`` tensors whose launch costs more host time
than the kernels take on the GPU; a step of the foreach engine on CUDA launches a few hundred. An
engine takes part by ``graph_token(ctx)``: what a capture of its step depends on (buffers, plans),
or None where its step cannot be replayed. Once a one-group optimizer reaches a steady state (same
parameters, gradient buffers and state tensors, same hyper-parameters but η), the step is captured
once and replayed: the loss, the statistic and η are copied into the graph's inputs, the graph runs
the update and the next predict, and the step's code is reported as usual.

The graph is dropped (and the step runs eagerly, then is captured again) whenever something it baked
in changes: a gradient or parameter buffer moves, the state is replaced (``load_state_dict``), a
hyper-parameter other than ``lr`` changes, or the loss changes shape or dtype. Steps of an
optimizer with ``strict=True`` or ``track_diagnostics=True``, of several groups, of a distributed
run, or taken while the caller itself captures a graph run eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kalmanopt.contract import CODE_SKIPS
from kalmanopt.engines import driver, matrix_stages
from kalmanopt.engines.distributed import process_group
from kalmanopt.engines.runtime import OptimizerView
from kalmanopt.engines.torch_ops import GroupContext

__all__ = ["graphed_step", "WARMUP_STEPS"]

#: steady steps run eagerly before a capture (they create every buffer the graph then reuses)
WARMUP_STEPS = 2


class _StepGraph:
    """One optimizer's captured step and its inputs."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.token: Any = None
        self.warm = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None
        self.statistic: Tensor | None = None
        self.lr: Tensor | None = None
        self.code: Tensor | None = None


def _key(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> tuple | None:
    """What the graph bakes in, or None where a step cannot be replayed."""
    if len(opt.param_groups) != 1 or opt.strict or opt.track_diagnostics or not opt.runtime.predicted:
        return None
    if process_group(opt) is not None:
        return None  # (a distributed step all-reduces between its passes: it is not replayed)
    group = opt.param_groups[0]
    params = group["params"]
    if not params or params[0].device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    hp = tuple(sorted((k, v) for k, v in group.items()
                      if k not in ("params", "lr") and (v is None or isinstance(v, (bool, int, float, str)))))
    stat = None if statistic is None else (statistic.dtype, tuple(statistic.shape))
    return (id(params), len(params), hp, loss.dtype, tuple(loss.shape), loss.device, stat)


def graphed_step(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> bool:
    """Run ``step``'s update and predict by replaying a captured graph; ``False`` if it must run eagerly."""
    key = _key(opt, loss, statistic)
    if key is None:
        return False
    group = opt.param_groups[0]
    if not matrix_stages.fixed_every_step(opt.filter, group, opt.runtime):
        return False  # a stage run every k-th step: not the same work at every replay
    engine = driver.engine_for(opt, 0, group)
    token_of = getattr(engine, "graph_token", None)
    if token_of is None:
        return False
    ctx = GroupContext(opt.filter, group, opt.group_state(0), lambda: opt.layers(0), state=opt.state,
                       runtime=opt.runtime)
    token = token_of(ctx)
    sg = opt.runtime.graph
    if token is None or sg is None or sg.key != key or sg.token != token:
        sg = _StepGraph(key)
        sg.token = token
        opt.runtime.graph = sg
        return False  # this step runs eagerly (and warms the new state up)
    if sg.graph is None:
        if sg.warm < WARMUP_STEPS:
            sg.warm += 1
            return False
        device = loss.device
        sg.loss = loss.detach().clone()
        sg.statistic = None if statistic is None else statistic.detach().clone()
        sg.lr = torch.full((), float(group["lr"]), dtype=torch.float64, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            code = driver.run_update(opt, sg.loss, sg.statistic, lr=sg.lr, ride_predict=True)
            driver.run_predict(opt, (code & CODE_SKIPS) == 0, ridden=True)
        sg.code, sg.graph = code, graph
    sg.loss.copy_(loss.detach(), non_blocking=True)  # type: ignore[union-attr]
    if statistic is not None:
        sg.statistic.copy_(statistic.detach(), non_blocking=True)  # type: ignore[union-attr]
    sg.lr.fill_(float(group["lr"]))  # type: ignore[union-attr]
    sg.graph.replay()
    opt.runtime.predicted = True
    driver.report(opt, sg.code)  # type: ignore[arg-type]
    return True
