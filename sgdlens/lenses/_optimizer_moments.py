"""The optimizer's first-moment buffer read as the running mean of the gradient.

``GradSNR(decay="optimizer")`` keeps no buffer of its own for E g: it reads SGD's
``momentum_buffer`` or Adam's ``exp_avg`` at log points. Per monitored tensor it keeps two
float64 numbers, the same recursion as the buffer's applied to ‖g‖² and to 1:

* Adam / AdamW (β₁ per param group): ``x ← β₁ x + (1 − β₁) y`` from 0;
* SGD (momentum μ > 0, dampening d): ``x ← y`` at the tensor's first step (torch clones the
  gradient into the buffer), then ``x ← μ x + (1 − d) y``;

with ``y = ‖g‖²`` (giving ``s``) and ``y = 1`` (giving the weight sum ``W``, which is
Adam's ``1 − β₁ᵗ`` and SGD's ``μ^(t−1) + (1 − d)(1 − μ^(t−1))/(1 − μ)``). Then
E g = buffer / W and E‖g‖² = s / W are means with the same weights. The coefficients are read
from the param groups at every step, so a scheduler that cycles β₁ or μ is followed.

A tensor without a gradient at a step is skipped, as the optimizer skips it (its buffer does
not decay): ``s`` and ``W`` stay. A step with non-finite gradients is left out of ``s`` and
``W`` (one ``torch.where``, no host read): with a fused optimizer under a ``GradScaler`` the
optimizer skips it too; an optimizer that takes it has a non-finite buffer from then on, and
so do the records.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sgdlens import _torch
from sgdlens.lenses.base import State, Step, Subset

__all__ = ["OptimizerMoments", "resuming"]

OWNER = "GradSNR(decay='optimizer')"
FIX = "use GradSNR(decay=0.9), which keeps its own running mean"
#: set while a framework callback attaches to a resumed run (the optimizer's state is loaded,
#: the monitor's is loaded right after): the held-state check moves to the first step
_RESUMING = contextvars.ContextVar("sgdlens_resuming", default=False)


@contextlib.contextmanager
def resuming() -> Iterator[None]:
    """Attach to an optimizer whose state a checkpoint restored, before the monitor's own
    ``load_state_dict``: a parameter with optimizer state is refused at its first step unless
    the loaded monitor state has its history (not at construction)."""
    token = _RESUMING.set(True)
    try:
        yield
    finally:
        _RESUMING.reset(token)


def _kind(opt: Any) -> str:
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(opt, torch.optim.SGD):
        return "sgd"
    raise ValueError(
        f"{OWNER} reads the running mean of the gradient that torch.optim.SGD (momentum > 0), "
        f"Adam and AdamW keep; the optimizer is {type(opt).__name__}: {FIX}"
    )


def _coefficients(opt: Any, kind: str, j: int) -> tuple[float, float, float]:
    """``(a, c, first)`` of param group ``j``: buffer ← a·buffer + c·g, or first·g at a
    tensor's first step; refused where the buffer is not a running mean of ``.grad``."""
    group = opt.param_groups[j]
    wd = float(group.get("weight_decay", 0.0))
    decoupled = isinstance(opt, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    if wd != 0 and not decoupled:
        alt = "AdamW or Adam(decoupled_weight_decay=True)" if kind == "adam" else "no L2 term"
        raise ValueError(
            f"{OWNER}: param group {j} of {type(opt).__name__} has weight_decay={wd}, which "
            f"adds wd·θ to the gradient its buffer averages (it is not a running mean of "
            f".grad); {FIX}, or {alt}"
        )
    if kind == "adam":
        b1 = float(group["betas"][0])
        return b1, 1.0 - b1, 1.0 - b1
    mu, d = float(group["momentum"]), float(group["dampening"])
    if mu == 0:
        raise ValueError(
            f"{OWNER}: param group {j} of SGD has momentum={mu}, so it keeps no buffer; {FIX}, "
            f"or SGD(momentum=0.9)"
        )
    return mu, 1.0 - d, 1.0


class OptimizerMoments:
    """E g from the optimizer's buffer, E‖g‖² from ``state["ema"]`` (see the module docstring).

    ``state["ema"]`` has shape ``(2, n)`` for the ``n`` tensors of ``sub``: row 0 is ``s``,
    row 1 is ``W``.
    """

    def __init__(self, sub: Subset) -> None:
        view = sub.view
        opt = view.optimizer
        if opt is None:
            raise ValueError(f"{OWNER} needs the optimizer: attach it with PhaseMonitor(opt, ...)")
        self.sub, self.opt, self.kind = sub, opt, _kind(opt)
        self.key = "exp_avg" if self.kind == "adam" else "momentum_buffer"
        group_of = {id(p): j for j, g in enumerate(opt.param_groups) for p in g["params"]}
        self.groups = [group_of[id(p)] for p in sub.params]
        self.used = sorted(set(self.groups))
        #: tensors whose buffers have a history: refused unless a loaded state covers them
        self.unseen = [i for i, p in enumerate(sub.params) if opt.state.get(p)]
        self.held_message = (
            f"{OWNER}: the {type(opt).__name__} already holds state for {len(self.unseen)} of "
            f"the monitored parameters, so its buffers have a history the lens did not see; "
            f"attach the monitor before the first step (to resume, build it before "
            f"opt.load_state_dict(...) and load its own state_dict), or use GradSNR(decay=0.9)"
        )
        if self.unseen and not _RESUMING.get():
            raise ValueError(self.held_message)
        self.ones = torch.ones(len(self.groups), dtype=view.dtype, device=view.device)
        self.raw: Any = None
        self.refresh()

    def init(self) -> State:
        view = self.sub.view
        return {"ema": torch.zeros(2, len(self.groups), dtype=view.dtype, device=view.device)}

    def refresh(self) -> None:
        """Re-read the groups' coefficients if they changed (one tuple comparison per step)."""
        groups = self.opt.param_groups
        raw = tuple(
            tuple(groups[j].get(k) for k in ("betas", "momentum", "dampening", "weight_decay"))
            for j in self.used
        )
        if raw == self.raw:
            return
        per_group = {j: _coefficients(self.opt, self.kind, j) for j in self.used}
        view = self.sub.view
        a, c, first = (
            torch.tensor(
                [per_group[j][k] for j in self.groups], dtype=view.dtype, device=view.device
            )
            for k in range(3)
        )
        self.a, self.c, self.first = a, c, first
        self.first_differs = any(v[1] != v[2] for v in per_group.values())
        self.raw = raw

    def update(self, state: State, step: Step) -> None:
        if self.unseen:  # attached under resuming(): the loaded state must hold their history
            if not bool((state["ema"][1, self.unseen] > 0).all()):
                raise ValueError(self.held_message + " (no monitor state for them was loaded)")
            self.unseen = []
        self.refresh()
        flag = step.flag
        if flag is False:  # the CPU skips a non-finite step exactly
            return
        sub, x = self.sub, state["ema"]
        y = torch.stack([sub.take(step.grad_sq), self.ones])  # (‖g‖², 1) per tensor
        c = torch.where(x[1] == 0, self.first, self.c) if self.first_differs else self.c
        mask: Tensor | None = None if flag else step.ok
        if not (sub.whole and step.fused):  # fused: every gradient there (C loops)
            grads = [step.grads[i] for i in sub.which]
            if any(g is None for g in grads):  # the optimizer skips those tensors
                have = torch.tensor([g is not None for g in grads], device=x.device)
                mask = have if mask is None else have & mask
        if mask is None:
            x.mul_(self.a).addcmul_(y, c)
        else:
            x.copy_(torch.where(mask, torch.addcmul(x * self.a, y, c), x))

    def moments(self, state: State) -> tuple[Tensor, Tensor]:
        """Per layer of ``sub``: ‖E g‖² and E‖g‖², over this rank's shards (the lens declares
        their sum over the ranks)."""
        sub, x = self.sub, state["ema"]
        view = sub.view
        bufs = [self.opt.state.get(p, {}).get(self.key) for p in sub.params]
        have = [i for i, b in enumerate(bufs) if b is not None]
        buf_sq = torch.zeros(len(bufs), dtype=view.dtype, device=view.device)
        if have:
            norms = _torch.norms([_torch.local(bufs[i]) for i in have], view.device, view.dtype)
            index = torch.tensor(have, dtype=torch.long, device=view.device)
            buf_sq.index_copy_(0, index, norms.square())
        w = x[1]
        seen = w > 0  # a tensor that never had a gradient contributes nothing
        safe = torch.where(seen, w, self.ones)
        mean_sq = torch.where(seen, buf_sq / safe.square(), 0.0)
        second = torch.where(seen, x[0] / safe, 0.0)
        return sub.per_layer(mean_sq), sub.per_layer(second)
