"""How far the weights can move along random directions before the loss rises by ε."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    LossFn,
    as_batches,
    check_fn,
    check_generator,
    check_int,
    check_mode,
    check_model,
    check_positive,
    own_generator,
    set_mode,
)
from sgdlens.probes._states import state_of
from sgdlens.probes.directions import check_norm_ignore, random_direction
from sgdlens.probes.grid import Grid
from sgdlens.probes.restore import preserved

__all__ = ["FlatnessResult", "flatness"]


@dataclass(frozen=True)
class FlatnessResult:
    """How far the weights can move along random directions before the loss rises by ε.

    Attributes:
        radius: median over directions of the radius (``inf`` when most never reach ε).
        radii: float64 tensor, one radius per direction (``inf`` where the loss stayed within
            ε up to ``max_radius``), in units of the (filter-normalised) direction.
        epsilon: the loss rise.
        base_loss: the loss at the model's weights.
        evaluations: loss evaluations spent (each one forward pass per batch).
    """

    radius: float
    radii: Tensor
    epsilon: float
    base_loss: float
    evaluations: int

    def __float__(self) -> float:
        return self.radius


def flatness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    epsilon: float = 0.1,
    directions: int = 8,
    generator: torch.Generator | None = None,
    norm: str = "filter",
    ignore: str | None = "biasbn",
    max_radius: float = 10.0,
    rtol: float = 0.01,
    mode: str = "eval",
) -> FlatnessResult:
    """The radius along filter-normalised random directions at which the loss rises by ε.

    For each of ``directions`` random directions ``d`` (:func:`random_direction`), the radius
    ``r`` where ``L(θ + r d) - L(θ)`` first reaches ``epsilon``: bracketed by doubling from
    ``max_radius / 1024`` and refined by bisection to relative width ``rtol``. Radius 1 is a
    step the size of every filter's own norm. Wider basins give larger radii.

    Cost: about ``directions * (log2(1024 r / max_radius) + log2(1/rtol))`` forward passes
    per batch (about 15 per direction), no backward.

    Args:
        model: the model; left bit-for-bit unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        epsilon: the loss rise (same units as the loss; > 0).
        directions: number of random directions (>= 1).
        generator: for the directions.
        norm, ignore: see :func:`random_direction`.
        max_radius: the largest radius searched.
        rtol: relative precision of each radius.
        mode: ``"eval"`` (default) or ``"train"``.

    Returns:
        :class:`FlatnessResult`.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> res = probes.flatness(model, loss_fn, (x, y), epsilon=0.05, directions=2,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> res.radii.shape
        torch.Size([2])
    """
    check_model(model)
    check_fn(loss_fn)
    epsilon = check_positive(epsilon, "epsilon", "; the loss rise that defines the radius")
    check_int(directions, "directions", 1, "; the number of random directions")
    max_radius = check_positive(max_radius, "max_radius")
    rtol = check_positive(rtol, "rtol", "; e.g. 0.01")
    mode = check_mode(mode)
    generator = check_generator(generator)
    check_norm_ignore(norm, ignore)
    batches = as_batches(data)
    with preserved(model):
        base = state_of(model, model, "model")
        set_mode(model, mode)
        generator = own_generator(generator)  # one generator: different directions
        dirs = [
            random_direction(model, generator=generator, norm=norm, ignore=ignore)
            for _ in range(directions)
        ]
        radii = []
        evals = 0

        def line(d: dict[str, Tensor]) -> Grid:  # the loss along one direction, point by point
            return Grid(
                model,
                loss_fn,
                batches,
                base,
                [d],
                mode=mode,
                bn="carry",
                bn_batches=batches,
                use_vmap=False,
                chunk_size=1,
                progress=False,
                desc="flatness",
            )

        grid0 = line(dirs[0])
        l0 = grid0.at([0.0])
        evals += 1
        for d in dirs:
            g = line(d)
            g.seed = grid0.seed
            g.ev.seed = grid0.seed
            lo, hi = 0.0, max_radius / 1024
            found = False
            while hi <= max_radius * (1 + 1e-12):
                evals += 1
                val = g.at([hi])
                if not math.isfinite(val) or val - l0 >= epsilon:
                    found = True
                    break
                lo, hi = hi, hi * 2
            if not found:
                radii.append(math.inf)
                continue
            while hi - lo > rtol * hi:
                mid = (lo + hi) / 2
                evals += 1
                val = g.at([mid])
                if not math.isfinite(val) or val - l0 >= epsilon:
                    hi = mid
                else:
                    lo = mid
            radii.append(hi)
    r = torch.tensor(radii, dtype=torch.float64)
    return FlatnessResult(
        float(r.median())
        if r.numel() % 2
        else float(r.sort().values[r.numel() // 2 - 1 : r.numel() // 2 + 1].mean()),
        r,
        epsilon,
        l0,
        evals,
    )
