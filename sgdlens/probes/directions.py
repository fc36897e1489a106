"""Random directions in weight space, filter-normalised as in Li et al. 2018 (``net_plotter.py``):
``d ~ N(0, I)``; for every parameter of dim >= 2 each slice along dim 0 (a conv filter, or one
output unit's incoming weights) is rescaled to the norm of the matching slice of θ,
``d_i <- d_i * |θ_i| / (|d_i| + 1e-10)``; parameters of dim <= 1 (biases, norm-layer γ/β) get
``d = 0`` with ``ignore="biasbn"`` and ``d = θ`` otherwise. Scaling a ReLU layer's weights and bias
by ``c > 0`` and the next layer's weights by ``1/c`` leaves filter-normalised curves unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    check_generator,
    check_model,
    own_generator,
    trainable,
)

__all__ = ["Direction", "check_direction", "check_norm_ignore", "random_direction"]

Direction = dict[str, Tensor]


def check_norm_ignore(norm: Any, ignore: Any) -> None:
    if norm not in ("filter", "layer", "none"):
        raise ValueError(f"norm must be 'filter' (Li et al.), 'layer' or 'none', got {norm!r}")
    if ignore not in ("biasbn", None, "none"):
        raise ValueError(
            f"ignore must be 'biasbn' (zero direction on biases and norm layers) or None "
            f"(d = θ there, as Li et al.'s code does without --xignore), got {ignore!r}"
        )


def _normalise(d: Tensor, theta: Tensor, norm: str, ignore: str | None) -> Tensor:
    if theta.dim() <= 1:
        return torch.zeros_like(theta) if ignore == "biasbn" else theta.clone()
    if norm == "filter":
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        tn = theta.reshape(theta.shape[0], -1).norm(dim=1)
        factor = (tn / (dn + 1e-10)).reshape((-1,) + (1,) * (d.dim() - 1))
        return d * factor
    if norm == "layer":
        return d * (theta.norm() / (d.norm() + 1e-10))
    return d


def random_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    norm: str = "filter",
    ignore: str | None = "biasbn",
) -> Direction:
    """A random direction in weight space, filter-normalised as in Li et al. 2018.

    One Gaussian draw per trainable parameter (in ``named_parameters()`` order, drawn in float64
    on the generator's device, so a seed gives the same direction on every device and dtype),
    then normalised per ``norm``: ``"filter"`` (each slice along dim 0 to the norm of θ's
    slice), ``"layer"`` (each tensor to θ's norm) or ``"none"``. Tensors of dim <= 1 get 0
    (``ignore="biasbn"``) or θ itself (``ignore=None``).

    Cost: no forward or backward pass; one tensor per parameter.

    Args:
        model: the model whose weights set the scale (not modified).
        generator: a ``torch.Generator`` for reproducible directions (default: a seed drawn
            from the global RNG, whose state is then restored, so repeated calls without a
            generator give the same direction).
        norm: ``"filter"`` (default), ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` (default) or ``None``.

    Returns:
        A dict parameter name -> direction tensor (shape, dtype and device of the parameter).

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> m = torch.nn.Linear(3, 2)
        >>> d = probes.random_direction(m, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(d["weight"].norm(dim=1), m.weight.norm(dim=1))
        True
        >>> float(d["bias"].abs().sum())
        0.0
    """
    check_model(model)
    generator = check_generator(generator)
    check_norm_ignore(norm, ignore)
    if generator is None:  # a seed from the global RNG, which is then put back as it was
        state = torch.get_rng_state()
        generator = own_generator(None)
        torch.set_rng_state(state)
    dev = generator.device
    out = {}
    with torch.no_grad():
        for name, p in trainable(model):
            d = torch.randn(p.shape, generator=generator, dtype=torch.float64, device=dev)
            d = d.to(device=p.device, dtype=p.dtype)
            out[name] = _normalise(d, p.detach(), norm, None if ignore == "none" else ignore)
    return out


def check_direction(d: Any, base: Mapping[str, Tensor], name: str) -> Direction:
    if not isinstance(d, Mapping):
        raise TypeError(
            f"{name} must be a dict parameter name -> tensor (e.g. from random_direction), "
            f"got {type(d).__name__}"
        )
    out = {}
    for k, v in d.items():
        if k not in base:
            raise ValueError(
                f"{name} has an entry {k!r} that is not a parameter of the model; use names "
                "from model.named_parameters()"
            )
        if not isinstance(v, Tensor) or v.shape != base[k].shape:
            raise ValueError(
                f"{name}[{k!r}] must be a tensor of shape {tuple(base[k].shape)}, got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        out[k] = v.detach().to(device=base[k].device, dtype=base[k].dtype)
    return out
