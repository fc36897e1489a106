"""Planes through several models: the plane through three models (Garipov et al. 2018) and the
plane of a trajectory's top PCA directions (Li et al. 2018, §7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    LossFn,
    as_batches,
    check_fn,
    check_model,
    check_positive,
)
from sgdlens.probes._states import preserved_all, state_of
from sgdlens.probes.align import aligned_to, check_align
from sgdlens.probes.grid import bounds, flat, grid2, grid_args, split, steps2
from sgdlens.probes.slices import Landscape2D

__all__ = ["landscape_plane", "landscape_trajectory"]


def landscape_plane(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    c: nn.Module | Mapping[str, Tensor],
    loss_fn: LossFn,
    data: Any,
    *,
    steps: int | tuple[int, int] = 21,
    margin: float = 0.25,
    model: nn.Module | None = None,
    bn: str = "carry",
    bn_data: Any = None,
    mode: str = "eval",
    vmap: bool | None = None,
    chunk_size: int = 16,
    progress: bool = False,
    align: bool | str = False,
) -> Landscape2D:
    """Loss on the plane through three models (Garipov et al. 2018).

    Origin ``θ_a``; ``d1 = (θ_b - θ_a)/|θ_b - θ_a|``; ``d2`` the unit part of ``θ_c - θ_a``
    orthogonal to ``d1`` (Gram-Schmidt, over all parameters). Coordinates are in parameter-space
    distance; the grid covers the three points with a ``margin`` (fraction of their extent) on
    each side. Buffers come from the first module among ``model``, ``a``, ``b``, ``c``
    (``bn="carry"``) or are re-estimated at every point (``bn="recompute"``).

    Cost: ``nx * ny`` forward passes per batch, no backward.

    Args:
        a, b, c: three models or state dicts of one architecture.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches.
        steps: points per axis or ``(nx, ny)``.
        margin: extra extent around the three points, as a fraction (>= 0).
        model: the module that evaluates state dicts (default: the first module given).
        bn, bn_data, mode, vmap, chunk_size, progress: as for :func:`landscape_1d`.
        align: ``True``/``"weights"`` or ``"activations"``: permute ``b``'s and ``c``'s hidden
            units to match ``a``'s first (see :func:`~sgdlens.probes.align`), so the plane
            shows basins rather than copies of one basin under permutation.

    Returns:
        :class:`Landscape2D` with ``points`` ``{"a": (0, 0), "b": (|b-a|, 0), "c": (.., ..)}``.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> torch.manual_seed(0) and None
        >>> nets = [torch.nn.Linear(3, 1) for _ in range(3)]
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> surf = probes.landscape_plane(*nets, loss_fn, (x, y), steps=5)
        >>> sorted(surf.points)
        ['a', 'b', 'c']
    """
    template = (
        model
        if model is not None
        else next((m for m in (a, b, c) if isinstance(m, nn.Module)), None)
    )
    if template is None:
        raise TypeError(
            "a, b and c are all state dicts; pass model=<a module of that "
            "architecture> to evaluate them"
        )
    check_model(template)
    check_fn(loss_fn)
    nx, ny = steps2(steps)
    margin = check_positive(margin, "margin", "; a fraction of the points' extent", allow_zero=True)
    bn, mode = grid_args(steps, chunk_size, bn, mode)
    how = check_align(align)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    if how is not None:
        b, c = (aligned_to(a, x, template, how, batches) for x in (b, c))
    mods = [m for m in (template, a, b, c) if isinstance(m, nn.Module)]
    with preserved_all(mods):
        sa, sb, sc = (state_of(x, template, n) for x, n in ((a, "a"), (b, "b"), (c, "c")))
        names = [n for n, _ in template.named_parameters()]
        fa, fb, fc = flat(sa, names), flat(sb, names), flat(sc, names)
        u = fb - fa
        un = float(u.norm())
        if un == 0.0:
            raise ValueError("a and b have identical parameters; the plane is undefined")
        u = u / un
        w = fc - fa
        cx = float(torch.dot(w, u))
        v = w - cx * u
        vn = float(v.norm())
        if vn <= 1e-12 * max(un, 1.0):
            raise ValueError("a, b and c are collinear in parameter space; the plane is undefined")
        v = v / vn
        d1, d2 = split(u, names, sa), split(v, names, sa)
        pts = torch.tensor([[0.0, 0.0], [un, 0.0], [cx, vn]], dtype=torch.float64)
        xs, ys = bounds(pts[:, 0], margin, nx), bounds(pts[:, 1], margin, ny)
        losses, vm = grid2(
            template,
            loss_fn,
            batches,
            sa,
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
            desc="landscape_plane",
        )
    points = {"a": (0.0, 0.0), "b": (un, 0.0), "c": (cx, vn)}
    return Landscape2D(xs, ys, losses, (d1, d2), points, vmapped=vm)


def landscape_trajectory(
    states: Sequence[nn.Module | Mapping[str, Tensor]],
    loss_fn: LossFn,
    data: Any,
    *,
    model: nn.Module,
    steps: int | tuple[int, int] = 21,
    margin: float = 0.25,
    bn: str = "carry",
    bn_data: Any = None,
    mode: str = "eval",
    vmap: bool | None = None,
    chunk_size: int = 16,
    progress: bool = False,
) -> Landscape2D:
    """Loss on the plane of a trajectory's top-2 PCA directions, with the path projected.

    As Li et al. 2018 (§7): PCA (SVD) of the matrix whose rows are ``θ_i - θ_final`` for the
    recorded checkpoints; the plane passes through the final checkpoint (the last of
    ``states``, evaluated with its buffers) along the top two right singular vectors; each
    checkpoint is projected onto them. Random directions would be nearly orthogonal to the
    path and show nothing of it.

    Cost: one SVD of an ``n x P`` matrix (``n`` checkpoints, ``P`` parameters), then
    ``nx * ny`` forward passes per batch.

    Args:
        states: at least three checkpoints (models or state dicts), oldest first.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        data: one batch or an iterable of batches.
        model: the module that evaluates the checkpoints (left unchanged).
        steps: points per axis or ``(nx, ny)``.
        margin: extra extent around the projected path, as a fraction (>= 0).
        bn, bn_data, mode, vmap, chunk_size, progress: as for :func:`landscape_1d`.

    Returns:
        :class:`Landscape2D` with ``trajectory`` (``(n, 2)`` coordinates),
        ``explained_variance`` (the two directions' shares) and ``points={"final": (0, 0)}``.

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> opt, states = torch.optim.SGD(model.parameters(), lr=0.1), []
        >>> for _ in range(5):
        ...     opt.zero_grad(); loss_fn(model, (x, y)).backward(); opt.step()
        ...     states.append({k: v.clone() for k, v in model.state_dict().items()})
        >>> surf = probes.landscape_trajectory(states, loss_fn, (x, y), model=model, steps=5)
        >>> surf.trajectory.shape
        torch.Size([5, 2])
    """
    check_model(model)
    check_fn(loss_fn)
    if isinstance(states, (str, bytes, Mapping)) or not isinstance(states, Sequence):
        raise TypeError(
            f"states must be a list of checkpoints (models or state dicts), got "
            f"{type(states).__name__}"
        )
    if len(states) < 3:
        raise ValueError(f"states needs at least 3 checkpoints for a 2-D PCA, got {len(states)}")
    nx, ny = steps2(steps)
    margin = check_positive(margin, "margin", "; a fraction of the path's extent", allow_zero=True)
    bn, mode = grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    mods = [model] + [s for s in states if isinstance(s, nn.Module)]
    with preserved_all(mods):
        sts = [state_of(s, model, f"states[{i}]") for i, s in enumerate(states)]
        names = [n for n, _ in model.named_parameters()]
        final = sts[-1]
        ff = flat(final, names)
        M = torch.stack([flat(s, names) - ff for s in sts])
        _, S, Vh = torch.linalg.svd(M, full_matrices=False)
        if S.numel() < 2 or float(S[1]) <= 1e-12 * max(float(S[0]), 1e-300):
            raise ValueError(
                "the trajectory spans fewer than two directions; record checkpoints that differ"
            )
        var = S**2 / (S**2).sum()
        u, v = Vh[0], Vh[1]
        traj = torch.stack([M @ u, M @ v], dim=1)
        d1, d2 = split(u, names, final), split(v, names, final)
        xs, ys = bounds(traj[:, 0], margin, nx), bounds(traj[:, 1], margin, ny)
        losses, vm = grid2(
            model,
            loss_fn,
            batches,
            final,
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
            desc="landscape_trajectory",
        )
    return Landscape2D(
        xs,
        ys,
        losses,
        (d1, d2),
        {"final": (0.0, 0.0)},
        trajectory=traj,
        explained_variance=var[:2].clone(),
        vmapped=vm,
    )
