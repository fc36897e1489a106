"""Stochastic estimates of the Hessian trace: Hutchinson and Hutch++."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    LossFn,
    check_fn,
    check_generator,
    check_int,
    check_mode,
    check_model,
    own_generator,
)
from sgdlens.probes.hvp import Operator, check_fd_step, check_method
from sgdlens.probes.restore import preserved

__all__ = ["TraceResult", "hessian_trace"]


@dataclass(frozen=True)
class TraceResult:
    """A stochastic estimate of the Hessian trace.

    Attributes:
        trace: the estimate of ``tr H``.
        stderr: its standard error (Hutchinson: sample std / sqrt(samples); Hutch++: that of
            the residual Hutchinson part, the low-rank part being exact given its sketch).
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: probe vectors used by the stochastic part.
        hvps: Hessian-vector products spent.
        hvp_method: how HVPs were computed.
    """

    trace: float
    stderr: float
    method: str
    samples: int
    hvps: int
    hvp_method: str

    def __float__(self) -> float:
        return self.trace


def _rademacher(n: int, m: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randint(0, 2, (m, n), generator=generator, device=dev).to(like.dtype) * 2 - 1
    return z.to(like.device)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    method: str = "hutchinson",
    samples: int = 50,
    generator: torch.Generator | None = None,
    hvp_method: str = "auto",
    mode: str = "eval",
    fd_step: float | None = None,
) -> TraceResult:
    """Estimate ``tr H`` with Hutchinson or Hutch++ (Meyer et al. 2021), with a standard error.

    Hutchinson averages ``zᵀHz`` over Rademacher vectors ``z``. Hutch++ spends a third of the
    budget on a sketch ``Q = orth(H S)``, a third on ``tr(QᵀHQ)`` exactly, and a third on
    Hutchinson for the deflated rest; it has far lower variance when a few eigenvalues dominate.

    Cost: ``samples`` HVPs (each one forward and two backward passes per batch).

    Args:
        model: the model; left bit-for-bit unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        method: ``"hutchinson"`` (default) or ``"hutch++"``.
        samples: the HVP budget; at least 2 for Hutchinson (for a standard error), 3 for
            Hutch++.
        generator: for the random probe vectors.
        hvp_method: ``"auto"``, ``"exact"`` or ``"fd"`` (see :func:`hvp`).
        mode: ``"eval"`` (default) or ``"train"``.
        fd_step: finite-difference step norm (see :func:`hvp`).

    Returns:
        :class:`TraceResult`.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> y = torch.randn(64, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> loss_fn = lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square().mean()
        >>> est = probes.hessian_trace(model, loss_fn, (x, y), method="hutch++", samples=9)
        >>> abs(est.trace - float(torch.trace(2 * x.T @ x / 64))) < 1e-8
        True
    """
    check_model(model)
    check_fn(loss_fn)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    check_int(
        samples, "samples", 3 if method == "hutch++" else 2, "; it is the number of HVPs spent"
    )
    hvp_method = check_method(hvp_method)
    mode = check_mode(mode)
    fd_step = check_fd_step(fd_step)
    generator = check_generator(generator)
    with preserved(model):
        generator = own_generator(generator)
        op = Operator(model, loss_fn, data, mode, hvp_method, fd_step)
        n = op.n
        like = op.theta_flat
        if method == "hutchinson":
            z = _rademacher(n, samples, like, generator)
            vals = torch.stack([torch.dot(zi, op.matvec(zi)) for zi in z]).double()
            trace = float(vals.mean())
            stderr = float(vals.std(unbiased=True)) / math.sqrt(samples)
            used = samples
        else:
            s = samples // 3
            g = samples - 2 * s
            S = _rademacher(n, s, like, generator)
            HS = torch.stack([op.matvec(si) for si in S])
            # QR in float32 at least: no bfloat16/float16 kernel (geqrf) on CPU
            work = torch.promote_types(HS.dtype, torch.float32)
            Q = torch.linalg.qr(HS.T.to(work))[0].to(HS.dtype)  # (n, s)
            HQ = torch.stack([op.matvec(qi) for qi in Q.T])
            low = float(torch.sum(Q.T * HQ))
            G = _rademacher(n, g, like, generator)
            G = G - (G @ Q) @ Q.T
            vals = torch.stack([torch.dot(gi, op.matvec(gi)) for gi in G]).double()
            trace = low + float(vals.mean())
            stderr = float(vals.std(unbiased=True)) / math.sqrt(g) if g > 1 else float("nan")
            used = g
        return TraceResult(trace, stderr, method, used, op.hvps, str(op.method))
