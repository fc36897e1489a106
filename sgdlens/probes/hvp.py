"""Curvature probes: Hessian-vector products, top eigenvalues, trace, edge-of-stability ratio.

All of them act on the Hessian of the *mean over batches* of ``loss_fn(model, batch)`` with
respect to the trainable parameters (``requires_grad=True``; tied weights counted once), at the
model's current weights, evaluated with ``torch.func.functional_call`` inside
:func:`~sgdlens.probes.preserved`.

Hessian-vector products use double backward (Pearlmutter's trick through autograd). Where a
kernel has no double backward — on CPU, torch's fused scaled-dot-product attention, used by
``nn.MultiheadAttention(need_weights=False)`` and ``nn.TransformerEncoderLayer`` — the probe first
retries under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` and, failing that, falls back
to a central finite difference of gradients. Every result says which was used (``method``).

Costs are counted in HVPs: one double-backward HVP is about one forward and two backward passes
per batch; a finite-difference HVP is two forward and two backward passes per batch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    Evaluator,
    LossFn,
    Space,
    as_batches,
    check_fn,
    check_mode,
    check_model,
    check_positive,
    probe_seed,
    set_mode,
    trainable,
)
from sgdlens.probes.restore import preserved

__all__ = ["HVPResult", "Operator", "as_flat", "check_fd_step", "check_method", "hvp"]

EXACT = "double-backward"
EXACT_MATH = "double-backward (math sdpa)"
FD = "finite-difference"
_METHODS = ("auto", "exact", "fd")


class _NoDoubleBackward(Exception):
    pass


class Operator:
    """Hessian of the mean loss as a flat matvec: ``H v``, or ``D H D v + c v`` with the
    diagonal ``scale`` D and ``shift`` c when set; over the trainable parameters, or those of
    them in ``params`` (the others held at their values)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        mode: str,
        method: str = "auto",
        fd_step: float | None = None,
        scale: Tensor | None = None,
        params: Collection[Tensor] | None = None,
    ) -> None:
        self.batches = as_batches(data)
        self.items = trainable(model)
        if params is not None:
            ids = {id(p) for p in params}
            self.items = [(n, p) for n, p in self.items if id(p) in ids]
        self.space = Space.of(self.items)
        self.theta = [p.detach() for _, p in self.items]
        self.theta_flat = self.space.flatten(self.theta)
        # Buffers are cloned: train-mode BatchNorm updates them in place.
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.ev = Evaluator(model, loss_fn, self.batches, "loss_fn", probe_seed())
        self.requested = method
        self.method: str | None = {"exact": EXACT, "fd": FD}.get(method)
        self.fallback_reason: str | None = None
        self.fd_step_arg = fd_step
        self.fd_step: float | None = None
        self.scale = scale
        self.shift: Tensor | None = None
        self.hvps = 0
        set_mode(model, mode)

    @property
    def n(self) -> int:
        return self.space.numel

    def _named(self, tensors: list[Tensor]) -> dict[str, Tensor]:
        named = dict(zip(self.space.names, tensors))
        named.update(self.buffers)
        return named

    def loss(self, flat: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            ts = self.theta if flat is None else self.space.unflatten(flat)
            return self.ev.mean(self._named(ts))

    def grad(self, flat: Tensor) -> Tensor:
        leaves = [t.detach().requires_grad_(True) for t in self.space.unflatten(flat)]
        total = torch.zeros_like(flat)
        for i in range(len(self.batches)):
            with torch.enable_grad():
                loss = self.ev.one(self._named(leaves), i)
                gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            total += self._flat_or_zero(gs, leaves)
        return total / len(self.batches)

    def _flat_or_zero(self, gs: Any, like: list[Tensor]) -> Tensor:
        return self.space.flatten(
            [torch.zeros_like(t) if g is None else g for g, t in zip(gs, like)]
        )

    def _exact(self, v: Tensor) -> Tensor:
        leaves = [t.detach().requires_grad_(True) for t in self.theta]
        vs = self.space.unflatten(v)
        total = torch.zeros_like(v)
        for i in range(len(self.batches)):
            with torch.enable_grad():
                loss = self.ev.one(self._named(leaves), i)
                gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                pairs = [
                    (g, t, u)
                    for g, t, u in zip(gs, leaves, vs)
                    if g is not None and g.requires_grad
                ]
                hv: list[Tensor | None] = [None] * len(leaves)
                if pairs:
                    try:
                        out = torch.autograd.grad(
                            [g for g, _, _ in pairs],
                            leaves,
                            grad_outputs=[u for _, _, u in pairs],
                            allow_unused=True,
                        )
                    except (RuntimeError, NotImplementedError) as e:
                        raise _NoDoubleBackward(str(e)) from e
                    hv = list(out)
            total += self._flat_or_zero(hv, leaves)
        return total / len(self.batches)

    def _fd(self, v: Tensor) -> Tensor:
        vnorm = float(v.norm())
        if vnorm == 0.0:
            return torch.zeros_like(v)
        if self.fd_step is None:
            if self.fd_step_arg is not None:
                self.fd_step = self.fd_step_arg
            else:
                eps = torch.finfo(self.space.dtype).eps
                self.fd_step = eps ** (1 / 3) * max(1.0, float(self.theta_flat.norm()))
        h = self.fd_step / vnorm
        gp = self.grad(self.theta_flat + h * v)
        gm = self.grad(self.theta_flat - h * v)
        return (gp - gm) / (2 * h)

    def _hessian_matvec(self, v: Tensor) -> Tensor:
        if self.method == EXACT:
            return self._exact(v)
        if self.method == EXACT_MATH:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return self._exact(v)
        if self.method == FD:
            return self._fd(v)
        # auto: find the first path that works, then keep it
        try:
            out = self._exact(v)
            self.method = EXACT
            return out
        except _NoDoubleBackward as e:
            first = str(e)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.MATH):
                out = self._exact(v)
            self.method = EXACT_MATH
            self.fallback_reason = first
            return out
        except _NoDoubleBackward as e:
            self.fallback_reason = str(e)
        self.method = FD
        return self._fd(v)

    def matvec(self, v: Tensor) -> Tensor:
        self.hvps += 1
        try:
            if self.scale is None:
                out = self._hessian_matvec(v)
            else:
                out = self.scale * self._hessian_matvec(self.scale * v)
        except _NoDoubleBackward as e:
            raise RuntimeError(_exact_failed(e)) from e
        return out if self.shift is None else out + self.shift * v


