"""Eigen-solvers on a symmetric matrix-vector product: Lanczos with full reorthogonalisation
and power iteration with deflation (used by :func:`~sgdlens.probes.sharpness`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["lanczos", "power_iteration", "random_unit"]


def _select(evals: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        order = torch.argsort(evals, descending=True)
    elif which == "SA":
        order = torch.argsort(evals)
    else:
        order = torch.argsort(evals.abs(), descending=True)
    return order[:k]


def random_unit(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(n, generator=generator, dtype=torch.float64, device=dev)
    v = v.to(device=like.device, dtype=like.dtype)
    return v / v.norm()


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    k: int,
    max_iter: int,
    tol: float,
    which: str,
    generator: torch.Generator | None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Lanczos with full (twice-applied Gram-Schmidt) reorthogonalisation.

    Returns (eigenvalues, Ritz vectors (k, n), residual norms, iterations, converged).
    ``callback(iteration, wanted_ritz_values)`` is called after every iteration (benchmarks).
    """
    n = v0.numel()
    m = min(max_iter, n)
    # the basis grows by doubling: most runs stop after ~10-20 of max_iter vectors
    Q = torch.empty(min(m, 16), n, dtype=v0.dtype, device=v0.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = v0 / v0.norm()
    eps = torch.finfo(v0.dtype).eps
    converged = False
    evals = S = idx = None
    res = torch.zeros(0, dtype=torch.float64)
    j = 0
    for j in range(m):
        if j == Q.shape[0]:
            Q = torch.cat([Q, torch.empty_like(Q[: min(Q.shape[0], m - j)])])
        Q[j] = q
        w = matvec(q)
        alphas.append(float(torch.dot(w, q)))
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, S = torch.linalg.eigh(T)
        idx = _select(evals, min(k, j + 1), which)
        scale = float(evals.abs().max()) if evals.numel() else 1.0
        res = b * S[-1, idx].abs()
        if callback is not None:
            callback(j + 1, evals[idx])
        if j + 1 == n:
            converged = True
            break
        breakdown = b <= eps ** (2 / 3) * max(scale, 1e-30)
        sel = evals[idx].abs().clamp_min(eps * max(scale, 1e-30))
        if not breakdown and j + 1 >= k and bool((res <= tol * sel).all()):
            converged = True
            break
        if j + 1 == m:
            break
        if breakdown:
            # An invariant subspace: its Ritz values are exact, but eigenvalues outside it (or
            # further copies of a repeated one) are missing. Restart from a random vector
            # orthogonal to the basis, with a zero coupling in T.
            w = random_unit(n, v0, generator)
            for _ in range(2):
                w = w - basis.T @ (basis @ w)
            b_restart = float(w.norm())
            if b_restart <= eps:
                converged = True
                break
            q = w / b_restart
            betas.append(0.0)
            continue
        betas.append(b)
        q = w / b
    assert evals is not None and S is not None and idx is not None
    vecs = S[:, idx].T.to(device=Q.device, dtype=Q.dtype) @ Q[: j + 1]
    return evals[idx], vecs, res, j + 1, converged


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    k: int,
    max_iter: int,
    tol: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Power iteration with deflation, stopped as PyHessian does (relative change < tol)."""
    found: list[Tensor] = []
    vals: list[float] = []
    res: list[float] = []
    total = 0
    all_conv = True
    for i in range(k):
        v = v0 if i == 0 else random_unit(v0.numel(), v0, generator)
        lam_prev: float | None = None
        conv = False
        lam = 0.0
        hv = v
        for _ in range(max_iter):
            for u in found:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            hv = matvec(v)
            total += 1
            lam = float(torch.dot(hv, v))
            if lam_prev is not None and abs(lam - lam_prev) / (abs(lam_prev) + 1e-6) < tol:
                conv = True
                break
            lam_prev = lam
            v = hv
        all_conv = all_conv and conv
        found.append(v)
        vals.append(lam)
        res.append(float((hv - lam * v).norm()))
    return (
        torch.tensor(vals, dtype=torch.float64),
        torch.stack(found),
        torch.tensor(res, dtype=torch.float64),
        total,
        all_conv,
    )
