"""Per-sample gradients, the gradient covariance, Hessian-vector products and Hessians.

Everything here is built on ``torch.func``: the model is called as a pure function of its
parameters with :func:`torch.func.functional_call`, and gradients are composed transforms
(``vmap(grad(f))`` for per-sample gradients, ``jvp(grad(f))`` for Hessian-vector products).

Conventions shared by every function:

- ``params`` is a dict name → tensor (``dict(model.named_parameters())`` when ``None``); its
  order is the order of ``model.parameters()``, which is the order the optimizers flatten in.
- ``loss_fn(outputs, targets)`` returns the per-sample losses (shape ``(B,)``, e.g.
  ``F.cross_entropy(..., reduction="none")``) or their mean; the tools use the mean.
- Buffers of the model (e.g. running statistics) are passed through unchanged. Models whose
  forward pass mixes samples (batch norm in training mode) have no per-sample gradients: put
  them in ``eval()`` mode first.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

__all__ = [
    "LossFunction", "named_parameters", "flatten", "unflatten", "per_sample_gradients",
    "gradient_covariance", "hessian_vector_product", "hessian", "MAX_HESSIAN_PARAMETERS",
]

#: ``loss_fn(outputs, targets)`` → per-sample losses ``(B,)`` or their mean (a scalar)
LossFunction = Callable[[Tensor, Tensor], Tensor]

#: the largest model :func:`hessian` builds the full matrix for, unless told otherwise
MAX_HESSIAN_PARAMETERS = 5000


def named_parameters(model: nn.Module, params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The parameters as a dict name → tensor, detached (``model.named_parameters()`` if ``None``).

    Raises:
        ValueError: a name in ``params`` that the model does not have (the message lists them).
    """
    if params is None:
        return {name: p.detach() for name, p in model.named_parameters()}
    known = dict(model.named_parameters())
    unknown = [name for name in params if name not in known]
    if unknown:
        raise ValueError(f"params names {unknown} are not parameters of the model; valid names: "
                         f"{', '.join(known)}")
    return {name: p.detach() for name, p in params.items()}


