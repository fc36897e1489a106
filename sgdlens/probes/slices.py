"""Loss-landscape slices through one model along filter-normalised random directions (Li et al.
2018): a 1-D curve and a 2-D plane."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    LossFn,
    as_batches,
    check_fn,
    check_int,
    check_model,
    own_generator,
    set_mode,
)
from sgdlens.probes._states import state_of
from sgdlens.probes.directions import Direction, check_direction, random_direction
from sgdlens.probes.grid import Grid, check_span, grid2, grid_args, steps2
from sgdlens.probes.restore import preserved

__all__ = ["Landscape1D", "Landscape2D", "landscape_1d", "landscape_2d"]


@dataclass(frozen=True)
class Landscape1D:
    """Loss along ``θ + α d``.

    Attributes:
        alphas: float64 tensor of step sizes (``steps`` points in ``[-span, span]``).
        losses: float64 tensor of mean losses.
        direction: the direction used (parameter name -> tensor).
        vmapped: whether grid points were batched with ``torch.vmap``.
    """

    alphas: Tensor
    losses: Tensor
    direction: Direction
    vmapped: bool


@dataclass(frozen=True)
class Landscape2D:
    """Loss on a plane: ``losses[i, j]`` is the loss at ``origin + xs[i]·d1 + ys[j]·d2``.

    For matplotlib, ``plt.contour(xs, ys, losses.T)``.

    Attributes:
        xs, ys: float64 coordinate vectors.
        losses: float64 tensor of shape ``(len(xs), len(ys))``.
        directions: the two directions (parameter name -> tensor).
        points: named points in plane coordinates, e.g. ``{"a": (0, 0), "b": ..., "c": ...}``
            for :func:`landscape_plane`, ``{"final": (0, 0)}`` for a trajectory.
        trajectory: ``(n, 2)`` projected checkpoints for :func:`landscape_trajectory`.
        explained_variance: fraction of the trajectory's variance along each PCA direction.
        vmapped: whether grid points were batched with ``torch.vmap``.
    """

    xs: Tensor
    ys: Tensor
    losses: Tensor
    directions: tuple[Direction, Direction]
    points: dict[str, tuple[float, float]]
    trajectory: Tensor | None = None
    explained_variance: Tensor | None = None
    vmapped: bool = False


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    steps: int = 25,
    span: float = 1.0,
    direction: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    norm: str = "filter",
    ignore: str | None = "biasbn",
    bn: str = "carry",
    bn_data: Any = None,
    mode: str = "eval",
    vmap: bool | None = None,
    chunk_size: int = 16,
    progress: bool = False,
) -> Landscape1D:
    """Loss along one filter-normalised random direction through the model's weights.

    ``L(θ + α d)`` for ``steps`` values of α evenly spaced in ``[-span, span]`` (Li et al.
    2018; ``d`` from :func:`random_direction` unless given).

    Cost: ``steps`` forward passes per batch, no backward pass (``bn="recompute"``: as many
    train-mode forward passes per ``bn_data`` batch again).

    Args:
        model: the model; left bit-for-bit unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        steps: number of points (>= 2).
        span: the grid covers ``[-span, span]``.
        direction: a direction dict (default: a new random, filter-normalised one).
        generator: for the random direction.
        norm: ``"filter"``, ``"layer"`` or ``"none"`` (see :func:`random_direction`).
        ignore: ``"biasbn"`` or ``None`` (see :func:`random_direction`).
        bn: ``"carry"`` (running statistics unchanged) or ``"recompute"``.
        bn_data: batches for ``bn="recompute"`` (default ``data``).
        mode: ``"eval"`` (default) or ``"train"``.
        vmap: ``True`` batches grid points with ``torch.vmap`` (a loop where the loss function
            does not vmap), ``False`` loops, ``None`` (default) times one vmapped chunk against
            one looped chunk and keeps the faster (on CPU a loop often wins).
        chunk_size: grid points per vmap call (memory grows with it).
        progress: show a tqdm progress bar (needs tqdm).

    Returns:
        :class:`Landscape1D`.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> g = torch.Generator().manual_seed(0)
        >>> curve = probes.landscape_1d(model, loss_fn, (x, y), steps=5, generator=g)
        >>> curve.losses.shape
        torch.Size([5])
    """
    check_model(model)
    check_fn(loss_fn)
    check_int(steps, "steps", 2, "; the number of grid points")
    span = check_span(span)
    bn, mode = grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    with preserved(model):
        generator = own_generator(generator)
        d = (
            random_direction(model, generator=generator, norm=norm, ignore=ignore)
            if direction is None
            else None
        )
        base = state_of(model, model, "model")
        d = d if d is not None else check_direction(direction, base, "direction")
        set_mode(model, mode)
        grid = Grid(
            model,
            loss_fn,
            batches,
            base,
            [d],
            mode=mode,
            bn=bn,
            bn_batches=bn_batches,
            use_vmap=vmap,
            chunk_size=chunk_size,
            progress=progress,
            desc="landscape_1d",
        )
        alphas = torch.linspace(-span, span, steps, dtype=torch.float64)
        losses = grid.run(alphas.unsqueeze(1))
    return Landscape1D(alphas, losses, d, grid.used_vmap)


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    steps: int | tuple[int, int] = 21,
    span: float = 1.0,
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    generator: torch.Generator | None = None,
    norm: str = "filter",
    ignore: str | None = "biasbn",
    bn: str = "carry",
    bn_data: Any = None,
    mode: str = "eval",
    vmap: bool | None = None,
    chunk_size: int = 16,
    progress: bool = False,
) -> Landscape2D:
    """Loss on the plane of two filter-normalised random directions through the model.

    ``L(θ + x d1 + y d2)`` on a ``steps x steps`` grid over ``[-span, span]²`` (Li et al.
    2018). In high dimension two random directions are nearly orthogonal.

    Cost: ``nx * ny`` forward passes per batch (441 for the default 21 x 21), no backward;
    batched by ``torch.vmap`` in chunks where possible.

    Args:
        model: the model; left bit-for-bit unchanged.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches (averaged, equal weights).
        steps: points per axis, or a pair ``(nx, ny)``.
        span: the grid covers ``[-span, span]`` on both axes.
        directions: two direction dicts (default: two new random ones).
        generator, norm, ignore, bn, bn_data, mode, vmap, chunk_size, progress: as for
            :func:`landscape_1d`.

    Returns:
        :class:`Landscape2D` with ``points={"model": (0, 0)}``.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> g = torch.Generator().manual_seed(0)
        >>> surf = probes.landscape_2d(model, loss_fn, (x, y), steps=5, generator=g)
        >>> surf.losses.shape
        torch.Size([5, 5])
    """
    check_model(model)
    check_fn(loss_fn)
    nx, ny = steps2(steps)
    span = check_span(span)
    bn, mode = grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    with preserved(model):
        base = state_of(model, model, "model")
        if directions is None:
            generator = own_generator(generator)  # one generator: two different directions
            d1 = random_direction(model, generator=generator, norm=norm, ignore=ignore)
            d2 = random_direction(model, generator=generator, norm=norm, ignore=ignore)
        else:
            if not isinstance(directions, (tuple, list)) or len(directions) != 2:
                raise TypeError("directions must be a pair (d1, d2) of direction dicts")
            d1 = check_direction(directions[0], base, "directions[0]")
            d2 = check_direction(directions[1], base, "directions[1]")
        xs = torch.linspace(-span, span, nx, dtype=torch.float64)
        ys = torch.linspace(-span, span, ny, dtype=torch.float64)
        losses, vm = grid2(
            model,
            loss_fn,
            batches,
            base,
            d1,
            d2,
            xs,
            ys,
            mode=mode,
            bn=bn,
            bn_batches=bn_batches,
            vmap=vmap,
            chunk_size=chunk_size,
            progress=progress,
            desc="landscape_2d",
        )
    return Landscape2D(xs, ys, losses, (d1, d2), {"model": (0.0, 0.0)}, vmapped=vm)
