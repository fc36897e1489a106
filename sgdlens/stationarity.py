"""A statistical test for stationarity of ``torch.optim.SGD`` (Pflug 1983; Yaida 2018; Lang,
Xiao & Zhang 2019), used by :class:`sgdlens.schedulers.PhaseLR` with ``trigger="stationary"``.

**The relation.** ``torch.optim.SGD`` (momentum μ, dampening τ, weight decay λ, rate α) does
``g̃_k = ∇f(θ_k) + λ θ_k``, ``b_k = μ b_{k-1} + (1 − τ) g̃_k``, ``θ_{k+1} = θ_k − α d_k`` with
``d_k = b_k`` (heavy ball), ``d_k = g̃_k + μ b_k`` (Nesterov, τ = 0) or ``d_k = g̃_k`` (μ = 0).
If the iterates have a stationary distribution at a fixed rate, ``E‖θ_{k+1}‖² = E‖θ_k‖²``
gives ``E⟨θ, d⟩ = (α/2) E‖d‖²`` and ``E⟨θ_{k+1}, b_{k+1}⟩ = E⟨θ_k, b_k⟩`` gives
``(1 − μ) E⟨θ, b⟩ = (1 − τ) E⟨θ, g̃⟩ − μ α E⟨d, b⟩``; together (Yaida's fluctuation-dissipation
relation, in torch's parametrisation)::

    heavy ball:  E⟨θ_k, g̃_k⟩ = α (1 + μ) / (2 (1 − τ)) · E‖b_k‖²
    Nesterov:    E⟨θ_k, g̃_k⟩ = α [ (1 − μ)/2 ‖g̃_k‖² + μ ⟨g̃_k, b_k⟩ + μ² (1 + μ)/2 ‖b_k‖² ]
    plain SGD:   E⟨θ_k, g̃_k⟩ = (α/2) E‖g̃_k‖²

(θ_k is the point where g̃_k was taken, b_k the buffer after step k). With τ = 0 the heavy-ball
constant is α (1 + μ)/2; Lang et al.'s ``d_k = (1 − β) g_k + β d_{k-1}`` is ``b_k / (1 − β)``,
which turns it into their ``(α/2)(1 + β)/(1 − β) E‖d‖²``. The gradient is torch's ``g̃``, weight
decay included: the relation is the one of the iteration that actually runs (SGD on
``f + λ/2 ‖θ‖²``).

**What the statistic measures.** ``Δ_k = ⟨θ_k, g̃_k⟩ − (the right-hand side)`` is, step by
step, a telescoping sum: for heavy ball ``(1 − τ) Σ_{k=m..n} Δ_k = (1 − μ)(‖θ_m‖² −
‖θ_{n+1}‖²)/(2α)`` plus two boundary terms of one step each. Its window mean is the drift of
``‖θ‖²`` per step, and the test asks whether that drift is distinguishable from zero given
the fluctuations of Δ.

**The test** (:class:`StationarityTest`): over the most recent half of the steps at the
current rate, the mean of Δ and a confidence interval from the batch-means variance estimator
(batches of ⌊√N⌋ steps, Student t with (batches − 1) degrees of freedom); stationary when the
interval contains 0, as in the SASA+ implementation of Zhang, Lang, Liu & Xiao (2020).
"""

from __future__ import annotations

import math
import numbers
import statistics
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sgdlens import _torch

