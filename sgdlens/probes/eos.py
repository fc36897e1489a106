"""The edge-of-stability threshold on the curvature for an optimizer, and the ratio to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens._optim import unwrap_optimizer
from sgdlens.probes._common import LossFn, check_int, own_generator
from sgdlens.probes.hvp import Operator
from sgdlens.probes.restore import preserved
from sgdlens.probes.sharpness import SharpnessResult, adam_preconditioner, solve

__all__ = ["eos_ratio", "eos_threshold"]


def _group(
    opt: torch.optim.Optimizer, group: int | None, ignore: tuple[str, ...] = ()
) -> dict[str, Any]:
    every = ("lr", "momentum", "nesterov", "dampening", "betas", "weight_decay")
    keys = [k for k in every if k not in ignore]
    if group is None:
        first = opt.param_groups[0]
        for i, g in enumerate(opt.param_groups[1:], start=1):
            for key in keys:
                if key in first and _num(g.get(key)) != _num(first.get(key)):
                    raise ValueError(
                        f"param_groups 0 and {i} differ in {key!r} ({first.get(key)!r} vs "
                        f"{g.get(key)!r}); pass group=<index> to choose the group whose "
                        "threshold applies"
                    )
        return first
    check_int(group, "group", 0)
    if group >= len(opt.param_groups):
        raise ValueError(
            f"group={group} but the optimizer has {len(opt.param_groups)} param groups"
        )
    return opt.param_groups[group]


def _num(x: Any) -> Any:
    if isinstance(x, Tensor):
        return float(x)
    if isinstance(x, tuple):
        return tuple(_num(v) for v in x)
    return x


def eos_threshold(optimizer: Any, *, group: int | None = None) -> float:
    """The edge-of-stability threshold on the curvature for the optimizer in use.

    From ``param_groups`` (current, scheduled learning rate), for a quadratic of curvature λ
    in ``torch.optim`` semantics:

    * ``SGD`` without momentum (gradient descent): ``2/η``;
    * ``SGD(momentum=β)`` (heavy ball): ``(2+2β)/η``; with ``nesterov=True``:
      ``(2+2β)/((1+2β)η)``; ``dampening=d`` scales η by ``1-d``;
    * ``Adam``/``AdamW``: ``(2+2β₁)/((1-β₁)η)`` (38/η at β₁=0.9), to be compared with the
      *preconditioned* sharpness (Cohen et al. 2022).

    Cost: no forward or backward pass.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a wrapper with
            ``.optimizer``).
        group: the param group to read; by default all groups must agree.

    Returns:
        The threshold, in units of curvature.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> probes.eos_threshold(torch.optim.SGD(p, lr=0.1))
        20.0
        >>> round(probes.eos_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)), 6)
        38.0
    """
    opt = unwrap_optimizer(optimizer)
    g = _group(opt, group)
    lr = float(_num(g["lr"]))
    if lr <= 0:
        raise ValueError(f"the optimizer's learning rate is {lr}; the threshold needs lr > 0")
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        b1 = float(_num(g["betas"])[0])
        return (2 + 2 * b1) / ((1 - b1) * lr)
    if isinstance(opt, torch.optim.SGD):
        beta = float(g.get("momentum", 0.0) or 0.0)
        eff = lr * (1 - float(g.get("dampening", 0.0) or 0.0)) if beta > 0 else lr
        if beta == 0:
            return 2 / lr
        if g.get("nesterov"):
            return (2 + 2 * beta) / ((1 + 2 * beta) * eff)
        return (2 + 2 * beta) / eff
    raise TypeError(
        f"eos_threshold supports torch.optim.SGD, Adam and AdamW, got {type(opt).__name__}; "
        "compute the threshold for your optimizer by hand"
    )


def eos_ratio(
    sharpness: SharpnessResult | float, optimizer: Any, *, group: int | None = None
) -> float:
    """Sharpness over the edge-of-stability threshold: about 1 at the edge of stability.

    For SGD, ``sharpness`` is ``λ_max(H)`` (plus the optimizer's ``weight_decay``, which adds to
    every curvature and is added here); for Adam/AdamW it must be the *preconditioned*
    sharpness, ``sharpness(..., preconditioner=optimizer)``. See :func:`eos_threshold`.

    Cost: no forward or backward pass.

    Args:
        sharpness: a :class:`SharpnessResult` or a number.
        optimizer: the optimizer whose learning rate and momentum set the threshold.
        group: the param group to read; by default all groups must agree.

    Returns:
        ``sharpness / threshold``; ``λ·η/2`` for plain SGD.

    Raises:
        ValueError: an Adam-family optimizer with a non-preconditioned result.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> probes.eos_ratio(15.0, torch.optim.SGD(p, lr=0.1))
        0.75
    """
    opt = unwrap_optimizer(optimizer)
    if isinstance(sharpness, SharpnessResult):
        adam = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
        if adam and not sharpness.preconditioned:
            raise ValueError(
                "for Adam/AdamW the edge-of-stability ratio needs the preconditioned sharpness; "
                "compute it with sharpness(model, loss_fn, data, preconditioner=optimizer)"
            )
        if not adam and sharpness.preconditioned:
            raise ValueError(
                "this sharpness is preconditioned, but the optimizer is not Adam/AdamW; "
                "compute it with preconditioner=None"
            )
        value = sharpness.value
    elif isinstance(sharpness, (int, float)) and not isinstance(sharpness, bool):
        value = float(sharpness)
    else:
        raise TypeError(
            f"sharpness must be a SharpnessResult or a number, got {type(sharpness).__name__}"
        )
    thr = eos_threshold(opt, group=group)
    if isinstance(opt, torch.optim.SGD):
        value += float(_num(_group(opt, group).get("weight_decay", 0.0)) or 0.0)
    return value / thr


def per_group_rates(opt: torch.optim.Optimizer) -> bool:
    """Whether the groups' learning rates (for SGD, or weight decays) differ, so that the
    ratio needs :func:`rate_weighted_ratio`; ValueError where another hyper-parameter of the
    threshold (momentum, betas, ...) differs: no one threshold applies then."""
    _group(opt, None, ignore=("lr", "weight_decay"))
    adam = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
    keys = ("lr",) if adam else ("lr", "weight_decay")
    return any(
        _num(g.get(k)) != _num(opt.param_groups[0].get(k)) for g in opt.param_groups for k in keys
    )


def rate_weighted_ratio(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    adam: bool,
    tol: float,
    v0: Mapping[str, Tensor] | None,
) -> tuple[float, SharpnessResult]:
    """The edge-of-stability ratio under per-group learning rates (and, for SGD, weight decays).

    Gradient descent with a learning rate ``η_i`` per parameter on a quadratic of Hessian ``H``
    (plus weight decay ``w_i``) is stable while every eigenvalue of
    ``η^{1/2} (H + diag w) η^{1/2}`` stays below 2: no single rate's ``2/η`` is the edge. With
    ``r_i = η_i/η_max`` that is ``λ_max(r^{1/2} (H + diag w) r^{1/2}) < 2/η_max``, and
    momentum (one β for every group) moves the bound to :func:`eos_threshold` at ``η_max``.
    Adam's per-parameter rate is ``η_i / P_i``: ``λ_max(r^{1/2} P^{-1/2} H P^{-1/2} r^{1/2})``
    against the threshold at ``η_max``. Returns the ratio and the result it came from.
    """
    groups = opt.param_groups
    top = max(range(len(groups)), key=lambda i: float(_num(groups[i]["lr"])))
    threshold = eos_threshold(opt, group=top)
    lr_max = float(_num(groups[top]["lr"]))
    where = {id(p): g for g in groups for p in g["params"]}
    with preserved(model):
        op = Operator(model, loss_fn, data, "eval", params=params)
        rate = {id(p): float(_num(where[id(p)]["lr"])) / lr_max for p in params}
        decay = {id(p): float(_num(where[id(p)].get("weight_decay", 0.0)) or 0.0) for p in params}
        ones = [torch.ones_like(p) for p in params]
        r = op.space.flatten([rate[id(p)] * o for p, o in zip(params, ones)])
        if adam:
            pre = adam_preconditioner(model, opt, op.space.names)
            op.scale = (r / op.space.flatten([pre[n] for n in op.space.names])).sqrt()
        else:
            op.scale = r.sqrt()
            op.shift = r * op.space.flatten([decay[id(p)] * o for p, o in zip(params, ones)])
        res = solve(op, 1, "LA", tol, None, "lanczos", v0, own_generator(None), True)
    return res.value / threshold, res
