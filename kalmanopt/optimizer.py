"""KalmanOptimizer: a ``torch.optim.Optimizer`` that runs a composition of filter parts."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from kalmanopt.contract import contract_gap, state_table
from kalmanopt.engines import IMPLEMENTATIONS, driver, resolve_engine
from kalmanopt.engines.driver import NonFiniteError
from kalmanopt.filters.composition import Composition
from kalmanopt.layers import Layer, state_dtype
from kalmanopt.measurement import LOSS_STATISTICS, split_losses

__all__ = ["KalmanOptimizer", "NonFiniteError", "GRANULARITIES", "OPTIONS"]

#: how parameters are grouped into filters
GRANULARITIES = ("layer", "global")

#: per-group options beside the hyper-parameters, with their defaults
OPTIONS: dict[str, Any] = {"granularity": "layer", "implementation": None, "guard": True}

#: event counters kept per group (tensors in the state, so they survive checkpoints)
COUNTERS = ("steps", "nonfinite_steps", "skipped_layers", "guard_restarts", "rows_dropped")


class KalmanOptimizer(Optimizer):
    r"""Training as state estimation: an extended Kalman filter over the weights.

    Each minibatch loss is a noisy measurement of the target L* = 0; per layer ℓ, with
    H_ℓ = ∇L_k + wd θ_ℓ and a covariance surrogate standing for P::

        input: parameters θ_0, a composition (measurement, dynamics, surrogate), η (lr)
        for k = 1, 2, ...
            predict   x̂_k = F x_{k-1};   P̂_k = F P_{k-1} Fᵀ + Q
            measure   L_k, g = ∇L_k(θ̂_k), R_k (fixed or an EMA of a loss statistic)
            for each layer ℓ with ‖g_ℓ‖ ≥ 1e-9:
                H_ℓ = g_ℓ + wd θ_ℓ,   L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
                S_ℓ = H_ℓ P̂ H_ℓᵀ + R_k,  K_ℓ = P̂ H_ℓᵀ / S_ℓ
                θ_ℓ ← θ_ℓ − η_k L_ℓ K_ℓ
            posterior P_k = (I − K H) P̂_k  (as the surrogate represents it)

    Two ways to drive it::

        losses = F.cross_entropy(model(x), y, reduction="none")
        opt.zero_grad(); losses.mean().backward(); opt.step(loss=losses)

        opt.predict(); ...forward/backward...; opt.update(loss_mean, loss_statistic)

    ``step`` runs the update for the gradient just computed and then the predict of the next
    step; the first predict runs before the first update. A step whose loss, statistic or
    gradients are not finite changes nothing (a warning, a counter; ``strict=True`` raises).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        filter: the :class:`Composition` to run (``kalmanopt.create`` builds presets by name).
        loss_statistic: the statistic of per-sample losses the online R follows:
            ``"second_moment"`` (default) or ``"variance"``.
        strict: raise :class:`NonFiniteError` on non-finite input instead of skipping the step.
        track_diagnostics: record per-layer internals each step (see :meth:`diagnostics`).
        granularity: ``"layer"`` (one filter per parameter tensor, as the authors) or
            ``"global"`` (the whole group as one filter).
        implementation: ``"reference"``, ``"foreach"``, ``"fused"`` or ``None`` (fastest usable).
        guard: the positive-definiteness guard of the product surrogates (``False`` for exact
            reproductions of the released code).
        **hyperparameters: the composition's hyper-parameters (``kalmanopt list`` shows them).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], filter: Composition, *,
                 loss_statistic: str = "second_moment", strict: bool = False,
                 track_diagnostics: bool = False, **hyperparameters: Any) -> None:
        if not isinstance(filter, Composition):
            raise TypeError(f"filter must be a kalmanopt Composition, got {type(filter).__name__}; "
                            "use kalmanopt.create(name, params, ...) for a preset")
        if loss_statistic not in LOSS_STATISTICS:
            raise ValueError(f"unknown loss_statistic {loss_statistic!r}; valid choices: "
                             f"{', '.join(LOSS_STATISTICS)}")
        self.filter = filter
        self.specs = filter.hyperparameters()
        self.loss_statistic = loss_statistic
        self.strict = bool(strict)
        self.track_diagnostics = bool(track_diagnostics)
        self._warned: set[str] = set()
        self._diagnostics: dict[str, dict[str, Tensor]] = {}
        self._predicted = False
        unknown = set(hyperparameters) - set(self.specs) - set(OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown keyword(s) {sorted(unknown)} for {filter.name!r}; valid hyper-parameters: "
                f"{', '.join(sorted(self.specs))}; options: {', '.join(sorted(OPTIONS))}, "
                "loss_statistic, strict, track_diagnostics"
            )
        defaults = {name: spec.default for name, spec in self.specs.items()}
        defaults.update(OPTIONS)
        defaults.update(hyperparameters)
        self._validate_group(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state
    def _validate_group(self, group: Mapping[str, Any]) -> None:
        for name, spec in self.specs.items():
            spec.check(group[name])
        for part in self.filter.parts().values():
            part.check_hyperparameters(group)
        if group["granularity"] not in GRANULARITIES:
            raise ValueError(f"unknown granularity {group['granularity']!r}; valid choices: "
                             f"{', '.join(GRANULARITIES)}")
        if group["implementation"] is not None and group["implementation"] not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {group['implementation']!r}; valid choices: "
                             f"{', '.join(IMPLEMENTATIONS)} or None (the fastest that applies)")
        if not isinstance(group["guard"], bool):
            raise TypeError(f"guard must be True or False, got {group['guard']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); its values are validated before it is added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError("KalmanOptimizer does not support complex parameters (the filter "
                                     "is defined over real weights); view them as real with "
                                     "torch.view_as_real")
                if not p.is_floating_point():
                    raise ValueError(f"KalmanOptimizer needs floating-point parameters, got {p.dtype}")
            self._validate_group(group)
            resolve_engine(self.filter, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _group_key(self, index: int) -> str:
        return f"group{index}"

    def _group_state(self, index: int) -> dict:
        """The shared state of group ``index``, created on first use from the parts' state tables."""
        key = self._group_key(index)
        state = self.state[key]
        if not state:
            group = self.param_groups[index]
            params = group["params"]
            dtype = state_dtype(params[0].dtype) if params else torch.float32
            for p in params:
                dtype = torch.promote_types(dtype, state_dtype(p.dtype))
            device = params[0].device if params else torch.device("cpu")
            state_table(self.filter).init_group(state, group, dtype, device)
            if contract_gap(self.filter) is not None:  # a surrogate written per layer keeps its own shared state
                self.filter.surrogate.init_group_state(state, group, dtype, device)
            state["predicted"] = torch.zeros((), dtype=torch.bool, device=device)
            for name in COUNTERS:
                state[name] = torch.zeros((), dtype=torch.int64, device=device)
        return state

    def _layers(self, index: int) -> list[Layer]:
        """The filters of group ``index``: one per tensor, or one for the whole group."""
        group = self.param_groups[index]
        params = group["params"]
        if group["granularity"] == "global":
            if not params:
                return []
            return [Layer(list(params), self._group_state(index).setdefault("global", {}),
                          f"{self._group_key(index)}/global")]
        keeps_layer_state = contract_gap(self.filter) is not None or state_table(self.filter).has_layer_state()
        # (a composition without per-layer state leaves no empty entries in ``self.state``)
        return [Layer([p], self.state[p] if keeps_layer_state else {}, f"{self._group_key(index)}/param{i}")
                for i, p in enumerate(params)]

    # ------------------------------------------------------------------ the two-phase API
    @torch.no_grad()
    def predict(self) -> None:
        """The predict phase: x̂_k = F x_{k-1}, P̂_k = F P_{k-1} Fᵀ + Q (KOALA-M moves θ by u).

        A predict that no update has consumed yet (the update was skipped on non-finite input)
        stands: calling ``predict`` again does nothing, so a skipped step leaves no trace.
        """
        if self._predicted:
            return
        driver.run_predict(self, None)

    @torch.no_grad()
    def update(self, loss_mean: Tensor | float, loss_statistic: Tensor | float | None = None) -> bool:
        """The update phase for the gradients in ``.grad`` (the authors' ``update(loss, loss_var)``).

        An ``update`` with no ``predict`` since the last update runs the predict first, as ``step`` does.

        Args:
            loss_mean: the mean minibatch loss L_k.
            loss_statistic: the statistic s_k the online R follows (needed when ``r`` is None).

        Returns:
            ``True`` if the update was applied, ``False`` if it was skipped (non-finite input). This
            reads a device value (one synchronisation).
        """
        loss, statistic = self._as_tensors(loss_mean, loss_statistic)
        return driver.run_two_phase_update(self, loss, statistic)

    # ------------------------------------------------------------------ the one-call API
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | None = None) -> Tensor | None:
        """One step: the update for the current gradients, then the predict of the next step.

        Args:
            closure: re-evaluates the model and returns the per-sample or mean loss (it should
                call ``backward``); optional when ``loss`` is given.
            loss: the per-sample losses (preferred: the statistic for R comes from them) or
                their mean.

        Returns:
            The loss (the closure's, if one was given).
        """
        loss = step_loss(closure, loss, type(self).__name__)
        mean, statistic = split_losses(loss, self.loss_statistic, self._needs_statistic())
        driver.run_step(self, mean, statistic)
        return loss

    # ------------------------------------------------------------------ internals
    def _needs_statistic(self) -> bool:
        return any(group["r"] is None for group in self.param_groups if "r" in group)

    def _as_tensors(self, loss_mean: Tensor | float, loss_statistic: Tensor | float | None
                    ) -> tuple[Tensor, Tensor | None]:
        loss = torch.as_tensor(loss_mean).detach()
        if loss.numel() != 1:
            raise ValueError(f"update() takes the mean loss (one number), got a tensor of shape "
                             f"{tuple(loss.shape)}; use step(loss=per_sample_losses) for those")
        loss = loss.reshape(())
        statistic = None if loss_statistic is None else torch.as_tensor(loss_statistic).detach().reshape(())
        if statistic is None and self._needs_statistic():
            raise ValueError("r is None (online noise estimate), so update() needs the loss statistic: "
                             "update(loss_mean, loss_statistic)")
        return loss, statistic

    def _gradients(self) -> list[Tensor]:
        grads = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"KalmanOptimizer does not support sparse gradients (group {gi}, "
                                     f"parameter {pi}); use dense gradients (e.g. nn.Embedding(sparse=False))")
                grads.append(p.grad)
        return grads

    def _warn_once(self, kind: str, message: str) -> None:
        """Issue a ``RuntimeWarning`` the first time an event of ``kind`` happens."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{message}; this warning is shown once per kind ({kind})", RuntimeWarning,
                          stacklevel=4)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, Any]:
        """Counters per group and, with ``track_diagnostics``, the last step's per-layer internals.

        Returns a dict with ``"counters"`` (``steps``, ``nonfinite_steps``, ``skipped_layers``,
        ``guard_restarts``, ``rows_dropped``, summed over groups) and ``"layers"``: layer name →
        ``S``, ``gain_scale`` (η L_ℓ times the gain coefficient) and, for the product
        surrogates, ``lambda``, ``alpha``, ``w``, ``cos_Hv`` (cos of the angle between H_k and
        v_k) and ``rows_kept``. Values are Python floats (this synchronises with the device).
        """
        counters = {name: 0 for name in COUNTERS}
        for index in range(len(self.param_groups)):
            key = self._group_key(index)
            if key in self.state:
                for name in COUNTERS:
                    counters[name] += int(self.state[key][name])
        layers = {name: {k: float(v) for k, v in entry.items()} for name, entry in self._diagnostics.items()}
        return {"counters": counters, "layers": layers}

    # ------------------------------------------------------------------ checkpoints
    def _filter_signature(self) -> str:
        """The parts and their structural options: which filter a saved state belongs to."""
        return ", ".join(f"{kind}={part!r}" for kind, part in self.filter.parts().items() if kind != "estimator")

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict (tensors, numbers, strings only) plus ``"filter"``: the parts that made it."""
        state = super().state_dict()
        state["filter"] = self._filter_signature()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping filter state in its own precision.

        The state is checked against this optimizer's parameters first: a state that does not fit
        (other groups, sizes, or another composition) raises ``ValueError`` and changes nothing.
        Tensors move to each parameter's device, so a state saved on CUDA loads on CPU.
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict: expected the keys 'state' and 'param_groups'")
        saved_filter = state_dict.get("filter")
        if saved_filter is not None and saved_filter != self._filter_signature():
            raise ValueError(f"the state was saved by another filter ({saved_filter}); this optimizer runs "
                             f"{self.filter.name!r} ({self._filter_signature()})")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(saved_groups)} parameter group(s), this optimizer "
                             f"{len(self.param_groups)}")
        id_map: dict[int, Tensor] = {}
        new_groups = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {index}: the state has {len(saved['params'])} parameters, "
                                 f"this optimizer {len(group['params'])}")
            # other keys (a scheduler's initial_lr, a user's label) travel with the group, as in torch
            missing = set(self.specs) - set(saved)
            if missing:
                raise ValueError(f"group {index}: the state was saved by another composition (it lacks the "
                                 f"hyper-parameters {sorted(missing)}); this optimizer runs {self.filter.name!r}")
            merged = {k: v for k, v in saved.items() if k != "params"}
            merged["params"] = group["params"]
            self._validate_group({**OPTIONS, **merged})
            new_groups.append(merged)
            id_map.update(zip(saved["params"], group["params"]))
        new_state: dict[Any, Any] = {}
        for key, value in state_dict["state"].items():
            if key in id_map:
                param = id_map[key]
                self._check_param_state(param, value)
                new_state[param] = _to_device(value, param.device, state_dtype(param.dtype))
            elif isinstance(key, str) and key.startswith("group") and key[5:].isdigit() \
                    and int(key[5:]) < len(self.param_groups):
                params = self.param_groups[int(key[5:])]["params"]
                device = params[0].device if params else torch.device("cpu")
                dtype = torch.float32
                for p in params:
                    dtype = torch.promote_types(dtype, state_dtype(p.dtype))
                if not isinstance(value, Mapping):
                    raise ValueError(f"state {key!r} must be a dict of tensors, got {type(value).__name__}")
                if "global" in value:
                    total = sum(p.numel() for p in params)
                    self._check_vectors(value["global"], total, f"{key}/global")
                new_state[key] = _to_device(value, device, dtype)
            else:
                raise ValueError(f"unexpected state entry {key!r}; the state does not fit these parameters")
        # everything checked: commit
        self.param_groups[:] = new_groups
        self.state.clear()
        self.state.update(new_state)
        first = self.state.get(self._group_key(0), {})
        self._predicted = bool(first["predicted"]) if "predicted" in first else False

    def _check_param_state(self, param: Tensor, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise ValueError(f"state of a parameter must be a dict of tensors, got {type(value).__name__}")
        self._check_vectors(value, param.numel(), f"parameter of shape {tuple(param.shape)}")

    @staticmethod
    def _check_vectors(value: Mapping[str, Any], numel: int, where: str) -> None:
        for name, t in value.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"state {name!r} of {where} is not a tensor ({type(t).__name__})")
            if t.dim() >= 1 and t.shape[-1] != numel:
                raise ValueError(f"state {name!r} of {where} has shape {tuple(t.shape)}, which does not "
                                 f"fit {numel} parameter(s)")


def step_loss(closure: Callable[[], Tensor] | None, loss: Tensor | None, owner: str) -> Tensor:
    """The loss a ``step(closure=None, *, loss=None)`` works with: ``loss``, else the closure's.

    The closure runs with gradients enabled (it calls ``backward``) whenever one is given.
    """
    if closure is not None:
        with torch.enable_grad():
            out = closure()
        if loss is None:
            loss = out
    if loss is None:
        raise TypeError(f"{owner}.step needs the loss: step(loss=per_sample_losses) or "
                        "step(closure) with a closure that returns it")
    return loss


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A copy of ``value`` on ``device``, floating-point tensors in the filter-state precision ``dtype``.

    A copy, so that the optimizer never shares tensors with the dict it was loaded from.
    """
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value
