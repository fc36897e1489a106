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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens._optim import unwrap_optimizer
from sgdlens.probes._common import (
    Evaluator,
    LossFn,
    Space,
    as_batches,
    check_fn,
    check_generator,
    check_int,
    check_mode,
    check_model,
    check_positive,
    own_generator,
    probe_seed,
    set_mode,
    trainable,
)
from sgdlens.probes.restore import preserved

__all__ = [
    "HVPResult",
    "SharpnessResult",
    "TraceResult",
    "eos_ratio",
    "eos_threshold",
    "hessian_trace",
    "hvp",
    "sharpness",
]

EXACT = "double-backward"
EXACT_MATH = "double-backward (math sdpa)"
FD = "finite-difference"
_METHODS = ("auto", "exact", "fd")


class _NoDoubleBackward(Exception):
    pass


class _Operator:
    """Hessian (optionally preconditioned, ``D H D``) of the mean loss, as a flat matvec."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        mode: str,
        method: str = "auto",
        fd_step: float | None = None,
        scale: Tensor | None = None,
    ) -> None:
        self.batches = as_batches(data)
        self.items = trainable(model)
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
        if self.scale is None:
            try:
                return self._hessian_matvec(v)
            except _NoDoubleBackward as e:
                raise RuntimeError(_exact_failed(e)) from e
        try:
            return self.scale * self._hessian_matvec(self.scale * v)
        except _NoDoubleBackward as e:
            raise RuntimeError(_exact_failed(e)) from e


def _exact_failed(e: Exception) -> str:
    return (
        f"method='exact' was requested but double backward failed ({e}); pass method='auto' "
        "to fall back to the math attention kernel or a finite-difference HVP"
    )


def _check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(
            f"method must be one of {_METHODS}, got {method!r}; 'auto' uses double backward "
            "and falls back to a finite-difference HVP where a kernel lacks it"
        )
    return str(method)


def _check_fd_step(fd_step: Any) -> float | None:
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
    method = _check_method(method)
    mode = check_mode(mode)
    fd_step = _check_fd_step(fd_step)
    with preserved(model):
        op = _Operator(model, loss_fn, data, mode, method, fd_step)
        flat = _as_flat(v, op.space, "v")
        hv = op.matvec(flat.to(device=op.space.device))
        value: dict[str, Tensor] | Tensor = (
            op.space.to_dict(hv) if isinstance(v, Mapping) else hv.to(flat.dtype)
        )
        return HVPResult(value, str(op.method), op.fallback_reason, op.fd_step)


def _as_flat(v: Any, space: Space, name: str) -> Tensor:
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


# ----------------------------------------------------------------------------- eigenvalues


def _select(evals: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        order = torch.argsort(evals, descending=True)
    elif which == "SA":
        order = torch.argsort(evals)
    else:
        order = torch.argsort(evals.abs(), descending=True)
    return order[:k]


def _random_unit(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(n, generator=generator, dtype=torch.float64, device=dev)
    v = v.to(device=like.device, dtype=like.dtype)
    return v / v.norm()


def _lanczos(
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
            w = _random_unit(n, v0, generator)
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


def _power(
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
        v = v0 if i == 0 else _random_unit(v0.numel(), v0, generator)
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
        >>> from sgdlens.probes.curvature import adam_preconditioner
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
    preconditioned sharpness (Cohen et al. 2022), to compare with :func:`eos_threshold`.

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
        preconditioner: ``None`` or an Adam/AdamW optimizer (preconditioned sharpness).
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
    method = _check_method(method)
    mode = check_mode(mode)
    fd_step = _check_fd_step(fd_step)
    generator = check_generator(generator)
    if preconditioner is not None:
        unwrap_optimizer(preconditioner, "preconditioner")
    with preserved(model):
        generator = own_generator(generator)
        op = _Operator(model, loss_fn, data, mode, method, fd_step)
        if preconditioner is not None:
            pre = adam_preconditioner(model, preconditioner)
            op.scale = op.space.flatten([pre[n] for n in op.space.names]).rsqrt()
        n = op.n
        if k > n:
            raise ValueError(f"k={k} exceeds the number of trainable parameters ({n})")
        if v0 is None:
            start = _random_unit(n, op.theta_flat, generator)
        else:
            start = _as_flat(v0, op.space, "v0").to(op.theta_flat.device)
            if float(start.norm()) == 0.0:
                raise ValueError("v0 is the zero vector; pass a nonzero start or None")
        iters = max_iter if max_iter is not None else max(100, 4 * k)
        if algorithm == "lanczos":
            evals, vecs, res, _, conv = _lanczos(op.matvec, start, k, iters, tol, which, generator)
        else:
            evals, vecs, res, _, conv = _power(op.matvec, start, k, iters, tol, generator)
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


# ----------------------------------------------------------------------------- trace


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
    hvp_method = _check_method(hvp_method)
    mode = check_mode(mode)
    fd_step = _check_fd_step(fd_step)
    generator = check_generator(generator)
    with preserved(model):
        generator = own_generator(generator)
        op = _Operator(model, loss_fn, data, mode, hvp_method, fd_step)
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


# ----------------------------------------------------------------------------- EoS


def _group(opt: torch.optim.Optimizer, group: int | None) -> dict[str, Any]:
    keys = ("lr", "momentum", "nesterov", "dampening", "betas", "weight_decay")
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
