"""Muon as its documentation prescribes: Muon for the hidden weight matrices, AdamW for the rest.

``torch.optim.Muon`` accepts 2-D parameters only, and its documentation (and Keller Jordan's, who
introduced it) says the other parameters (embeddings, the classifier head, norms' gains, biases)
belong to a standard optimizer such as AdamW. :class:`MuonWithAdamW` is that pair as one
``torch.optim.Optimizer``: one ``step()`` steps both, and ``param_groups``, ``state``,
``state_dict()``, ``load_state_dict()`` and ``zero_grad()`` are the ordinary ones (the groups of
both halves in one list, the state of both in one dict), so a learning-rate scheduler scales both
halves' ``lr``, gradient clipping sees every parameter, and a checkpoint resumes exactly.

Which parameters are hidden matrices (:func:`muon_param_groups`), given the model:

- a **hidden matrix** is a 2-D parameter held by an ``nn.Linear`` that is not the model's
  **output layer** (the last ``nn.Linear`` in ``model.modules()`` order, which is where every model
  of :mod:`kalmanopt.runner.models` registers its head) and that is not also held by an
  ``nn.Embedding`` (a GPT's tied head is its token embedding);
- everything else goes to AdamW: embeddings, the output layer, norms' gains, biases, scalars, and
  convolution filters (``torch.optim.Muon`` takes 2-D parameters only; Keller Jordan's variant that
  flattens filters is not torch's).

Without a model (plain tensors), the 2-D tensors are taken as the hidden matrices. Groups may also
be given ready-made, each with ``use_muon = True`` or ``False``.

Keywords: Muon's own (``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``ns_coefficients``,
``eps``, ``ns_steps``, ``adjust_lr_fn``) for the matrices, and ``adamw_lr``, ``adamw_betas``,
``adamw_eps``, ``adamw_weight_decay`` for the rest. The defaults are the issue's measurement:
``adjust_lr_fn = "match_rms_adamw"`` (Moonshot's scaling, so that Muon's ``lr`` is on AdamW's scale),
momentum 0.95 with Nesterov, and AdamW at lr 1e-3 (torch's other AdamW defaults) for the rest. The
``adamw_lr`` is absolute: sweeping ``lr`` moves the matrices' rate only.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Muon, Optimizer

__all__ = ["MuonWithAdamW", "muon_param_groups", "output_layer"]


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer: its last ``nn.Linear`` in ``model.modules()`` order (None if it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def muon_param_groups(model: nn.Module, params: Iterable[Tensor] | None = None) -> list[dict[str, Any]]:
    """The parameter groups of :class:`MuonWithAdamW` for ``model`` (see the module docstring for the rule).

    Args:
        model: the model whose modules decide which parameters are hidden matrices.
        params: the parameters to optimize (default: ``model.parameters()``); one not in ``model``
            is split by its shape alone (2-D: Muon).

    Returns:
        ``[{"params": hidden matrices, "use_muon": True}, {"params": the rest, "use_muon": False}]``,
        leaving out a group that would be empty.
    """
    head = output_layer(model)
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    in_linears = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    excluded = embedded | ({id(p) for p in head.parameters(recurse=False)} if head is not None else set())
    known = {id(p) for p in model.parameters()}
    matrices, others = [], []
    for p in model.parameters() if params is None else params:
        if id(p) in known:
            hidden = p.ndim == 2 and id(p) in in_linears and id(p) not in excluded
        else:
            hidden = p.ndim == 2
        (matrices if hidden else others).append(p)
    return [g for g in ({"params": matrices, "use_muon": True}, {"params": others, "use_muon": False})
            if g["params"]]


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """``params`` as groups with ``use_muon`` set: given groups keep theirs, plain tensors split by shape."""
    items = list(params)
    if all(isinstance(item, dict) for item in items) and items:
        groups = []
        for item in items:
            if "use_muon" not in item or not isinstance(item["use_muon"], bool):
                raise ValueError(f"each parameter group of MuonWithAdamW needs use_muon = True or False, got "
                                 f"{ {k: v for k, v in item.items() if k != 'params'} }")
            groups.append({**item, "params": list(item["params"])})
        return groups
    if any(isinstance(item, dict) for item in items):
        raise ValueError("MuonWithAdamW takes either tensors or parameter groups, not both")
    matrices = [p for p in items if p.ndim == 2]
    others = [p for p in items if p.ndim != 2]
    return [g for g in ({"params": matrices, "use_muon": True}, {"params": others, "use_muon": False})
            if g["params"]]


class MuonWithAdamW(Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, as one optimizer.

    Each step: the Muon groups take Muon's update (momentum, Newton–Schulz orthogonalisation, the
    ``adjust_lr_fn`` scaling, decoupled weight decay), the AdamW groups AdamW's. ``param_groups`` lists
    the Muon groups first, each with ``use_muon``; the two inner optimizers share this optimizer's
    ``state`` and group dicts, so whatever changes them (a scheduler, ``load_state_dict``) changes both.

    Args:
        params: the output of :func:`muon_param_groups`, groups with ``use_muon``, or tensors (2-D: Muon).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: Muon's.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: AdamW's, for the parameters that are
            not hidden matrices.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = "match_rms_adamw",
                 adamw_lr: float = 1e-3, adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 1e-2) -> None:
        groups = _as_groups(params)
        if not groups:
            raise ValueError("MuonWithAdamW got an empty parameter list")
        matrices = [g for g in groups if g["use_muon"]]
        others = [g for g in groups if not g["use_muon"]]
        self._inner: tuple[Optimizer, ...] = ()
        muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                    ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                    adjust_lr_fn=adjust_lr_fn) if matrices else None
        adamw = AdamW(others, lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps,
                      weight_decay=adamw_weight_decay) if others else None
        inner = tuple(o for o in (muon, adamw) if o is not None)
        super().__init__([g for o in inner for g in o.param_groups], {})
        self._muon_groups = len(muon.param_groups) if muon is not None else 0
        self._inner = inner
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state (after init and a load)."""
        split = self._muon_groups
        for optimizer in self._inner:
            is_muon = isinstance(optimizer, Muon)
            optimizer.param_groups = self.param_groups[:split] if is_muon else self.param_groups[split:]
            optimizer.state = self.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while building: a group added later would reach neither inner optimizer."""
        if self._inner:
            raise TypeError("MuonWithAdamW cannot take a parameter group after it is built; build a new one "
                            "with every group (muon_param_groups(model) splits a model's parameters)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of Muon on the hidden matrices and of AdamW on the rest; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._inner:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (the ordinary format) into both halves."""
        super().load_state_dict(state_dict)
        self._link()
