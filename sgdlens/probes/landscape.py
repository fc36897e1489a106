"""Loss-landscape slices: filter-normalised 1-D/2-D, the plane through three models, and the
plane of a trajectory's top PCA directions; and :func:`flatness`.

Directions follow Li et al. 2018 (``net_plotter.py``): ``d ~ N(0, I)``; for every parameter of
dim >= 2 each slice along dim 0 (a conv filter, or one output unit's incoming weights) is rescaled
to the norm of the matching slice of θ, ``d_i <- d_i * |θ_i| / (|d_i| + 1e-10)``; parameters of
dim <= 1 (biases, norm-layer γ/β) get ``d = 0`` with ``ignore="biasbn"`` and ``d = θ`` otherwise.
Buffers (BatchNorm running statistics) are carried unchanged (``bn="carry"``) or re-estimated at
every grid point (``bn="recompute"``). Scaling a ReLU layer's weights and bias by ``c > 0`` and
the next layer's weights by ``1/c`` leaves filter-normalised curves unchanged.

Grid points are evaluated with ``torch.func.functional_call``, batched with ``torch.vmap`` in
chunks of ``chunk_size`` points where the loss function allows it (no ``.item()``, no
data-dependent Python branching, no dropout in train mode) and where that is faster (timed on the
first chunks), else in a plain loop that reuses ``θ + x·d1`` along each grid row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    Evaluator,
    LossFn,
    as_batches,
    check_fn,
    check_generator,
    check_int,
    check_mode,
    check_model,
    check_positive,
    own_generator,
    probe_seed,
    progress_iter,
    set_mode,
    trainable,
)
from sgdlens.probes.align import aligned_to, check_align
from sgdlens.probes.interpolate import _check_bn, _preserved_all, _recompute_bn, _state_of
from sgdlens.probes.restore import preserved

__all__ = [
    "FlatnessResult",
    "Landscape1D",
    "Landscape2D",
    "flatness",
    "landscape_1d",
    "landscape_2d",
    "landscape_plane",
    "landscape_trajectory",
    "random_direction",
]

Direction = dict[str, Tensor]


def _check_norm_ignore(norm: Any, ignore: Any) -> None:
    if norm not in ("filter", "layer", "none"):
        raise ValueError(f"norm must be 'filter' (Li et al.), 'layer' or 'none', got {norm!r}")
    if ignore not in ("biasbn", None, "none"):
        raise ValueError(
            f"ignore must be 'biasbn' (zero direction on biases and norm layers) or None "
            f"(d = θ there, as Li et al.'s code does without --xignore), got {ignore!r}"
        )


def _normalise(d: Tensor, theta: Tensor, norm: str, ignore: str | None) -> Tensor:
    if theta.dim() <= 1:
        return torch.zeros_like(theta) if ignore == "biasbn" else theta.clone()
    if norm == "filter":
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        tn = theta.reshape(theta.shape[0], -1).norm(dim=1)
        factor = (tn / (dn + 1e-10)).reshape((-1,) + (1,) * (d.dim() - 1))
        return d * factor
    if norm == "layer":
        return d * (theta.norm() / (d.norm() + 1e-10))
    return d


def random_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    norm: str = "filter",
    ignore: str | None = "biasbn",
) -> Direction:
    """A random direction in weight space, filter-normalised as in Li et al. 2018.

    One Gaussian draw per trainable parameter (in ``named_parameters()`` order, drawn in float64
    on the generator's device, so a seed gives the same direction on every device and dtype),
    then normalised per ``norm``: ``"filter"`` (each slice along dim 0 to the norm of θ's
    slice), ``"layer"`` (each tensor to θ's norm) or ``"none"``. Tensors of dim <= 1 get 0
    (``ignore="biasbn"``) or θ itself (``ignore=None``).

    Cost: no forward or backward pass; one tensor per parameter.

    Args:
        model: the model whose weights set the scale (not modified).
        generator: a ``torch.Generator`` for reproducible directions (default: a seed drawn
            from the global RNG, whose state is then restored, so repeated calls without a
            generator give the same direction).
        norm: ``"filter"`` (default), ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` (default) or ``None``.

    Returns:
        A dict parameter name -> direction tensor (shape, dtype and device of the parameter).

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> m = torch.nn.Linear(3, 2)
        >>> d = probes.random_direction(m, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(d["weight"].norm(dim=1), m.weight.norm(dim=1))
        True
        >>> float(d["bias"].abs().sum())
        0.0
    """
    check_model(model)
    generator = check_generator(generator)
    _check_norm_ignore(norm, ignore)
    if generator is None:  # a seed from the global RNG, which is then put back as it was
        state = torch.get_rng_state()
        generator = own_generator(None)
        torch.set_rng_state(state)
    dev = generator.device
    out = {}
    with torch.no_grad():
        for name, p in trainable(model):
            d = torch.randn(p.shape, generator=generator, dtype=torch.float64, device=dev)
            d = d.to(device=p.device, dtype=p.dtype)
            out[name] = _normalise(d, p.detach(), norm, None if ignore == "none" else ignore)
    return out


def _check_direction(d: Any, base: Mapping[str, Tensor], name: str) -> Direction:
    if not isinstance(d, Mapping):
        raise TypeError(
            f"{name} must be a dict parameter name -> tensor (e.g. from random_direction), "
            f"got {type(d).__name__}"
        )
    out = {}
    for k, v in d.items():
        if k not in base:
            raise ValueError(
                f"{name} has an entry {k!r} that is not a parameter of the model; use names "
                "from model.named_parameters()"
            )
        if not isinstance(v, Tensor) or v.shape != base[k].shape:
            raise ValueError(
                f"{name}[{k!r}] must be a tensor of shape {tuple(base[k].shape)}, got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        out[k] = v.detach().to(device=base[k].device, dtype=base[k].dtype)
    return out


class _Grid:
    """Evaluates ``mean loss(base + Σ_j c_j d_j)`` at many coordinate tuples ``c``."""

    def __init__(
        self,
        template: nn.Module,
        loss_fn: LossFn,
        batches: list[Any],
        base: dict[str, Tensor],
        dirs: list[Direction],
        *,
        mode: str,
        bn: str,
        bn_batches: list[Any],
        use_vmap: bool | None,
        chunk_size: int,
        progress: bool,
        desc: str,
    ) -> None:
        self.template = template
        self.loss_fn = loss_fn
        self.batches = batches
        self.base = base
        self.dirs = dirs
        self.names = sorted({k for d in dirs for k in d}, key=list(base).index)
        self.mode = mode
        self.bn = bn
        self.bn_batches = bn_batches
        self.use_vmap = use_vmap if bn == "carry" else False
        self.chunk_size = chunk_size
        self.progress = progress
        self.desc = desc
        self.seed = probe_seed()
        self.ev = Evaluator(template, loss_fn, batches, "loss_fn", self.seed)
        self.used_vmap = False
        self.evaluations = 0
        self._row_key: float | None = None
        self._row: dict[str, Tensor] = {}

    def _point(self, c: Sequence[float]) -> dict[str, Tensor]:
        st = dict(self.base)
        # base + c_0 d_0 is shared by a whole grid row: cache it for the last c_0 seen
        key = c[0]
        if self._row_key != key:
            self._row = {n: self._axpy(self.base[n], key, self.dirs[0].get(n)) for n in self.names}
            self._row_key = key
        for n in self.names:
            t = self._row[n]
            for cj, d in zip(c[1:], self.dirs[1:]):
                t = self._axpy(t, cj, d.get(n))
            st[n] = t
        return st

    @staticmethod
    def _axpy(t: Tensor, c: float, d: Tensor | None) -> Tensor:
        return t if d is None or c == 0.0 else torch.add(t, d, alpha=c)

    def _one(self, c: Sequence[float]) -> float:
        st = self._point(c)
        if self.bn == "recompute":
            st = _recompute_bn(self.template, st, self.bn_batches, self.loss_fn, self.seed)
        with torch.no_grad():
            return float(self.ev.mean(st))

    def _chunk_vmap(self, coords: Tensor) -> Tensor:
        batched = {}
        for n in self.names:
            base = self.base[n].unsqueeze(0)
            t: Tensor | None = None
            for j, d in enumerate(self.dirs):
                if n in d:
                    cj = coords[:, j].to(device=base.device, dtype=base.dtype)
                    cj = cj.reshape((-1,) + (1,) * d[n].dim())
                    if t is None:
                        t = torch.addcmul(base, cj, d[n].unsqueeze(0))
                    else:
                        t.addcmul_(cj, d[n].unsqueeze(0))
            batched[n] = t if t is not None else base.expand((coords.shape[0], *base.shape[1:]))
        fixed = {k: v for k, v in self.base.items() if k not in batched}

        def f(params: dict[str, Tensor]) -> Tensor:
            return self.ev.mean({**fixed, **params})

        with torch.no_grad():
            return torch.vmap(f)(batched).detach().to(torch.float64).cpu()

    def run(self, coords: Tensor) -> Tensor:
        """``coords`` (P, ndirs) float64 -> losses (P,) float64.

        ``use_vmap`` True: vmapped chunks (a loop where vmap fails); False: a loop; None
        (auto): time one vmapped chunk against one looped chunk and keep the faster.
        """
        out = torch.empty(coords.shape[0], dtype=torch.float64)
        total = coords.shape[0]
        self.evaluations += total
        mode: str = {True: "vmap", False: "loop", None: "try"}[self.use_vmap]
        per_point: dict[str, float] = {}
        pos = 0
        with torch.no_grad():
            bar = progress_iter(range(total), total, self.progress, self.desc)
            it = iter(bar)
            while pos < total:
                if mode == "try" and "vmap" in per_point and "loop" in per_point:
                    mode = "vmap" if per_point["vmap"] < per_point["loop"] else "loop"
                use = (
                    "loop"
                    if mode == "loop"
                    else ("loop" if mode == "try" and "vmap" in per_point else "vmap")
                )
                stop = min(pos + self.chunk_size, total)
                t0 = time.perf_counter()
                if use == "vmap":
                    try:
                        out[pos:stop] = self._chunk_vmap(coords[pos:stop])
                        self.used_vmap = True
                    except (RuntimeError, NotImplementedError):
                        # the loss function does not vmap (.item(), data-dependent branching,
                        # randomness, an op without a batching rule): loop from here on; a
                        # genuine error in loss_fn recurs in the loop and propagates
                        mode = "loop"
                        continue
                else:
                    for i in range(pos, stop):
                        out[i] = self._one(coords[i].tolist())
                per_point[use] = (time.perf_counter() - t0) / (stop - pos)
                for _ in range(stop - pos):
                    next(it, None)
                pos = stop
            for _ in it:
                pass
        return out


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


def _check_span(span: Any) -> float:
    return check_positive(span, "span", "; the grid covers [-span, span] along each direction")


def _grid_args(steps: Any, chunk_size: Any, bn: Any, mode: Any) -> tuple[str, str]:
    check_int(chunk_size, "chunk_size", 1, "; grid points evaluated per vmap call")
    return _check_bn(bn), check_mode(mode)


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
    span = _check_span(span)
    bn, mode = _grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    with preserved(model):
        generator = own_generator(generator)
        d = (
            random_direction(model, generator=generator, norm=norm, ignore=ignore)
            if direction is None
            else None
        )
        base = _state_of(model, model, "model")
        d = d if d is not None else _check_direction(direction, base, "direction")
        set_mode(model, mode)
        grid = _Grid(
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


def _steps2(steps: Any) -> tuple[int, int]:
    if isinstance(steps, int) and not isinstance(steps, bool):
        check_int(steps, "steps", 2, "; points per axis")
        return steps, steps
    if isinstance(steps, (tuple, list)) and len(steps) == 2:
        return (check_int(steps[0], "steps[0]", 2), check_int(steps[1], "steps[1]", 2))
    raise TypeError(f"steps must be an int or a pair (nx, ny), got {steps!r}")


def _grid2(
    template: nn.Module,
    loss_fn: LossFn,
    batches: list[Any],
    base: dict[str, Tensor],
    d1: Direction,
    d2: Direction,
    xs: Tensor,
    ys: Tensor,
    *,
    mode: str,
    bn: str,
    bn_batches: list[Any],
    vmap: bool | None,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> tuple[Tensor, bool]:
    set_mode(template, mode)
    grid = _Grid(
        template,
        loss_fn,
        batches,
        base,
        [d1, d2],
        mode=mode,
        bn=bn,
        bn_batches=bn_batches,
        use_vmap=vmap,
        chunk_size=chunk_size,
        progress=progress,
        desc=desc,
    )
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    coords = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    losses = grid.run(coords).reshape(len(xs), len(ys))
    return losses, grid.used_vmap


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
    nx, ny = _steps2(steps)
    span = _check_span(span)
    bn, mode = _grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    with preserved(model):
        base = _state_of(model, model, "model")
        if directions is None:
            generator = own_generator(generator)  # one generator: two different directions
            d1 = random_direction(model, generator=generator, norm=norm, ignore=ignore)
            d2 = random_direction(model, generator=generator, norm=norm, ignore=ignore)
        else:
            if not isinstance(directions, (tuple, list)) or len(directions) != 2:
                raise TypeError("directions must be a pair (d1, d2) of direction dicts")
            d1 = _check_direction(directions[0], base, "directions[0]")
            d2 = _check_direction(directions[1], base, "directions[1]")
        xs = torch.linspace(-span, span, nx, dtype=torch.float64)
        ys = torch.linspace(-span, span, ny, dtype=torch.float64)
        losses, vm = _grid2(
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


def _flat(st: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([st[n].reshape(-1).to(torch.float64) for n in names])


def _split(flat: Tensor, names: list[str], like: Mapping[str, Tensor]) -> Direction:
    out = {}
    i = 0
    for n in names:
        k = like[n].numel()
        out[n] = flat[i : i + k].reshape(like[n].shape).to(like[n].dtype)
        i += k
    return out


def _bounds(pts: Tensor, margin: float, n: int) -> Tensor:
    lo, hi = float(pts.min()), float(pts.max())
    width = max(hi - lo, 1e-12)
    return torch.linspace(lo - margin * width, hi + margin * width, n, dtype=torch.float64)


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
    nx, ny = _steps2(steps)
    margin = check_positive(margin, "margin", "; a fraction of the points' extent", allow_zero=True)
    bn, mode = _grid_args(steps, chunk_size, bn, mode)
    how = check_align(align)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    if how is not None:
        b, c = (aligned_to(a, x, template, how, batches) for x in (b, c))
    mods = [m for m in (template, a, b, c) if isinstance(m, nn.Module)]
    with _preserved_all(mods):
        sa, sb, sc = (_state_of(x, template, n) for x, n in ((a, "a"), (b, "b"), (c, "c")))
        names = [n for n, _ in template.named_parameters()]
        fa, fb, fc = _flat(sa, names), _flat(sb, names), _flat(sc, names)
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
        d1, d2 = _split(u, names, sa), _split(v, names, sa)
        pts = torch.tensor([[0.0, 0.0], [un, 0.0], [cx, vn]], dtype=torch.float64)
        xs, ys = _bounds(pts[:, 0], margin, nx), _bounds(pts[:, 1], margin, ny)
        losses, vm = _grid2(
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
    nx, ny = _steps2(steps)
    margin = check_positive(margin, "margin", "; a fraction of the path's extent", allow_zero=True)
    bn, mode = _grid_args(steps, chunk_size, bn, mode)
    batches = as_batches(data)
    bn_batches = batches if bn_data is None else as_batches(bn_data, "bn_data")
    mods = [model] + [s for s in states if isinstance(s, nn.Module)]
    with _preserved_all(mods):
        sts = [_state_of(s, model, f"states[{i}]") for i, s in enumerate(states)]
        names = [n for n, _ in model.named_parameters()]
        final = sts[-1]
        ff = _flat(final, names)
        M = torch.stack([_flat(s, names) - ff for s in sts])
        _, S, Vh = torch.linalg.svd(M, full_matrices=False)
        if S.numel() < 2 or float(S[1]) <= 1e-12 * max(float(S[0]), 1e-300):
            raise ValueError(
                "the trajectory spans fewer than two directions; record checkpoints that differ"
            )
        var = S**2 / (S**2).sum()
        u, v = Vh[0], Vh[1]
        traj = torch.stack([M @ u, M @ v], dim=1)
        d1, d2 = _split(u, names, final), _split(v, names, final)
        xs, ys = _bounds(traj[:, 0], margin, nx), _bounds(traj[:, 1], margin, ny)
        losses, vm = _grid2(
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


# ----------------------------------------------------------------------------- flatness


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
    _check_norm_ignore(norm, ignore)
    batches = as_batches(data)
    with preserved(model):
        base = _state_of(model, model, "model")
        set_mode(model, mode)
        generator = own_generator(generator)  # one generator: different directions
        dirs = [
            random_direction(model, generator=generator, norm=norm, ignore=ignore)
            for _ in range(directions)
        ]
        radii = []
        evals = 0
        grid0 = _Grid(
            model,
            loss_fn,
            batches,
            base,
            dirs[:1],
            mode=mode,
            bn="carry",
            bn_batches=batches,
            use_vmap=False,
            chunk_size=1,
            progress=False,
            desc="flatness",
        )
        l0 = grid0._one([0.0])
        evals += 1
        for d in dirs:
            g = _Grid(
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
            g.seed = grid0.seed
            g.ev.seed = grid0.seed
            lo, hi = 0.0, max_radius / 1024
            found = False
            while hi <= max_radius * (1 + 1e-12):
                evals += 1
                val = g._one([hi])
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
                val = g._one([mid])
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
