"""The parameters a monitor watches, grouped into layers (:class:`~sgdlens.lenses.ParamView`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from sgdlens import _torch
from sgdlens.layers import LayersArg, group_names
from sgdlens.lenses.base import ParamView

__all__ = ["build_view"]


def build_view(
    opt: Optimizer, model: nn.Module | None, log_every: int, layers: LayersArg = "auto"
) -> ParamView:
    """The :class:`ParamView` of an optimizer's parameters, grouped as ``layers`` says
    (see :mod:`sgdlens.layers`); parameters of no group go to a hidden last group ``""``."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if not params:
        raise ValueError("PhaseMonitor(optimizer=...) holds no parameters; nothing to monitor")
    fallback = [
        f"group{gi}.{pj}" for gi, g in enumerate(opt.param_groups) for pj in range(len(g["params"]))
    ]
    names = group_names(model, params, layers, fallback)
    if model is not None:  # groups in the order of their first parameter in the model
        order = {id(p): i for i, p in enumerate(model.parameters())}
        first: dict[str, int] = {}
        for p, n in zip(params, names):
            if n is not None:
                first[n] = min(first.get(n, len(order)), order.get(id(p), len(order)))
        groups = sorted(first, key=lambda n: (first[n], n))
    else:
        groups = list(dict.fromkeys(n for n in names if n is not None))
    if None in names:
        groups.append("")
    index = {n: i for i, n in enumerate(groups)}
    device = params[0].device
    shapes = _torch.fsdp1_shapes(model) if model is not None else {}
    return ParamView(
        params=tuple(params),
        layer_of=tuple(index[n if n is not None else ""] for n in names),
        layers=tuple(groups),
        device=device,
        dtype=_torch.acc_dtype(device),
        log_every=log_every,
        optimizer=opt,
        sharded=_sharded(params, model),
        ndims=tuple(len(shapes.get(id(p), p.shape)) for p in params),
    )


def _sharded(params: Sequence[Tensor], model: nn.Module | None) -> bool:
    """Whether the parameters are split across ranks: FSDP2 DTensors, or FSDP1 flat shards.

    FSDP1 parameters carry no placement, so the sharding strategy is read from the
    ``FullyShardedDataParallel`` modules in ``model``.
    """
    if any(_torch.is_sharded(p) for p in params):
        return True
    if not any(_torch.fsdp1_flattened(p) for p in params):
        return False
    strategies = _torch.fsdp1_strategies(model) if model is not None else set()
    if not strategies:
        raise ValueError(
            f"PhaseMonitor(model={type(model).__name__}): the optimizer holds parameters that "
            f"FullyShardedDataParallel (FSDP1) flattened into shards, and the monitor reads "
            f"the sharding strategy from the FSDP modules; pass the wrapped model, "
            f"model=FullyShardedDataParallel(net, ...)"
        )
    if strategies & {"HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"}:
        raise ValueError(
            f"PhaseMonitor: FSDP1 sharding_strategy {sorted(strategies)} replicates shards "
            f"across groups of ranks, which sgdlens does not reduce; use FULL_SHARD or "
            f"SHARD_GRAD_OP, or FSDP2 fully_shard"
        )
    if "NO_SHARD" in strategies and len(strategies) > 1:
        raise ValueError(
            f"PhaseMonitor: FSDP1 modules mix sharding strategies {sorted(strategies)}; "
            f"give every FullyShardedDataParallel module the same sharding_strategy"
        )
    return strategies != {"NO_SHARD"}
