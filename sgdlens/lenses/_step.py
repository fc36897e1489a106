"""One optimizer step as the lenses see it (:class:`Step`, re-exported by
:mod:`sgdlens.lenses.base`): the gradients, read once, and the statistics lenses share."""

from __future__ import annotations

import math
import operator
from itertools import repeat
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from sgdlens import _torch

if TYPE_CHECKING:
    from sgdlens.lenses.base import ParamView

__all__ = ["Step"]


class _once:  # a decorator, like functools.cached_property
    """``functools.cached_property`` without its lock (Python < 3.12 takes an ``RLock`` on
    every first read; a ``Step`` lives for one optimizer step on one thread and reads five
    of them per step)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.__doc__ = fn, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


class Step:
    """One optimizer step as the lenses see it, with lazily computed shared statistics.

    Attributes:
        view: the parameter view.
        index: optimizer steps seen so far, this one included (1 at the first step).
        grads: ``p.grad`` for each parameter (``None`` where the parameter has none).
        logging: whether this step is a log point.
    """

    def __init__(self, view: ParamView, index: int, logging: bool) -> None:
        self.view = view
        self.index = index
        self.logging = logging
        if view.plain:  # the hot path: one attribute read per parameter, in a C loop
            self.grads: list[Tensor | None] = list(map(_GRAD, view.params))
        else:
            self.grads = [None if p.grad is None else _torch.local(p.grad) for p in view.params]

    @_once
    def fused(self) -> bool:
        """Whether the view is plain (one device and dtype, no shards) and every parameter has
        a dense gradient: per-step updates may then hand :attr:`grads` to one foreach op as
        they are. Checked in C loops (``map``), with no Python work per parameter."""
        grads = self.grads
        return (
            self.view.plain
            and not any(map(operator.is_, grads, repeat(None)))
            and not any(map(operator.is_not, map(_LAYOUT, grads), repeat(torch.strided)))
        )

    @_once
    def present(self) -> list[int]:
        """Indices of the parameters that have a gradient this step."""
        return [i for i, g in enumerate(self.grads) if g is not None]

    @_once
    def grad_sq(self) -> Tensor:
        """Squared gradient norm per parameter (0 where there is none)."""
        view = self.view
        if self.fused:
            try:  # one kernel for every norm (in at least float32: asked for float64
                # outright, the CPU kernel takes a path ten times slower), then one cast
                norms = _torch._foreach_norm(cast(list[Tensor], self.grads), view.big)
                return torch.stack(norms).to(view.dtype).square_()
            except (RuntimeError, TypeError, NotImplementedError):  # old torch
                pass
        grads = [g for g in self.grads if g is not None]
        sq = _torch.norms(grads, view.device, view.dtype).square()
        if len(grads) == len(self.grads):
            return sq
        out = torch.zeros(len(self.grads), dtype=view.dtype, device=view.device)
        index = torch.tensor(self.present, dtype=torch.long, device=view.device)
        return out.index_copy_(0, index, sq)

    @_once
    def grad_sq_total(self) -> Tensor:
        """Squared norm of the whole gradient (0-d)."""
        return self.grad_sq.sum()

    @_once
    def flag(self) -> bool | None:
        """:attr:`ok` as a Python bool where reading it is free (the CPU), else ``None``: the
        running statistics then skip a non-finite step exactly."""
        view = self.view
        if view.device.type not in _torch.FREE_HOST_READ:
            return None
        if view.sharded:
            return bool(self.ok)
        return math.isfinite(self.grad_sq_total.item())  # one read, not isfinite's kernels

    @_once
    def ok(self) -> Tensor:
        """0-d bool: every gradient of this step is finite (an overflow of the norm counts too).

        Under FSDP the ranks agree on it through one tiny all-reduce per step (every rank must
        skip the same steps, and a non-finite value sits on one rank's shard).
        """
        view = self.view
        if not view.sharded and self.flag is not None:
            return view.flags[self.flag]
        total = self.grad_sq_total
        ok = (total - total) == 0  # 2 kernels; isfinite takes 4 (abs, ne, eq, mul)
        if view.sharded:
            ok = view.reduce_sum((~ok).to(view.dtype)) == 0
        return ok


_GRAD, _LAYOUT = operator.attrgetter("grad"), operator.attrgetter("layout")
