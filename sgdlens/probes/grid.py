"""Loss on a grid of points ``θ + Σ_j c_j d_j``.

Grid points are evaluated with ``torch.func.functional_call``, batched with ``torch.vmap`` in
chunks of ``chunk_size`` points where the loss function allows it (no ``.item()``, no
data-dependent Python branching, no dropout in train mode) and where that is faster (timed on the
first chunks), else in a plain loop that reuses ``θ + x·d1`` along each grid row. Buffers
(BatchNorm running statistics) are carried unchanged (``bn="carry"``) or re-estimated at every
point (``bn="recompute"``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens.probes._common import (
    Evaluator,
    LossFn,
    check_int,
    check_mode,
    check_positive,
    probe_seed,
    progress_iter,
    set_mode,
)
from sgdlens.probes._states import check_bn, recompute_bn
from sgdlens.probes.directions import Direction

__all__ = ["Grid", "bounds", "check_span", "flat", "grid2", "grid_args", "split", "steps2"]


class Grid:
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

    def at(self, c: Sequence[float]) -> float:
        st = self._point(c)
        if self.bn == "recompute":
            st = recompute_bn(self.template, st, self.bn_batches, self.loss_fn, self.seed)
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
                        out[i] = self.at(coords[i].tolist())
                per_point[use] = (time.perf_counter() - t0) / (stop - pos)
                for _ in range(stop - pos):
                    next(it, None)
                pos = stop
            for _ in it:
                pass
        return out


def check_span(span: Any) -> float:
    return check_positive(span, "span", "; the grid covers [-span, span] along each direction")


def grid_args(steps: Any, chunk_size: Any, bn: Any, mode: Any) -> tuple[str, str]:
    check_int(chunk_size, "chunk_size", 1, "; grid points evaluated per vmap call")
    return check_bn(bn), check_mode(mode)


def steps2(steps: Any) -> tuple[int, int]:
    if isinstance(steps, int) and not isinstance(steps, bool):
        check_int(steps, "steps", 2, "; points per axis")
        return steps, steps
    if isinstance(steps, (tuple, list)) and len(steps) == 2:
        return (check_int(steps[0], "steps[0]", 2), check_int(steps[1], "steps[1]", 2))
    raise TypeError(f"steps must be an int or a pair (nx, ny), got {steps!r}")


def grid2(
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
    grid = Grid(
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


def flat(st: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([st[n].reshape(-1).to(torch.float64) for n in names])


def split(flat: Tensor, names: list[str], like: Mapping[str, Tensor]) -> Direction:
    out = {}
    i = 0
    for n in names:
        k = like[n].numel()
        out[n] = flat[i : i + k].reshape(like[n].shape).to(like[n].dtype)
        i += k
    return out


def bounds(pts: Tensor, margin: float, n: int) -> Tensor:
    lo, hi = float(pts.min()), float(pts.max())
    width = max(hi - lo, 1e-12)
    return torch.linspace(lo - margin * width, hi + margin * width, n, dtype=torch.float64)