def flatten(tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate a dict of tensors into one vector (or a ``(B, n)`` matrix with ``batch_dims=1``)."""
    if not tensors:
        raise ValueError("nothing to flatten: the dict of tensors is empty")
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors.values()], dim=batch_dims)


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into a dict shaped like ``like`` (the inverse of :func:`flatten`)."""
    total = sum(t.numel() for t in like.values())
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"expected a flat vector of {total} entries (the parameters' total size), "
                         f"got shape {tuple(vector.shape)}")
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset: offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def _mean_loss(model: nn.Module, buffers: dict[str, Tensor], loss_fn: LossFunction) -> Callable[..., Tensor]:
    """f(params, inputs, targets) = mean loss of the model called functionally."""

    def loss(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        outputs = functional_call(model, (params, buffers), (inputs,))
        value = loss_fn(outputs, targets)
        return value.mean() if value.dim() > 0 else value

    return loss


def per_sample_gradients(model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Tensor, targets: Tensor,
                         loss_fn: LossFunction, *, flat: bool = False) -> dict[str, Tensor] | Tensor:
    """The gradient of each sample's loss: ∇_θ ℓ_i(θ) for i = 1..B, by ``vmap(grad(ℓ))``.

    Args:
        model: the network; called as ``model(x)`` on a batch of one sample.
        params: name → tensor at which to differentiate (``None``: the model's own).
        inputs: a batch, samples along dim 0.
        targets: the targets, samples along dim 0.
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses or their mean.
        flat: return one ``(B, n)`` matrix (parameters flattened in order) instead of a dict.

    Returns:
        name → ``(B, *param.shape)`` tensor, or the ``(B, n)`` matrix with ``flat=True``.
        Their mean over samples is the gradient of the mean loss.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the number of samples: {inputs.shape[0]} vs "
                         f"{targets.shape[0]}")
    params = named_parameters(model, params)
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    loss = _mean_loss(model, buffers, loss_fn)

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # ℓ_i(θ): the loss of a batch of one
        return loss(p, x.unsqueeze(0), y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return flatten(grads, batch_dims=1) if flat else grads


def gradient_covariance(grads: Mapping[str, Tensor] | Tensor, *, centered: bool = True,
                        correction: int = 0) -> Tensor:
    """The empirical covariance of per-sample gradients, C = Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ / (B − correction).

    Args:
        grads: per-sample gradients, a dict from :func:`per_sample_gradients` or a ``(B, n)`` matrix.
        centered: subtract the mean gradient ḡ (``False``: the second moment Σ_i g_i g_iᵀ / (B − c),
            the "empirical Fisher" of a log-likelihood loss).
        correction: 0 for the maximum-likelihood estimate, 1 for the unbiased one.

    Returns:
        The ``(n, n)`` matrix, n the total number of parameters.
    """
    G = flatten(grads, batch_dims=1) if isinstance(grads, Mapping) else grads
    if G.dim() != 2:
        raise ValueError(f"expected per-sample gradients of shape (B, n), got {tuple(G.shape)}")
    B = G.shape[0]
    if B - correction <= 0:
        raise ValueError(f"{B} sample(s) with correction={correction} leave no degrees of freedom")
    if centered:
        # g_i − ḡ
        G = G - G.mean(dim=0, keepdim=True)
    # C = Gᵀ G / (B − correction)
    return G.T @ G / (B - correction)


def hessian_vector_product(model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Tensor,
                           targets: Tensor, loss_fn: LossFunction,
                           vector: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
    """∇²L(θ) · v for the mean batch loss L, by forward-over-reverse ``jvp(grad(L), θ, v)``.

    Costs about one forward and two backward passes; the Hessian is never formed.

    Args:
        model, params, inputs, targets, loss_fn: as in :func:`per_sample_gradients` (here the
            whole batch enters one mean loss).
        vector: v, a dict shaped like ``params`` or a flat vector of their total size.

    Returns:
        H v in the same form as ``vector`` (dict or flat vector).
    """
    params = named_parameters(model, params)
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    loss = _mean_loss(model, buffers, loss_fn)
    as_flat = isinstance(vector, Tensor)
    if as_flat:
        tangent = unflatten(vector.to(flatten(params)), params)
    else:
        if set(vector) != set(params):
            raise ValueError(f"vector must have the parameters' names {list(params)}, got {list(vector)}")
        tangent = {name: vector[name].to(p) for name, p in params.items()}
        for name, p in params.items():
            if tangent[name].shape != p.shape:
                raise ValueError(f"vector[{name!r}] has shape {tuple(tangent[name].shape)}, the parameter "
                                 f"{tuple(p.shape)}")

    def gradient(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return grad(loss)(p, inputs, targets)

    # H v = d/dε ∇L(θ + ε v) at ε = 0
    _, hvp = jvp(gradient, (params,), (tangent,))
    return flatten(hvp) if as_flat else hvp


def hessian(model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Tensor, targets: Tensor,
            loss_fn: LossFunction, *, max_parameters: int = MAX_HESSIAN_PARAMETERS) -> Tensor:
    """The full Hessian ∇²L(θ) (n × n, parameters flattened in order) of the mean batch loss.

    For tiny models: it is n Hessian-vector products (``torch.func.hessian``, forward over
    reverse). Use :func:`hessian_vector_product` for anything larger.

    Raises:
        ValueError: the model has more than ``max_parameters`` parameters.
    """
    params = named_parameters(model, params)
    n = sum(p.numel() for p in params.values())
    if n > max_parameters:
        raise ValueError(f"the model has {n} parameters, above max_parameters={max_parameters}: the full "
                         "Hessian would be too large; use hessian_vector_product, or raise max_parameters")
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    loss = _mean_loss(model, buffers, loss_fn)

    def flat_loss(theta: Tensor) -> Tensor:
        return loss(unflatten(theta, params), inputs, targets)

    return torch.func.hessian(flat_loss)(flatten(params))
