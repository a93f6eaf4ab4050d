"""Replaying a whole ``step`` of the fused or foreach engine as one CUDA graph (no host work per layer).

A step of the fused engine launches its two generated kernels and the parts' batched coefficient functions:
a few dozen small operations on ``[layers]`` tensors whose launch costs more host time than the kernels take
on the GPU; a step of the foreach engine on CUDA launches a few hundred. An engine takes part by
``graph_token(ctx)``: what a capture of its step depends on (buffers, plans), or None where its step cannot
be replayed. Once an optimizer reaches a steady state (same parameters and state tensors, same
hyper-parameters but η), the step is captured once and replayed: the loss, the statistic and each group's η
are copied into the graph's inputs, the graph runs the update and the next predict, and the step's code is
reported as usual.

The graph is dropped (and the step runs eagerly, then is captured again) whenever something it baked in
changes: a parameter buffer moves, the state is replaced (``load_state_dict``), a hyper-parameter other than
``lr`` changes, or the loss changes shape or dtype. Gradient buffers may move (torch's ``zero_grad()`` frees
them) where the engine follows them (the fused engine's offset table, rewritten before the replay); the
foreach engine, a staged copy and a matrix stage capture their addresses, so a move there captures again.
Several parameter groups (weight decay on the matrices only, a learning rate per group) are captured
together, each group's η an input of its own. Steps of an optimizer with ``strict=True`` or
``track_diagnostics=True``, of a distributed run, with a group whose engine cannot be replayed, or taken
while the caller itself captures a graph run eagerly.
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
        self.lr: list[Tensor] = []  # one 0-d η per group
        self.code: Tensor | None = None


def _plain_hyperparameters(group: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in group.items()
                        if k not in ("params", "lr") and (v is None or isinstance(v, (bool, int, float, str)))))


def _key(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> tuple | None:
    """What the graph bakes in, or None where a step cannot be replayed."""
    groups = opt.param_groups
    if not groups or opt.strict or opt.track_diagnostics or not opt.runtime.predicted:
        return None
    if process_group(opt) is not None:
        return None  # (a distributed step all-reduces between its passes: it is not replayed)
    if any(not group["params"] or group["params"][0].device.type != "cuda" for group in groups):
        return None
    if torch.cuda.is_current_stream_capturing():
        return None
    layout = tuple((id(group["params"]), len(group["params"]), _plain_hyperparameters(group)) for group in groups)
    stat = None if statistic is None else (statistic.dtype, tuple(statistic.shape))
    return (layout, loss.dtype, tuple(loss.shape), loss.device, stat)


def _token(opt: OptimizerView) -> tuple | None:
    """Every group's engine token (what a capture of its step depends on), or None if one cannot be replayed."""
    tokens = []
    for index, group in enumerate(opt.param_groups):
        if not matrix_stages.fixed_every_step(opt.filter, group, opt.runtime):
            return None  # a stage run every k-th step: not the same work at every replay
        engine = driver.engine_for(opt, index, group)
        token_of = getattr(engine, "graph_token", None)
        if token_of is None:
            return None
        ctx = GroupContext(opt.filter, group, opt.group_state(index), lambda index=index: opt.layers(index),
                           state=opt.state, runtime=opt.runtime, index=index)
        token = token_of(ctx)
        if token is None:
            return None
        if matrix_stages.has_stages(opt.filter, group, opt.runtime):
            # (the stages stack the gradients themselves: a capture reads the buffers it saw)
            token = (token, tuple(0 if p.grad is None else p.grad.data_ptr() for p in group["params"]))
        tokens.append(token)
    return tuple(tokens)


def graphed_step(opt: OptimizerView, loss: Tensor, statistic: Tensor | None) -> bool:
    """Run ``step``'s update and predict by replaying a captured graph; ``False`` if it must run eagerly."""
    key = _key(opt, loss, statistic)
    if key is None:
        return False
    token = _token(opt)
    if token is None:
        return False
    sg = opt.runtime.graph
    if sg is None or sg.key != key or sg.token != token:
        sg = _StepGraph(key)
        sg.token = token
        opt.runtime.graph = sg
        return False  # this step runs eagerly (and warms the new state up)
    groups = opt.param_groups
    if sg.graph is None:
        if sg.warm < WARMUP_STEPS:
            sg.warm += 1
            return False
        device = loss.device
        sg.loss = loss.detach().clone()
        sg.statistic = None if statistic is None else statistic.detach().clone()
        sg.lr = [torch.full((), float(group["lr"]), dtype=torch.float64, device=device) for group in groups]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            code = driver.run_update(opt, sg.loss, sg.statistic, lr=sg.lr, ride_predict=True)
            driver.run_predict(opt, (code & CODE_SKIPS) == 0, ridden=True)
        sg.code, sg.graph = code, graph
    sg.loss.copy_(loss.detach(), non_blocking=True)  # type: ignore[union-attr]
    if statistic is not None:
        sg.statistic.copy_(statistic.detach(), non_blocking=True)  # type: ignore[union-attr]
    for lr, group in zip(sg.lr, groups):
        lr.fill_(float(group["lr"]))
    sg.graph.replay()
    opt.runtime.predicted = True
    driver.report(opt, sg.code)  # type: ignore[arg-type]
    return True
