"""Linear paths between two models: the loss curve, barriers, and a same-basin verdict.

``θ(α) = (1-α)·θ_a + α·θ_b`` on ``steps`` evenly spaced α in [0, 1] (30 points as in Frankle et
al. 2020), evaluated with ``torch.func.functional_call`` so no module is mutated. Two barriers:

* ``barrier`` (Entezari et al. 2022): ``max_α [L(θ(α)) - ((1-α)L(θ_a) + αL(θ_b))]``, the height
  above the chord; ``<= 0`` on a convex loss. The quantitative form of Poggio & Liao's "averaging
  within a basin gives at most the average loss".
* ``error_barrier`` (Frankle et al. 2020): ``sup_α E(θ(α)) - mean(E(θ_a), E(θ_b))`` on the metric
  (e.g. the error rate) when ``metric_fn`` is given, else on the loss. Positive whenever the two
  endpoints differ, so prefer ``barrier`` for losses.

BatchNorm: ``bn="carry"`` interpolates the running statistics with the weights;
``bn="recompute"`` re-estimates them at every α on ``bn_data`` (default ``data``): the cumulative
average of per-batch statistics, as ``momentum=None`` gives, computed without touching the module.
Permutation symmetry: independently trained networks differ by hidden-unit permutations too, which
raise the barrier; ``align=True`` permutes ``b``'s units to match ``a``'s first (see
:func:`~sgdlens.probes.align`), the question then being whether two *basins* differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    Evaluator,
    LossFn,
    as_batches,
    check_fn,
    check_int,
    check_mode,
    check_positive,
    probe_seed,
    progress_iter,
    set_mode,
)
from sgdlens.probes._states import check_bn, preserved_all, recompute_bn, state_of
from sgdlens.probes.align import aligned_to, check_align

__all__ = ["BasinVerdict", "InterpolationResult", "basin_test", "interpolate"]


@dataclass(frozen=True)
class InterpolationResult:
    """The loss (and metric) along ``θ(α) = (1-α)θ_a + αθ_b``.

    Attributes:
        alphas: float64 tensor of the α values (``steps`` points from 0 to 1).
        losses: float64 tensor of the mean loss at each α.
        metrics: float64 tensor of the mean metric at each α, or ``None``.
        barrier: Entezari's barrier on the loss, ``max_α [L(α) - chord(α)]``.
        barrier_alpha: the α where it is attained.
        error_barrier: Frankle's ``sup E - mean(E_a, E_b)``, on the metric if given, else on
            the loss.
        bn: ``"carry"`` or ``"recompute"``.
    """

    alphas: Tensor
    losses: Tensor
    metrics: Tensor | None
    barrier: float
    barrier_alpha: float
    error_barrier: float
    bn: str

    def to_dict(self) -> dict[str, Any]:
        """Plain Python numbers and lists (for JSON)."""
        return {
            "alphas": self.alphas.tolist(),
            "losses": self.losses.tolist(),
            "metrics": None if self.metrics is None else self.metrics.tolist(),
            "barrier": self.barrier,
            "barrier_alpha": self.barrier_alpha,
            "error_barrier": self.error_barrier,
            "bn": self.bn,
        }


def _mix(sa: dict[str, Tensor], sb: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    out = {}
    for k, a in sa.items():
        b = sb[k]
        if a.dtype.is_floating_point or a.dtype.is_complex:
            out[k] = (
                torch.lerp(a, b.to(a.dtype), alpha)
                if alpha not in (0.0, 1.0)
                else (a.clone() if alpha == 0.0 else b.to(a.dtype).clone())
            )
        else:
            out[k] = a.clone()  # integer buffers (num_batches_tracked): the first endpoint's
    return out


def interpolate(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    loss_fn: LossFn,
    data: Any,
    *,
    steps: int = 30,
    metric_fn: LossFn | None = None,
    bn: str = "carry",
    bn_data: Any = None,
    model: nn.Module | None = None,
    mode: str = "eval",
    progress: bool = False,
    align: bool | str = False,
) -> InterpolationResult:
    """Loss (and metric) along the straight line between two models, with both barriers.

    ``a`` and ``b`` are models or state dicts of one architecture; the first module among
    ``model``, ``a``, ``b`` evaluates them (with ``functional_call``: no module is mutated; every
    module passed stays bit-for-bit as it was). Floating buffers are interpolated with the
    weights (``bn="carry"``); integer buffers are taken from ``a``.

    Cost: ``steps`` forward passes per batch (``2*steps`` with ``metric_fn``); with
    ``bn="recompute"``, ``steps`` more train-mode forward passes per ``bn_data`` batch. No
    backward pass.

    Args:
        a: the α=0 endpoint, a module or a state dict.
        b: the α=1 endpoint, a module or a state dict.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        steps: number of α values from 0 to 1 inclusive (>= 2; 30 as in Frankle et al.).
        metric_fn: optional ``metric_fn(model, batch) -> scalar tensor`` (e.g. error rate),
            averaged like the loss; the error barrier is then taken on it.
        bn: ``"carry"`` or ``"recompute"`` (BatchNorm statistics re-estimated at every α).
        bn_data: the batches for ``bn="recompute"`` (default ``data``; use training data).
        model: the module that evaluates state dicts, needed when both endpoints are dicts.
        mode: ``"eval"`` (default) or ``"train"`` for the evaluations.
        progress: show a tqdm progress bar (needs tqdm).
        align: ``True`` or ``"weights"``: permute ``b``'s hidden units to match ``a``'s first
            (weight matching, :func:`~sgdlens.probes.align`), so the path measures the basin
            rather than the permutation symmetry; ``"activations"``: match them by their
            activations on ``data``. Needs scipy (``pip install "sgdlens[align]"``).

    Returns:
        :class:`InterpolationResult`.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> torch.manual_seed(0) and None
        >>> a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> loss_fn = lambda m, batch: torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        >>> res = probes.interpolate(a, b, loss_fn, (x, y), steps=11)
        >>> res.barrier <= 1e-6   # a convex loss: no barrier above the chord
        True
    """
    template = (
        model
        if model is not None
        else (a if isinstance(a, nn.Module) else b if isinstance(b, nn.Module) else None)
    )
    if template is None:
        raise TypeError(
            "interpolate needs a module to evaluate state dicts: both a and b are state dicts; "
            "pass model=<a module of that architecture>"
        )
    if not isinstance(template, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(template).__name__}")
    check_fn(loss_fn)
    if metric_fn is not None:
        check_fn(metric_fn, "metric_fn")
    check_int(steps, "steps", 2, "; e.g. steps=30 as in Frankle et al.")
    bn = check_bn(bn)
    mode = check_mode(mode)
    how = check_align(align)
    batches = as_batches(data)
    if how is not None:
        b = aligned_to(a, b, template, how, batches)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    mods = [m for m in (template, a, b) if isinstance(m, nn.Module)]
    with preserved_all(mods):
        sa = state_of(a, template, "a")
        sb = state_of(b, template, "b")
        set_mode(template, mode)
        seed = probe_seed()
        ev = Evaluator(template, loss_fn, batches, "loss_fn", seed)
        mev = (
            None
            if metric_fn is None
            else Evaluator(template, metric_fn, batches, "metric_fn", seed)
        )
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        losses, metrics = [], []
        for alpha in progress_iter(alphas.tolist(), steps, progress, "interpolate"):
            st = _mix(sa, sb, alpha)
            if bn == "recompute":
                st = recompute_bn(template, st, bn_batches, loss_fn, seed)
            with torch.no_grad():
                losses.append(float(ev.mean(st)))
                if mev is not None:
                    metrics.append(float(mev.mean(st)))
    loss_t = torch.tensor(losses, dtype=torch.float64)
    met_t = torch.tensor(metrics, dtype=torch.float64) if mev is not None else None
    return _result(alphas, loss_t, met_t, bn)


def _result(alphas: Tensor, losses: Tensor, metrics: Tensor | None, bn: str) -> InterpolationResult:
    chord = (1 - alphas) * losses[0] + alphas * losses[-1]
    gap = losses - chord
    i = int(torch.argmax(gap))
    e = metrics if metrics is not None else losses
    err = float(e.max() - (e[0] + e[-1]) / 2)
    return InterpolationResult(alphas, losses, metrics, float(gap[i]), float(alphas[i]), err, bn)


@dataclass(frozen=True)
class BasinVerdict:
    """Same basin or not, with the numbers behind the verdict.

    Attributes:
        same_basin: ``value <= threshold``.
        verdict: ``"same basin"`` or ``"different basins"``.
        criterion: ``"loss barrier (Entezari)"`` or ``"error barrier (Frankle)"``.
        value: the barrier compared.
        threshold: the threshold used.
        result: the full :class:`InterpolationResult`.
    """

    same_basin: bool
    verdict: str
    criterion: str
    value: float
    threshold: float
    result: InterpolationResult

    def __str__(self) -> str:
        op = "<=" if self.same_basin else ">"
        return f"{self.verdict}: {self.criterion} {self.value:.4g} {op} {self.threshold:.4g}"


def basin_test(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    loss_fn: LossFn,
    data: Any,
    *,
    threshold: float | None = None,
    steps: int = 30,
    metric_fn: LossFn | None = None,
    bn: str = "carry",
    bn_data: Any = None,
    model: nn.Module | None = None,
    mode: str = "eval",
    align: bool | str = False,
) -> BasinVerdict:
    """Are ``a`` and ``b`` linearly connected (one basin) or separated by a barrier?

    With ``metric_fn`` (an error rate in [0, 1]) the criterion is Frankle et al.'s error
    barrier, with their threshold of 0.02 (2% error) by default. Without it, the criterion is
    Entezari et al.'s loss barrier above the chord, with default threshold
    ``0.05 * mean(L_a, L_b) + 1e-3``: a bump of more than 5% of the endpoint loss. Both
    defaults are conventions; pass ``threshold`` for your scale. Hidden-unit permutations also
    separate independently trained networks: pass ``align=True`` to permute ``b``'s units to
    match ``a``'s first (Git Re-Basin weight matching), and so ask about basins proper.

    Cost: as :func:`interpolate`.

    Args:
        a, b: endpoints, modules or state dicts.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (held-out data for error barriers).
        threshold: the largest barrier still called "same basin".
        steps, metric_fn, bn, bn_data, model, mode, align: as for :func:`interpolate`.

    Returns:
        :class:`BasinVerdict`; ``str(verdict)`` reads e.g.
        ``"same basin: loss barrier (Entezari) 0.0012 <= 0.0153"``.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> a = torch.nn.Linear(3, 1)
        >>> b = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> loss_fn = lambda m, batch: torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        >>> probes.basin_test(a, b, loss_fn, (x, y)).same_basin   # convex: one basin
        True
    """
    if threshold is not None:
        threshold = check_positive(
            threshold, "threshold", "; it is a barrier height", allow_zero=True
        )
    res = interpolate(
        a,
        b,
        loss_fn,
        data,
        steps=steps,
        metric_fn=metric_fn,
        bn=bn,
        bn_data=bn_data,
        model=model,
        mode=mode,
        align=align,
    )
    if metric_fn is not None:
        crit, value = "error barrier (Frankle)", res.error_barrier
        thr = 0.02 if threshold is None else threshold
    else:
        crit, value = "loss barrier (Entezari)", res.barrier
        ends = float((res.losses[0] + res.losses[-1]) / 2)
        thr = 0.05 * abs(ends) + 1e-3 if threshold is None else threshold
    same = bool(value <= thr) if math.isfinite(value) else False
    return BasinVerdict(same, "same basin" if same else "different basins", crit, value, thr, res)
