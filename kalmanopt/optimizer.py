"""KalmanOptimizer: a ``torch.optim.Optimizer`` that runs a composition of filter parts."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from kalmanopt.filters.composition import Composition
from kalmanopt.implementations import IMPLEMENTATIONS, resolve_implementation
from kalmanopt.layers import Layer, state_dtype
from kalmanopt.measurement import LOSS_STATISTICS, split_losses

__all__ = ["KalmanOptimizer", "NonFiniteError", "GRANULARITIES", "OPTIONS"]

#: how parameters are grouped into filters
GRANULARITIES = ("layer", "global")

#: per-group options beside the hyper-parameters, with their defaults
OPTIONS: dict[str, Any] = {"granularity": "layer", "implementation": None, "guard": True}

#: event counters kept per group (tensors in the state, so they survive checkpoints)
COUNTERS = ("steps", "nonfinite_steps", "skipped_layers", "guard_restarts", "rows_dropped")


class NonFiniteError(FloatingPointError):
    """A non-finite loss, statistic or gradient reached an optimizer built with ``strict=True``."""


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

    Two ways to drive it (:ref:`docs/derivation.md §3 <derivation-two-apis>`)::

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
            resolve_implementation(self.filter, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _group_key(self, index: int) -> str:
        return f"group{index}"

    def _group_state(self, index: int) -> dict:
        """The shared state of group ``index``, created on first use."""
        key = self._group_key(index)
        state = self.state[key]
        if not state:
            group = self.param_groups[index]
            params = group["params"]
            dtype = state_dtype(params[0].dtype) if params else torch.float32
            for p in params:
                dtype = torch.promote_types(dtype, state_dtype(p.dtype))
            device = params[0].device if params else torch.device("cpu")
            self.filter.measurement.init_state(state, dtype, device)
            self.filter.dynamics.init_group_state(state, group, dtype, device)
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
        return [Layer([p], self.state[p], f"{self._group_key(index)}/param{i}") for i, p in enumerate(params)]

    # ------------------------------------------------------------------ the two-phase API
    @torch.no_grad()
    def predict(self) -> None:
        """The predict phase: x̂_k = F x_{k-1}, P̂_k = F P_{k-1} Fᵀ + Q (KOALA-M moves θ by u).

        A predict that no update has consumed yet (the update was skipped on non-finite input)
        stands: calling ``predict`` again does nothing, so a skipped step leaves no trace.
        """
        if self._predicted:
            return
        for index, group in enumerate(self.param_groups):
            state = self._group_state(index)
            resolve_implementation(self.filter, group).predict(self, group, state, self._layers(index))
            state["predicted"].fill_(True)
        self._predicted = True

    @torch.no_grad()
    def update(self, loss_mean: Tensor | float, loss_statistic: Tensor | float | None = None) -> bool:
        """The update phase for the gradients in ``.grad`` (the authors' ``update(loss, loss_var)``).

        Args:
            loss_mean: the mean minibatch loss L_k.
            loss_statistic: the statistic s_k the online R follows (needed when ``r`` is None).

        Returns:
            ``True`` if the update was applied, ``False`` if it was skipped (non-finite input).
        """
        loss, statistic = self._as_tensors(loss_mean, loss_statistic)
        if not self._inputs_finite(loss, statistic):
            return False
        self._apply_update(loss, statistic)
        return True

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
        if self._steps_on_device():
            # the fast paths: the whole step on the device, a non-finite step masked there
            from kalmanopt.fast.step import step_on_device

            step_on_device(self, mean, statistic)
        elif self._inputs_finite(mean, statistic):
            if not self._predicted:
                self.predict()
            self._apply_update(mean, statistic)
            self.predict()
        return loss

    def _steps_on_device(self) -> bool:
        """Whether every group's implementation runs ``step`` on the device (no host sync)."""
        if self.strict or self.track_diagnostics:
            return False
        return all(getattr(resolve_implementation(self.filter, group), "device_step", False)
                   for group in self.param_groups)

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

    def _inputs_finite(self, loss: Tensor, statistic: Tensor | None) -> bool:
        """Check loss, statistic and gradients; on a non-finite one record, warn or raise."""
        grads = [g for g in self._gradients() if g.numel()]  # (an empty tensor has no infinity norm)
        checks = {"loss": loss, "statistic": statistic}
        bad = [kind for kind, t in checks.items() if t is not None and not bool(torch.isfinite(t).all())]
        if grads:
            norms = torch._foreach_norm(grads, math.inf)
            if not bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all()):
                bad.append("gradient")
        if not bad:
            return True
        message = (f"non-finite {' and '.join(bad)} at this step: the step was skipped and the "
                   "parameters and filter state are unchanged")
        if self.strict:
            raise NonFiniteError(message + " (strict=True)")
        for kind in bad:
            if kind not in self._warned:
                self._warned.add(kind)
                warnings.warn(message + f"; this warning is shown once per kind ({kind})", RuntimeWarning,
                              stacklevel=3)
        for index in range(len(self.param_groups)):
            self._group_state(index)["nonfinite_steps"].add_(1)
        return False

    def _warn_once(self, kind: str, message: str) -> None:
        """Issue a ``RuntimeWarning`` the first time an event of ``kind`` happens."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{message}; this warning is shown once per kind ({kind})", RuntimeWarning,
                          stacklevel=4)

    def _apply_update(self, loss: Tensor, statistic: Tensor | None) -> None:
        if any(group["guard"] for group in self.param_groups) and bool(loss < 0):
            self._warn_once("negative loss", "the loss is negative; the filter's target is L* = 0, so a "
                            "layer whose loss is below it does not move (shift the loss to be >= 0)")
        if self.track_diagnostics:
            self._diagnostics = {}
        for index, group in enumerate(self.param_groups):
            state = self._group_state(index)
            device = state["R"].device
            impl = resolve_implementation(self.filter, group)
            impl.update(self, group, state, self._layers(index), loss.to(device),
                        None if statistic is None else statistic.to(device))
            state["steps"].add_(1)
            state["predicted"].fill_(False)
        self._predicted = False

    def _record_layer(self, name: str, gain: Any, scale: Tensor) -> None:
        entry = {"S": gain.S.detach(), "gain_scale": (scale * gain.coefficients[0]).detach()}
        entry.update({k: v.detach() for k, v in gain.diagnostics.items()})
        self._diagnostics[name] = entry

    def _record_counters(self, group_state: dict, counters: Mapping[str, int]) -> None:
        for name, n in counters.items():
            if name in group_state and n:
                group_state[name].add_(n)

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