def _exact_failed(e: Exception) -> str:
    return (
        f"method='exact' was requested but double backward failed ({e}); pass method='auto' "
        "to fall back to the math attention kernel or a finite-difference HVP"
    )


def check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(
            f"method must be one of {_METHODS}, got {method!r}; 'auto' uses double backward "
            "and falls back to a finite-difference HVP where a kernel lacks it"
        )
    return str(method)


def check_fd_step(fd_step: Any) -> float | None:
    if fd_step is None:
        return None
    return check_positive(fd_step, "fd_step", "; it is the norm of the finite-difference step")


@dataclass(frozen=True)
class HVPResult:
    """A Hessian-vector product and how it was computed.

    Attributes:
        value: ``H v``, in the form ``v`` was given (a dict name -> tensor, or a flat tensor).
        method: ``"double-backward"``, ``"double-backward (math sdpa)"`` or
            ``"finite-difference"``.
        fallback_reason: why double backward was not used (the autograd error), else ``None``.
        fd_step: the norm of the finite-difference step, when one was taken.
    """

    value: dict[str, Tensor] | Tensor
    method: str
    fallback_reason: str | None = None
    fd_step: float | None = None


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    v: Mapping[str, Tensor] | Tensor,
    *,
    method: str = "auto",
    mode: str = "eval",
    fd_step: float | None = None,
) -> HVPResult:
    """Hessian-vector product ``H v`` of the mean loss at the model's weights.

    ``H`` is the Hessian of ``mean_b loss_fn(model, b)`` over the batches of ``data`` (each batch
    weighted equally) with respect to the trainable parameters (``requires_grad=True``, tied
    weights once, in ``model.named_parameters()`` order).

    Cost: per batch, one forward and two backward passes (double backward); with the
    finite-difference fallback, two forward and two backward passes.

    Args:
        model: the model; left bit-for-bit unchanged (see :func:`preserved`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch, or an iterable of batches (averaged, equal weights).
        v: the direction: a dict mapping each trainable parameter name to a tensor of its
            shape, or a flat tensor of the total parameter count.
        method: ``"auto"`` (double backward; if a kernel lacks it, retry under the math SDPA
            kernel, then fall back to finite differences), ``"exact"`` (double backward only)
            or ``"fd"`` (central difference of gradients).
        mode: ``"eval"`` (default: dropout off, BatchNorm running statistics) or ``"train"``
            (dropout masks are fixed by a seed for the duration of the call).
        fd_step: the norm of the finite-difference step; default ``cbrt(eps) * max(1, |θ|)``.

    Returns:
        :class:`HVPResult` with ``value`` in the form of ``v`` and the ``method`` used.

    Raises:
        TypeError: wrong argument types (``v`` neither dict nor tensor, ...).
        ValueError: ``v`` of the wrong size, unknown ``method``/``mode``.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> loss_fn = lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square().mean()
        >>> out = probes.hvp(model, loss_fn, (x, y), {"weight": torch.ones(1, 3).double()})
        >>> H = 2 * x.T @ x / 16
        >>> torch.allclose(out.value["weight"][0], H @ torch.ones(3).double())
        True
        >>> out.method
        'double-backward'
    """
    check_model(model)
    check_fn(loss_fn)
    method = check_method(method)
    mode = check_mode(mode)
    fd_step = check_fd_step(fd_step)
    with preserved(model):
        op = Operator(model, loss_fn, data, mode, method, fd_step)
        flat = as_flat(v, op.space, "v")
        hv = op.matvec(flat.to(device=op.space.device))
        value: dict[str, Tensor] | Tensor = (
            op.space.to_dict(hv) if isinstance(v, Mapping) else hv.to(flat.dtype)
        )
        return HVPResult(value, str(op.method), op.fallback_reason, op.fd_step)


def as_flat(v: Any, space: Space, name: str) -> Tensor:
    if isinstance(v, Mapping):
        for n in space.names:
            if n in v and tuple(v[n].shape) != tuple(space.shapes[space.names.index(n)]):
                i = space.names.index(n)
                raise ValueError(
                    f"{name}[{n!r}] has shape {tuple(v[n].shape)}, expected "
                    f"{tuple(space.shapes[i])}; give one tensor per parameter, of its shape"
                )
        return space.flatten_dict(v)
    if isinstance(v, Tensor):
        if v.dim() != 1 or v.numel() != space.numel:
            raise ValueError(
                f"{name} as a flat tensor must have shape ({space.numel},), the trainable "
                f"parameter count, got {tuple(v.shape)}; or pass a dict name -> tensor"
            )
        return v.to(space.dtype)
    raise TypeError(
        f"{name} must be a dict of parameter name -> tensor or a flat tensor, got "
        f"{type(v).__name__}"
    )