__all__ = ["SGDStationarity", "StationarityTest", "TestResult", "batch_means", "t_quantile"]


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (Cornish-Fisher
    expansion in 1/dof around the normal quantile; within 1e-3 of the exact value for dof ≥ 5
    at p ≤ 0.995)."""
    z = statistics.NormalDist().inv_cdf(p)
    n = float(dof)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
    )


def batch_means(x: Tensor) -> tuple[float, float, int]:
    """Mean of a correlated series, the batch-means estimate of its variance, and the degrees
    of freedom: ``N`` values in ⌊N/b⌋ batches of ``b = ⌊√N⌋`` consecutive values (the oldest
    ``N mod b`` dropped); ``var = b / (batches − 1) · Σ (Y_j − Ȳ)² / N`` is the variance of the
    mean."""
    x = x.detach().to("cpu", torch.float64).reshape(-1)
    n = x.numel()
    b = math.isqrt(n)
    k = n // b if b else 0
    if k < 2:
        raise ValueError(f"batch_means: {n} value(s) are too few (need at least 2)")
    y = x[n - k * b :].view(k, b).mean(1)
    mean = float(y.mean())
    var = b * float(((y - mean) ** 2).sum()) / (k - 1) / (k * b)
    return mean, var, k - 1


@dataclass(frozen=True)
class TestResult:
    """One run of the test: the window's mean of Δ, the half-width of its interval, the
    window length in steps and the verdict."""

    mean: float
    half_width: float
    n: int
    stationary: bool

    @property
    def lower(self) -> float:
        return self.mean - self.half_width

    @property
    def upper(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True)
class StationarityTest:
    """SASA's test: is the mean of Δ over the recent steps indistinguishable from 0?

    Args:
        confidence: level of the interval (0.95: significance 0.05, statopt's default).
        test_every: optimizer steps between two tests (statopt's ``testfreq``, 100).
        keep: fraction of the steps at the current rate that the window keeps, the most
            recent ones (0.5: the first half is the transient's burn-in).
        min_samples: the least window length tested (1000, statopt's ``minN_stats``: with
            ``keep=0.5`` no test before 2000 steps at one rate). Shorter windows have too
            little power: the interval is wide and contains 0 in the transient
            (``docs/phase_lr.md``).
    """

    confidence: float = 0.95
    test_every: int = 100
    keep: float = 0.5
    min_samples: int = 1000

    def __post_init__(self) -> None:
        def bad(name: str, value: object, want: str) -> None:
            raise ValueError(f"StationarityTest({name}={value!r}): {name} must be {want}")

        for name in ("confidence", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"StationarityTest({name}={v!r}): {name} must be a float")
        if not 0.0 < self.confidence < 1.0:
            bad("confidence", self.confidence, "in (0, 1), e.g. 0.95")
        if not 0.0 < self.keep <= 1.0:
            bad("keep", self.keep, "in (0, 1], e.g. 0.5")
        for name in ("test_every", "min_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"StationarityTest({name}={v!r}): {name} must be an int")
        if self.test_every < 1:
            bad("test_every", self.test_every, ">= 1 (optimizer steps), e.g. 100")
        if self.min_samples < 4:
            bad("min_samples", self.min_samples, ">= 4 (batch means need 2 batches), e.g. 100")

    def window(self, steps_at_rate: int) -> int:
        """How many of the most recent steps the test reads (0: too few to test)."""
        n = int(self.keep * steps_at_rate)
        return n if n >= self.min_samples else 0

    def __call__(self, delta: Tensor) -> TestResult:
        """Test a window of Δ values."""
        mean, var, dof = batch_means(delta)
        half = t_quantile(0.5 + self.confidence / 2, dof) * math.sqrt(var)
        return TestResult(mean, half, int(delta.numel()), mean - half < 0.0 < mean + half)


def _dot(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """``[⟨x_i, y_i⟩]`` with three fused calls and one temporary list: Σp = 2 Σ max(p, 0) − Σ|p|."""
    prods = torch._foreach_mul(xs, ys)
    total = torch._foreach_norm(prods, 1)
    torch._foreach_clamp_min_(prods, 0.0)
    pos = torch._foreach_norm(prods, 1)
    return list(torch._foreach_sub(torch._foreach_mul(pos, 2.0), total))


def _sq(xs: list[Tensor]) -> list[Tensor]:
    norms = torch._foreach_norm(xs)
    return list(torch._foreach_mul(norms, norms))


class SGDStationarity:
    """Records ``Δ_k`` (and its dissipation term ``v_k``, the right-hand side) at every step of
    a ``torch.optim.SGD``, on the parameters' device, in a ring of ``capacity`` steps.

    It attaches a step post-hook to the optimizer: after step k it has θ_{k+1}, the buffer
    b_k, ``p.grad`` (the raw gradient of step k) and the rate α used, and rebuilds θ_k
    exactly (θ_k = θ_{k+1} + α b_k for heavy ball; for Nesterov and plain SGD, where d_k holds
    λθ_k, θ_k = (θ_{k+1} + α(∇f + μ b_k)) / (1 − αλ)). No host synchronisation per step: the
    values are read to the host only by :meth:`window`.

    ``since`` is the index of the first step at the current rates: a step whose rates differ
    from the previous step's (a decay, or another scheduler) starts a new stretch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, capacity: int = 1 << 14) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"the stationarity test needs torch.optim.SGD (its relation is derived for "
                f"SGD's update), got {type(optimizer).__name__}; use trigger='drift' instead"
            )
        if any(g.get("maximize", False) for g in optimizer.param_groups):
            raise ValueError("the stationarity test does not support SGD(maximize=True)")
        self.optimizer = optimizer
        p = next(p for g in optimizer.param_groups for p in g["params"])
        self.device = p.device
        self.dtype = _torch.acc_dtype(p.device)
        self.capacity = int(capacity)
        self.ring = torch.zeros(self.capacity, 2, dtype=self.dtype, device=self.device)
        self.count = 0  # steps recorded
        self.since = 0  # first step (index) at the current rates
        self.lrs: list[float] | None = None  # the rates of the last recorded step
        ref = weakref.ref(self)

        def hook(opt: Any, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me.record()

        self._handle = optimizer.register_step_post_hook(hook)
        # gone with its owner (a deleted PhaseLR): no dead hook left on the optimizer
        weakref.finalize(self, self._handle.remove)

    def remove(self) -> None:
        """Detach from the optimizer."""
        self._handle.remove()

    @torch.no_grad()
    def record(self) -> None:
        """Append this step's Δ and v (called by the post-hook after ``optimizer.step()``)."""
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if lrs != self.lrs:
            self.since, self.lrs = self.count, lrs
        delta: list[Tensor] = []
        diss: list[Tensor] = []
        for group, lr in zip(self.optimizer.param_groups, lrs):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("the stationarity test does not support sparse gradients")
            grads = [p.grad for p in params]
            mu, tau = float(group["momentum"]), float(group["dampening"])
            wd, nesterov = float(group["weight_decay"]), bool(group["nesterov"])
            bufs = [self.optimizer.state[p].get("momentum_buffer") for p in params]
            if mu and any(b is None for b in bufs):
                continue
            if params[0].dtype in (torch.float16, torch.bfloat16):
                params, grads = [p.float() for p in params], [g.float() for g in grads]
                bufs = [b.float() if b is not None else None for b in bufs]
            if mu and not nesterov:  # d_k = b_k
                theta = list(torch._foreach_add(params, bufs, alpha=lr))
            else:  # d_k = g̃_k (+ μ b_k): solve θ_k = θ_{k+1} + α d_k for θ_k
                theta = list(torch._foreach_add(params, grads, alpha=lr))
                if mu:
                    torch._foreach_add_(theta, bufs, alpha=lr * mu)
                if wd:
                    torch._foreach_div_(theta, 1.0 - lr * wd)
            if wd:  # g̃_k = ∇f + λ θ_k, kept as a temporary only when λ ≠ 0
                grads = list(torch._foreach_add(grads, theta, alpha=wd))
            terms = _dot(theta, grads)  # ⟨θ_k, g̃_k⟩
            if mu and not nesterov:
                v = torch._foreach_mul(_sq(bufs), lr * (1 + mu) / (2 * (1 - tau)))
            elif mu:
                v = torch._foreach_add(
                    torch._foreach_mul(_sq(grads), lr * (1 - mu) / 2),
                    torch._foreach_mul(_dot(grads, bufs), lr * mu),
                )
                torch._foreach_add_(v, torch._foreach_mul(_sq(bufs), lr * mu * mu * (1 + mu) / 2))
            else:
                v = torch._foreach_mul(_sq(grads), lr / 2)
            delta += terms
            diss += v
        if not delta:
            return
        d = torch.stack([t.to(self.device, self.dtype) for t in delta]).sum()
        w = torch.stack([t.to(self.device, self.dtype) for t in diss]).sum()
        row = self.ring[self.count % self.capacity]
        row[0].copy_(d - w)
        row[1].copy_(w)
        self.count += 1

    @property
    def steps_at_rate(self) -> int:
        """Steps recorded at the current rates (at most ``capacity``)."""
        return min(self.count - self.since, self.capacity)

    def window(self, n: int) -> tuple[Tensor, Tensor]:
        """The last ``n`` (≤ ``capacity``) values of Δ and v, oldest first, on the host."""
        n = min(n, self.count, self.capacity)
        idx = torch.arange(self.count - n, self.count) % self.capacity
        rows = self.ring[idx.to(self.device)].to("cpu", torch.float64)
        return rows[:, 0], rows[:, 1]

    def state_dict(self) -> dict[str, Any]:
        return {"ring": self.ring.cpu(), "count": self.count, "since": self.since, "lrs": self.lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ring = state["ring"]
        self.capacity = int(ring.shape[0])
        self.ring = ring.to(self.device, self.dtype).clone()
        self.count, self.since = int(state["count"]), int(state["since"])
        self.lrs = None if state["lrs"] is None else [float(x) for x in state["lrs"]]
