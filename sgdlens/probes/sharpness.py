"""Top Hessian eigenvalues (the sharpness), plain or preconditioned by Adam's second moments."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens._optim import unwrap_optimizer
from sgdlens.probes._common import (
    LossFn,
    check_fn,
    check_generator,
    check_int,
    check_mode,
    check_model,
    check_positive,
    own_generator,
    trainable,
)
from sgdlens.probes.hvp import Operator, as_flat, check_fd_step, check_method
from sgdlens.probes.lanczos import lanczos, power_iteration, random_unit
from sgdlens.probes.restore import preserved

__all__ = ["SharpnessResult", "adam_preconditioner", "sharpness"]


@dataclass(frozen=True)
class SharpnessResult:
    """Top Hessian eigenvalues and how they were found.

    Attributes:
        eigenvalues: float64 CPU tensor of shape ``(k,)``, ordered per ``which`` (for the
            default ``"LA"``: algebraically largest first).
        residuals: ``|H y - λ y|`` for each Ritz pair (an error bound on each eigenvalue).
        hvps: Hessian-vector products spent.
        converged: every residual fell below ``tol * |λ|`` (or the Krylov space was exhausted).
        method: how HVPs were computed (see :class:`HVPResult`).
        algorithm: ``"lanczos"`` or ``"power"``.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        preconditioned: ``True`` when these are eigenvalues of ``P^{-1/2} H P^{-1/2}``.
        eigenvectors: ``(k, n)`` unit vectors in the flat parameter order, when requested.
        names: the parameter names of the flat order.
        fallback_reason: the autograd error that forced a fallback, if any.
    """

    eigenvalues: Tensor
    residuals: Tensor
    hvps: int
    converged: bool
    method: str
    algorithm: str = "lanczos"
    which: str = "LA"
    preconditioned: bool = False
    eigenvectors: Tensor | None = None
    names: tuple[str, ...] = ()
    shapes: tuple[torch.Size, ...] = field(default=(), repr=False)
    fallback_reason: str | None = None

    @property
    def value(self) -> float:
        """The first eigenvalue (the sharpness, for ``which="LA"``)."""
        return float(self.eigenvalues[0])

    def __float__(self) -> float:
        return self.value

    def vector(self, i: int = 0) -> dict[str, Tensor]:
        """Eigenvector ``i`` as a dict parameter name -> tensor (needs ``return_vectors``)."""
        if self.eigenvectors is None:
            raise ValueError("no eigenvectors stored; call sharpness(..., return_vectors=True)")
        out = {}
        pos = 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = self.eigenvectors[i, pos : pos + n].reshape(shape)
            pos += n
        return out


def adam_preconditioner(
    model: nn.Module, optimizer: Any, names: list[str] | None = None
) -> dict[str, Tensor]:
    """Adam's diagonal preconditioner ``P = sqrt(v / (1 - β₂ᵗ)) + ε`` per trainable parameter.

    Read from an ``Adam``/``AdamW`` optimizer's state (``max_exp_avg_sq`` with ``amsgrad``).

    Cost: no forward or backward pass.

    Example:
        >>> import torch
        >>> from sgdlens.probes.sharpness import adam_preconditioner
        >>> m = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(m.parameters())
        >>> m(torch.randn(4, 2)).sum().backward(); opt.step()
        >>> sorted(adam_preconditioner(m, opt))
        ['bias', 'weight']
    """
    opt = unwrap_optimizer(optimizer, "preconditioner")
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"preconditioner must be a torch.optim.Adam or AdamW optimizer, got "
            f"{type(opt).__name__}; for SGD use the plain sharpness (preconditioner=None)"
        )
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = {}
    for name, p in trainable(model):
        if names is not None and name not in names:
            continue
        if id(p) not in groups:
            raise ValueError(
                f"parameter {name!r} is trainable but not in the optimizer; freeze it "
                "(requires_grad=False) or add it to the optimizer"
            )
        st = opt.state.get(p, {})
        if "exp_avg_sq" not in st:
            raise ValueError(
                f"the optimizer has no state for {name!r} yet; compute the preconditioned "
                "sharpness after at least one optimizer.step()"
            )
        g = groups[id(p)]
        beta2 = float(g["betas"][1])
        step = float(st["step"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
        bc = 1 - beta2**step
        out[name] = (v.detach().to(p.dtype) / bc).sqrt() + float(g["eps"])
    return out


def _check_common(k: Any, which: Any, tol: Any, max_iter: Any) -> None:
    check_int(k, "k", 1, "; k is the number of eigenvalues wanted")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(
            f"which must be 'LA' (algebraically largest), 'SA' (smallest) or 'LM' (largest "
            f"magnitude), got {which!r}"
        )
    check_positive(tol, "tol", "; e.g. 1e-3")
    if max_iter is not None:
        check_int(max_iter, "max_iter", 1, "; it caps the number of HVPs")


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    algorithm: str = "lanczos",
    v0: Mapping[str, Tensor] | Tensor | None = None,
    generator: torch.Generator | None = None,
    preconditioner: Any = None,
    return_vectors: bool = False,
    method: str = "auto",
    mode: str = "eval",
    fd_step: float | None = None,
) -> SharpnessResult:
    """Top-``k`` Hessian eigenvalues by Lanczos on Hessian-vector products.

    By default the *algebraically largest* eigenvalues (``which="LA"``): the sharpness
    ``S = λ_max(∇²L)`` of Cohen et al. Power iteration finds the largest *magnitude* instead,
    which can be a negative eigenvalue away from a minimum; Lanczos finds either
    (``which="LM"``, or ``"SA"`` for the most negative). Lanczos uses full
    reorthogonalisation and stops when every wanted Ritz pair has residual
    ``|Hy - λy| <= tol * |λ|`` (an upper bound on each eigenvalue's error). With
    ``preconditioner=`` an Adam/AdamW optimizer, the eigenvalues are those of
    ``P^{-1/2} H P^{-1/2}`` with ``P = diag(sqrt(v̂) + ε)`` from its state — Adam's
    preconditioned sharpness (Cohen et al. 2022), to compare with :func:`eos_threshold` —
    with ``H`` over the parameters the optimizer holds, the model's other trainable
    parameters held fixed (a frozen body, or one another optimizer trains): Adam only moves
    its own, so the block of the Hessian over them sets its stability.

    Cost: one HVP per iteration (``result.hvps``; about 10-20 for ``k=1`` at ``tol=1e-3`` on
    typical networks), each one forward and two backward passes per batch; memory for
    ``max_iter`` vectors of the parameter count.

    Args:
        model: the model; left bit-for-bit unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        k: the number of eigenvalues.
        which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
        tol: relative residual at which a Ritz pair counts as converged.
        max_iter: the most HVPs (default ``max(100, 4k)``, capped at the parameter count).
        algorithm: ``"lanczos"`` (default) or ``"power"`` (power iteration with deflation,
            stopped when the estimate changes by less than ``tol`` relatively, as PyHessian
            does; largest magnitude only).
        v0: starting vector (dict or flat), e.g. the previous probe's eigenvector.
        generator: for the random starting vector.
        preconditioner: ``None`` or an Adam/AdamW optimizer (preconditioned sharpness, over
            the parameters it holds).
        return_vectors: keep the Ritz vectors in the result.
        method: HVP method, ``"auto"``, ``"exact"`` or ``"fd"`` (see :func:`hvp`).
        mode: ``"eval"`` (default) or ``"train"``.
        fd_step: finite-difference step norm (see :func:`hvp`).

    Returns:
        :class:`SharpnessResult`; ``float(result)`` is the top eigenvalue.

    Raises:
        TypeError, ValueError: invalid arguments, naming the argument and the fix.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> x = torch.randn(32, 4, dtype=torch.float64)
        >>> y = torch.randn(32, dtype=torch.float64)
        >>> model = torch.nn.Linear(4, 1, bias=False).double()
        >>> loss_fn = lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square().mean()
        >>> res = probes.sharpness(model, loss_fn, (x, y), k=2, tol=1e-10)
        >>> exact = torch.linalg.eigvalsh(2 * x.T @ x / 32).flip(0)[:2]
        >>> torch.allclose(res.eigenvalues, exact)
        True
    """
    check_model(model)
    check_fn(loss_fn)
    _check_common(k, which, tol, max_iter)
    if algorithm not in ("lanczos", "power"):
        raise ValueError(f"algorithm must be 'lanczos' or 'power', got {algorithm!r}")
    if algorithm == "power" and which != "LM":
        which = "LM"
    method = check_method(method)
    mode = check_mode(mode)
    fd_step = check_fd_step(fd_step)
    generator = check_generator(generator)
    held = None if preconditioner is None else held_params(model, preconditioner)
    with preserved(model):
        generator = own_generator(generator)
        op = Operator(model, loss_fn, data, mode, method, fd_step, params=held)
        if preconditioner is not None:
            pre = adam_preconditioner(model, preconditioner, op.space.names)
            op.scale = op.space.flatten([pre[n] for n in op.space.names]).rsqrt()
        return solve(op, k, which, tol, max_iter, algorithm, v0, generator, return_vectors)


def held_params(model: nn.Module, optimizer: Any) -> list[Tensor]:
    """The model's trainable parameters that ``optimizer`` holds (the ones it updates)."""
    opt = unwrap_optimizer(optimizer, "preconditioner")
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    out = [p for _, p in trainable(model) if id(p) in ids]
    if not out:
        raise ValueError(
            f"the {type(opt).__name__} holds none of the model's trainable parameters; pass the "
            "optimizer that trains this model"
        )
    return out


def solve(
    op: Operator,
    k: int,
    which: str,
    tol: float,
    max_iter: int | None,
    algorithm: str,
    v0: Mapping[str, Tensor] | Tensor | None,
    generator: torch.Generator,
    return_vectors: bool,
) -> SharpnessResult:
    """Top-``k`` eigenpairs of the operator ``op`` (see :func:`sharpness`)."""
    n = op.n
    if k > n:
        raise ValueError(f"k={k} exceeds the number of trainable parameters ({n})")
    if v0 is None:
        start = random_unit(n, op.theta_flat, generator)
    else:
        start = as_flat(v0, op.space, "v0").to(op.theta_flat.device)
        if float(start.norm()) == 0.0:
            raise ValueError("v0 is the zero vector; pass a nonzero start or None")
    iters = max_iter if max_iter is not None else max(100, 4 * k)
    if algorithm == "lanczos":
        evals, vecs, res, _, conv = lanczos(op.matvec, start, k, iters, tol, which, generator)
    else:
        evals, vecs, res, _, conv = power_iteration(op.matvec, start, k, iters, tol, generator)
    return SharpnessResult(
        eigenvalues=evals.to(torch.float64).cpu(),
        residuals=res.to(torch.float64).cpu(),
        hvps=op.hvps,
        converged=conv,
        method=str(op.method),
        algorithm=algorithm,
        which=which,
        preconditioned=op.scale is not None,
        eigenvectors=vecs.detach() if return_vectors else None,
        names=tuple(op.space.names),
        shapes=tuple(op.space.shapes),
        fallback_reason=op.fallback_reason,
    )
