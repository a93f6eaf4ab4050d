"""KalmanOptimizer: a ``torch.optim.Optimizer`` that runs a composition of filter parts."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from kalmanopt.checkpoint import checked_state, group_key
from kalmanopt.composition import Composition
from kalmanopt.engines import distributed, resolve_engine, step
from kalmanopt.engines.distributed import check_group_parameters
from kalmanopt.engines.driver import NonFiniteError
from kalmanopt.engines.runtime import Runtime
from kalmanopt.groups import checked_group_values, validate_groups
from kalmanopt.layers import Layer, state_dtype, stored_dtype
from kalmanopt.measurement import as_loss_tensor, check_loss_device, parameter_devices, split_losses, statistics_dtype
from kalmanopt.observation import ObservedLosses
from kalmanopt.options import (
    GRANULARITIES,
    GROUP_OPTIONS,
    TORCH_FLAGS,
    implementation_from_torch_flags,
    option_defaults,
)
from kalmanopt.options import OPTIONS as OPTION_TABLE
from kalmanopt.plan import contract_gap, state_table

__all__ = ["KalmanOptimizer", "NonFiniteError", "GRANULARITIES", "OPTIONS", "check_parameter"]

#: per-group options beside the hyper-parameters, with their defaults (the full table, with types,
#: choices and help, is :data:`kalmanopt.options.OPTIONS`)
OPTIONS: dict[str, Any] = option_defaults("group")

#: event counters kept per group (tensors in the state, so they survive checkpoints)
COUNTERS = ("steps", "nonfinite_steps", "skipped_layers", "guard_restarts", "rows_dropped")


def check_parameter(p: Tensor, index: int) -> None:
    """Refuse a parameter the filter cannot run on, with the reason (``ValueError``)."""
    if p.is_complex():
        raise ValueError("KalmanOptimizer does not support complex parameters (the filter "
                         "is defined over real weights); view them as real with torch.view_as_real")
    if not p.is_floating_point():
        raise ValueError(f"KalmanOptimizer needs floating-point parameters, got {p.dtype} (parameter {index})")
    if p.device.type == "meta":
        raise ValueError(f"parameter {index} is on the meta device (it has no values to filter); "
                         "materialise the model first (model.to_empty(device=...) and initialise it), "
                         "then build the optimizer")
    if p.is_sparse:
        raise ValueError(f"parameter {index} is a sparse tensor; KalmanOptimizer needs dense parameters")


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
        process_group: several processes (DDP, FSDP2; see :mod:`kalmanopt.engines.distributed`):
            ``"auto"`` (default) measures the global batch over the initialised default process
            group, ``None`` opts out (each process filters its own loss), or a ``ProcessGroup``.
        granularity: ``"layer"`` (one filter per parameter tensor, as the authors) or
            ``"global"`` (the whole group as one filter).
        implementation: ``"reference"``, ``"foreach"``, ``"fused"`` or ``None`` (fastest usable).
        foreach, fused: torch.optim's flags, aliases of ``implementation`` (``foreach=True`` →
            ``"foreach"``, ``fused=True`` → ``"fused"``, ``foreach=False`` → ``"reference"``);
            flags that disagree with each other or with ``implementation`` raise ``ValueError``.
        guard: the positive-definiteness guard of the product surrogates (``False`` for exact
            reproductions of the released code).
        **hyperparameters: the composition's hyper-parameters (``kalmanopt list`` shows them).

    The options (everything but the hyper-parameters) are listed with their types, defaults and
    choices in :data:`kalmanopt.options.OPTIONS`. Hyper-parameters may be numpy scalars, and
    ``lr`` a 1-element tensor, as in torch.optim; both are stored as Python numbers.
    ``param_groups`` may be edited between steps: every step checks them first
    (:meth:`validate_groups`) and refuses a bad value before anything changes.

    Mixed precision: with ``torch.amp.GradScaler``, ``scaler.step(opt, loss=losses)`` hands the scale
    and the overflow flag to the step (torch's ``_step_supports_amp_scaling`` protocol, as its fused
    optimizers): the gradients are unscaled in place and an overflow skips the step on the device,
    without the host synchronisation of the generic path.
    """

    #: ``GradScaler.step`` passes ``grad_scale`` and ``found_inf`` to ``step`` (see the class docs)
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], filter: Composition, *,
                 loss_statistic: str = "second_moment", strict: bool = False,
                 track_diagnostics: bool = False, process_group: Any = "auto", foreach: bool | None = None,
                 fused: bool | None = None, **hyperparameters: Any) -> None:
        if not isinstance(filter, Composition):
            raise TypeError(f"filter must be a kalmanopt Composition, got {type(filter).__name__}; "
                            "use kalmanopt.create(name, params, ...) for a preset")
        self.filter = filter
        self.specs = filter.hyperparameters()
        self.loss_statistic = OPTION_TABLE["loss_statistic"].check(loss_statistic)
        self.strict = OPTION_TABLE["strict"].check(strict)
        self.track_diagnostics = OPTION_TABLE["track_diagnostics"].check(track_diagnostics)
        self.process_group = OPTION_TABLE["process_group"].check(process_group)
        #: everything a step remembers for the next one: caches, flags, deferred warnings
        #: (:class:`~kalmanopt.engines.runtime.Runtime`); the engines keep nothing of their own
        self.runtime = Runtime()
        self._observed = ObservedLosses()  # observe(): the losses step() uses when it is given none
        unknown = set(hyperparameters) - set(self.specs) - set(GROUP_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown keyword(s) {sorted(unknown)} for {filter.name!r}; valid hyper-parameters: "
                f"{', '.join(sorted(self.specs))}; options: {', '.join(sorted(OPTION_TABLE))}; "
                "torch flags: foreach, fused"
            )
        if foreach is not None or fused is not None:
            hyperparameters["implementation"] = implementation_from_torch_flags(
                hyperparameters.get("implementation"), foreach, fused)
        defaults = {name: spec.default for name, spec in self.specs.items()}
        defaults.update(option_defaults("group"))
        defaults.update(hyperparameters)
        self._validate_group(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyper-parameters and options and normalise them in place (numpy → Python)."""
        group.update(checked_group_values(self, group))

    def validate_groups(self) -> None:
        """Check every parameter group before a step reads it (see :func:`kalmanopt.groups.validate_groups`).

        ``param_groups`` can be edited between steps; a bad value (``lr`` NaN, negative or a string)
        raises ``ValueError``/``TypeError`` naming the group, and nothing changes.
        """
        validate_groups(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); its values are validated before it is added.

        torch's ``foreach``/``fused`` flags in the group are read as ``implementation``.
        """
        if isinstance(param_group, dict) and any(flag in param_group for flag in TORCH_FLAGS):
            param_group = dict(param_group)
            foreach, fused = param_group.pop("foreach", None), param_group.pop("fused", None)
            wanted = implementation_from_torch_flags(param_group.get("implementation"), foreach, fused)
            if wanted is not None:  # (fused=False alone keeps the optimizer's default)
                param_group["implementation"] = wanted
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for index, p in enumerate(group["params"]):
                check_parameter(p, index)
            check_group_parameters(group["params"], len(self.param_groups) - 1, group["granularity"],
                                   contract_gap(self.filter), self.process_group)
            self._validate_group(group)
            resolve_engine(self.filter, group)
        except Exception:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, groups) plus the filter and the options, for deepcopy and pickle."""
        state = super().__getstate__()
        state.update(filter=self.filter, specs=self.specs, loss_statistic=self.loss_statistic,
                     strict=self.strict, track_diagnostics=self.track_diagnostics,
                     process_group=self.process_group if self.process_group is None
                     or isinstance(self.process_group, str) else "auto",
                     runtime=self.runtime.carried())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch adds defaults["differentiable"]; kalmanopt has no such option (a group would inherit it)
        if "differentiable" not in self.specs:
            self.defaults.pop("differentiable", None)
        carried = self.__dict__.pop("runtime", None)
        if not isinstance(carried, dict):  # (a pickle of the first core: its flags were attributes)
            carried = {"predicted": self.__dict__.pop("_predicted", False),
                       "warned": self.__dict__.pop("_warned", set()),
                       "diagnostics": self.__dict__.pop("_diagnostics", {})}
        self.runtime = Runtime.from_carried(carried)
        self.__dict__.setdefault("process_group", "auto")
        self.__dict__.setdefault("_observed", ObservedLosses())  # (pending observations are not copied)

    def group_state(self, index: int) -> dict:
        """The shared state of group ``index`` (``opt.state["group{index}"]``), created on first use from the
        parts' state tables."""
        key = group_key(index)
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

    def layers(self, index: int) -> list[Layer]:
        """The filters of group ``index``: one per tensor, or one for the whole group."""
        group = self.param_groups[index]
        params = group["params"]
        stored = stored_dtype(group.get("state_dtype"))
        if group["granularity"] == "global":
            if not params:
                return []
            return [Layer(list(params), self.group_state(index).setdefault("global", {}),
                          f"{group_key(index)}/global", stored)]
        keeps_layer_state = contract_gap(self.filter) is not None or state_table(self.filter).has_layer_state()
        # (a composition without per-layer state leaves no empty entries in ``self.state``)
        return [Layer([p], self.state[p] if keeps_layer_state else {}, f"{group_key(index)}/param{i}", stored)
                for i, p in enumerate(params)]

    def like(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **hyperparameters: Any) -> KalmanOptimizer:
        """A new optimizer over ``params`` running the same filter with the same options (``loss_statistic``,
        ``strict``, ...); ``hyperparameters`` (and options) as for the constructor. Its state is its own."""
        options: dict[str, Any] = {"loss_statistic": self.loss_statistic, "strict": self.strict,
                                   "track_diagnostics": self.track_diagnostics, "process_group": self.process_group}
        options.update(hyperparameters)
        return KalmanOptimizer(params, self.filter, **options)

    # ------------------------------------------------------------------ the two-phase API
    @torch.no_grad()
    def predict(self) -> None:
        """The predict phase: x̂_k = F x_{k-1}, P̂_k = F P_{k-1} Fᵀ + Q (KOALA-M moves θ by u).

        A predict that no update has consumed yet (the update was skipped on non-finite input)
        stands: calling ``predict`` again does nothing, so a skipped step leaves no trace.
        """
        if self.runtime.predicted:
            return
        self.validate_groups()
        step.run_predict(self)

    @torch.no_grad()
    def update(self, loss_mean: Tensor | float, loss_statistic: Tensor | float | None = None) -> bool:
        """The update phase for the gradients in ``.grad`` (the authors' ``update(loss, loss_var)``).

        An ``update`` with no ``predict`` since the last update runs the predict first, as ``step`` does,
        where the predict leaves the parameters where they are; where it moves them (KOALA-M), it raises
        ``RuntimeError`` and changes nothing: the gradient must be taken after the predict. With no
        gradient at all (``backward`` forgotten) it warns once, changes nothing and returns ``False``.

        Args:
            loss_mean: the mean minibatch loss L_k.
            loss_statistic: the statistic s_k the online R follows (needed when ``r`` is None).

        Returns:
            ``True`` if the update was applied, ``False`` if it was skipped (non-finite input). This
            reads a device value (one synchronisation).
        """
        self.validate_groups()
        loss, statistic = self._as_tensors(loss_mean, loss_statistic)
        self.runtime.loss_count = 1  # several processes: each process's mean counts once
        return step.run_two_phase_update(self, loss, statistic)

    # ------------------------------------------------------------------ the one-call API
    def observe(self, loss: Tensor | float) -> None:
        """Hand one micro-batch's losses to the next ``step()``: per-sample losses (preferred) or their mean.

        Call it once per micro-batch, after its backward; ``step()`` with no arguments then uses what was
        observed since the last step, combined as one batch (:mod:`kalmanopt.observation`). This is how the
        loss reaches the filter from trainers that call ``optimizer.step()`` with no arguments;
        ``kalmanopt.observe(optimizer, loss)`` finds this optimizer inside their wrappers.
        """
        self._observed.add(loss)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | None = None) -> Tensor | None:
        """One step: the update for the current gradients, then the predict of the next step.

        Args:
            closure: re-evaluates the model and returns the per-sample or mean loss (it should
                call ``backward``); optional when ``loss`` is given.
            loss: the per-sample losses (preferred: the statistic for R comes from them) or
                their mean.

        With neither, the step uses the losses given to :meth:`observe` since the last step (they also
        win over a closure's return value, where the closure observed them); with nothing observed it
        raises ``TypeError`` naming ``observe`` and the integrations, and changes nothing.

        Returns:
            The loss (the closure's, if one was given).

        A step where no parameter has a gradient (``backward`` forgotten) warns once and changes
        nothing: no parameter, no filter state, no counter.
        """
        self.validate_groups()
        loss, returned = self._observed.step_loss(closure, loss, type(self).__name__)  # given, closure's, observed
        check_loss_device(as_loss_tensor(loss), parameter_devices(self.param_groups))
        mean, statistic = self._split_step_loss(loss)
        self.runtime.loss_count = as_loss_tensor(loss).numel()  # this process's samples (several processes)
        step.run_step(self, mean, statistic)
        return returned

    # ------------------------------------------------------------------ internals
    def _needs_statistic(self) -> bool:
        return any(group["r"] is None for group in self.param_groups if "r" in group)

    def _split_step_loss(self, loss: Any) -> tuple[Tensor, Tensor | None]:
        """(L_k, s_k) of a step's loss; warns once when an online R has only the mean to follow."""
        # (several processes: a rank's empty micro-batch adds no sample to the global batch)
        mean, statistic = split_losses(loss, self.loss_statistic, self._needs_statistic(),
                                       allow_empty=distributed.process_group(self) is not None)
        if statistic is not None and as_loss_tensor(loss).numel() == 1:
            self.runtime.warn_once("scalar loss", "step() was given one number (the mean loss) while R is estimated "
                            "online (r=None), so R follows mean² rather than the second moment of the per-sample "
                            "losses; pass step(loss=per_sample_losses) (reduction='none'), or fix r")
        return mean, statistic

    def _as_tensors(self, loss_mean: Tensor | float, loss_statistic: Tensor | float | None
                    ) -> tuple[Tensor, Tensor | None]:
        loss = as_loss_tensor(loss_mean)
        check_loss_device(loss, parameter_devices(self.param_groups), "loss_mean")
        if loss.numel() != 1:
            raise ValueError(f"update() takes the mean loss (one number), got a tensor of shape "
                             f"{tuple(loss.shape)}; use step(loss=per_sample_losses) for those")
        loss = loss.reshape(()).to(statistics_dtype(loss.dtype))
        statistic = None
        if loss_statistic is not None:
            statistic = as_loss_tensor(loss_statistic)
            check_loss_device(statistic, parameter_devices(self.param_groups), "loss_statistic")
            if statistic.numel() != 1:
                raise ValueError(
                    f"update(loss_mean, loss_statistic) takes the loss statistic s_k (one number: "
                    f"{self.loss_statistic!r}, e.g. kalmanopt.loss_statistic(losses, {self.loss_statistic!r})), "
                    f"got a tensor of shape {tuple(statistic.shape)}; per-sample losses go to "
                    "step(loss=per_sample_losses)")
            statistic = statistic.reshape(()).to(statistics_dtype(statistic.dtype))
        if statistic is None and self._needs_statistic():
            raise ValueError("r is None (online noise estimate), so update() needs the loss statistic: "
                             "update(loss_mean, loss_statistic)")
        return loss, statistic

    def gradients(self) -> list[Tensor]:
        """The gradients of the parameters that have one (dense tensors only: a sparse one is refused)."""
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
            key = group_key(index)
            if key in self.state:
                for name in COUNTERS:
                    counters[name] += int(self.state[key][name])
        layers = {name: {k: float(v) for k, v in entry.items()} for name, entry in self.runtime.diagnostics.items()}
        return {"counters": counters, "layers": layers}

    # ------------------------------------------------------------------ checkpoints
    def filter_signature(self) -> str:
        """The parts and their structural options: which filter a saved state belongs to."""
        return ", ".join(f"{kind}={part!r}" for kind, part in self.filter.parts().items() if kind != "estimator")

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict (tensors, numbers, strings only) plus ``"filter"``: the parts that made it."""
        state = super().state_dict()
        workspace = state_table(self.filter).workspace_keys
        if workspace:  # (buffers a matrix stage fills before every use: never saved)
            state["state"] = {key: _without(entry, workspace) for key, entry in state["state"].items()}
        state["filter"] = self.filter_signature()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping filter state in its own precision.

        As torch's: the load-state-dict pre-hooks run first (and may return a replacement dict),
        the post-hooks last. In between, everything the optimizer will use is checked
        (:func:`kalmanopt.checkpoint.checked_state`): groups, hyper-parameters, every state tensor's
        shape, kind and finiteness. A state that does not fit raises ``ValueError`` and changes
        nothing. Options an older dict lacks take this optimizer's defaults; counters saved as
        Python numbers are converted. Tensors move to each parameter's device, so a state saved
        on CUDA loads on CPU; the optimizer never shares tensors with the dict.
        """
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy, as torch
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checked = checked_state(self, state_dict)
        # everything checked: commit
        self.param_groups[:] = checked.param_groups
        self.state.clear()
        self.state.update(checked.state)
        self.runtime.forget_caches()
        self.runtime.predicted = checked.predicted
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A copy of ``value`` on ``device``, floating-point tensors in the filter-state precision ``dtype``.

    A copy, so that the optimizer never shares tensors with the dict it was loaded from.
    """
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value


def _without(entry: Any, keys: tuple[str, ...]) -> Any:
    """A state entry without ``keys`` (also inside a global layer's nested entry)."""
    if not isinstance(entry, Mapping):
        return entry
    return {k: _without(v, keys) for k, v in entry.items() if k not in keys}
