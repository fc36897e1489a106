"""Reaching the real ``torch.optim.Optimizer`` under framework wrappers."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any, name: str = "optimizer") -> Optimizer:
    """The real ``torch.optim.Optimizer`` under framework wrappers.

    Lightning's ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer`` keep the real
    optimizer in ``.optimizer`` (possibly nested); hooks must go on that object.
    """
    opt = optimizer
    for _ in range(16):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    if isinstance(opt, Optimizer):
        return opt
    raise TypeError(
        f"{name} needs a torch.optim.Optimizer (or a wrapper with one in "
        f".optimizer), got {type(optimizer).__name__} {optimizer!r:.80}; pass the optimizer you "
        f"call .step() on"
    )
