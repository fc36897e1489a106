"""Endpoints as named tensors, BatchNorm statistics re-estimated, several modules preserved: the
helpers that the path and plane probes share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    Evaluator,
    LossFn,
)
from sgdlens.probes.restore import preserved

__all__ = ["check_bn", "preserved_all", "recompute_bn", "state_of"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def state_of(x: Any, template: nn.Module, name: str) -> dict[str, Tensor]:
    """Parameters and buffers of a model or state dict, under the template's (deduplicated)
    names."""
    if isinstance(x, nn.Module):
        sd: Mapping[str, Any] = {**dict(x.named_parameters()), **dict(x.named_buffers())}
    elif isinstance(x, Mapping):
        sd = x
    else:
        raise TypeError(
            f"{name} must be an nn.Module or a state dict, got {type(x).__name__}; pass the "
            "model or model.state_dict()"
        )
    out = {}
    want = [n for n, _ in template.named_parameters()] + [n for n, _ in template.named_buffers()]
    ref: dict[str, Tensor] = dict(template.named_parameters())
    ref.update(dict(template.named_buffers()))
    for key in want:
        if key not in sd:
            raise ValueError(
                f"{name} has no entry {key!r} that the model has; interpolate between models "
                "of the same architecture (state dicts from model.state_dict())"
            )
        t = sd[key]
        if not isinstance(t, Tensor) or t.shape != ref[key].shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{name}[{key!r}] has shape {shape}, the model's is {tuple(ref[key].shape)}; "
                "use endpoints of the same architecture"
            )
        out[key] = t.detach().to(device=ref[key].device)
    return out


def recompute_bn(
    template: nn.Module,
    state: dict[str, Tensor],
    batches: list[Any],
    loss_fn: LossFn,
    seed: int,
) -> dict[str, Tensor]:
    """Re-estimate BatchNorm running statistics at ``state`` without touching the module.

    In train mode BatchNorm normalises by batch statistics and updates
    ``r <- (1-m) r + m s``. Starting from ``r = 0`` (mean) and ``r = 1`` (var) the batch
    statistic is recovered as ``r/m`` and ``(r-(1-m))/m`` (exactly, for ``momentum=None``, by
    setting ``num_batches_tracked`` to 0), then averaged over batches with equal weights.
    """
    bns = [
        (name, m)
        for name, m in template.named_modules()
        if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None
    ]
    if not bns:
        return state
    sums: dict[str, Tensor] = {}
    ev = Evaluator(template, loss_fn, batches, "loss_fn", seed)
    was = {m: m.training for m in template.modules()}
    template.train()
    try:
        for i in range(len(batches)):
            probe = dict(state)
            for name, _ in bns:
                pre = f"{name}." if name else ""
                probe[pre + "running_mean"] = torch.zeros_like(state[pre + "running_mean"])
                probe[pre + "running_var"] = torch.ones_like(state[pre + "running_var"])
                probe[pre + "num_batches_tracked"] = torch.zeros_like(
                    state[pre + "num_batches_tracked"]
                )
            with torch.no_grad():
                ev.one(probe, i)
            for name, m in bns:
                pre = f"{name}." if name else ""
                momentum = getattr(m, "momentum", None)
                mom = 1.0 if momentum is None else float(momentum)
                mean = probe[pre + "running_mean"] / mom
                var = (probe[pre + "running_var"] - (1 - mom)) / mom
                for key, val in ((pre + "running_mean", mean), (pre + "running_var", var)):
                    sums[key] = val if key not in sums else sums[key] + val
    finally:
        for mod, flag in was.items():
            mod.training = flag
    out = dict(state)
    for key, val in sums.items():
        out[key] = (val / len(batches)).to(state[key].dtype)
    return out


def check_bn(bn: Any) -> str:
    if bn not in ("carry", "recompute"):
        raise ValueError(
            f"bn must be 'carry' (interpolate running statistics) or 'recompute' (re-estimate "
            f"them at each alpha on bn_data), got {bn!r}"
        )
    return str(bn)


class preserved_all:
    """``preserved`` over several (distinct) modules at once."""

    def __init__(self, mods: list[nn.Module]) -> None:
        seen: list[nn.Module] = []
        for m in mods:
            if not any(m is s for s in seen):
                seen.append(m)
        self.cms = [preserved(m) for m in seen]

    def __enter__(self) -> None:
        entered = []
        try:
            for cm in self.cms:
                cm.__enter__()
                entered.append(cm)
        except BaseException:
            for cm in reversed(entered):
                cm.__exit__(None, None, None)
            raise
        self.entered = entered

    def __exit__(self, *exc: Any) -> None:
        for cm in reversed(self.entered):
            cm.__exit__(None, None, None)
