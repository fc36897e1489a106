"""Figures of probe results: 1-D interpolation curves and 2-D loss landscapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sgdlens.plot._base import _colors, _figure, _finish


def _as_curve(result: Any) -> dict[str, Any]:
    if isinstance(result, Mapping):
        d = dict(result)
    elif hasattr(result, "to_dict"):
        d = result.to_dict()
    elif hasattr(result, "alphas") and hasattr(result, "losses"):
        d = {"alphas": result.alphas, "losses": result.losses}
    else:
        raise TypeError(
            f"interpolation() takes InterpolationResult objects or dicts with 'alphas' and "
            f"'losses', got {type(result).__name__}"
        )
    if "alphas" not in d or "losses" not in d:
        raise ValueError(
            f"interpolation(): a curve needs 'alphas' and 'losses', got keys {sorted(d)}"
        )
    a = np.asarray([float(v) for v in _flat(d["alphas"])])
    y = np.asarray([float(v) for v in _flat(d["losses"])])
    if a.shape != y.shape or a.size < 2:
        raise ValueError(
            f"interpolation(): alphas and losses must match and hold >= 2 points, got "
            f"{a.size} and {y.size}"
        )
    d["alphas"], d["losses"] = a, y
    if d.get("barrier") is None or d.get("barrier_alpha") is None:
        chord = y[0] + (y[-1] - y[0]) * (a - a[0]) / (a[-1] - a[0])
        k = int(np.nanargmax(y - chord))
        d["barrier"], d["barrier_alpha"] = float(y[k] - chord[k]), float(a[k])
    return d


def _flat(x: Any) -> list[Any]:
    if hasattr(x, "tolist"):
        x = x.tolist()
    return list(x)


def interpolation(
    results: Any,
    *,
    labels: Sequence[str] | None = None,
    ylabel: str = "loss",
) -> Figure:
    """1-D interpolation curves ``L((1-α)θ_a + αθ_b)`` with the chord and the barrier.

    For each curve: the loss (solid, gid ``sgdlens-curve``), the chord between its end points
    (dotted, ``sgdlens-chord``) and the barrier as a vertical segment from chord to curve at
    ``barrier_alpha`` (``sgdlens-barrier``), labelled with its height (Entezari's barrier,
    see docs/science.md; ≤ 0 inside one convex basin).

    Args:
        results: an :class:`~sgdlens.probes.InterpolationResult`, a dict with ``alphas`` and
            ``losses`` (``barrier``/``barrier_alpha`` are computed when absent), or a list of
            them.
        labels: one label per curve.
        ylabel: the y axis label.

    Example:
        >>> fig = interpolation({"alphas": [0, 0.5, 1], "losses": [0.1, 0.9, 0.2]})
        >>> [line.get_gid() for line in fig.axes[0].lines]
        ['sgdlens-curve', 'sgdlens-chord', 'sgdlens-barrier']
    """
    items = results if isinstance(results, (list, tuple)) else [results]
    curves = [_as_curve(r) for r in items]
    if not curves:
        raise ValueError("interpolation() needs at least one curve")
    labels = (
        list(labels)
        if labels is not None
        else [f"path {i + 1}" if len(curves) > 1 else "loss" for i in range(len(curves))]
    )
    fig, (ax,) = _figure(6.5, 4.4)
    for d, label, color in zip(curves, labels, _colors(len(curves))):
        a, y = d["alphas"], d["losses"]
        ax.plot(a, y, color=color, lw=1.8, marker=".", label=label, gid="sgdlens-curve")
        ax.plot([a[0], a[-1]], [y[0], y[-1]], color=color, ls=":", lw=1.2, gid="sgdlens-chord")
        ba, b = float(d["barrier_alpha"]), float(d["barrier"])
        top = float(np.interp(ba, a, y))
        ax.plot([ba, ba], [top - b, top], color=color, lw=2.5, alpha=0.6, gid="sgdlens-barrier")
        ax.annotate(
            f"barrier {b:.3g}",
            (ba, top),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
            color=color,
        )
    _finish(
        ax,
        xlabel="α  (θ = (1−α)·θ_a + α·θ_b)",  # noqa: RUF001
        ylabel=ylabel,
        title="Linear interpolation",
        legend=len(curves) > 1,
    )
    return fig


def landscape(result: Any, *, levels: int = 25, log: bool = False) -> Figure:
    """A loss landscape: 2-D contours with the projected trajectory, or a 1-D curve.

    For a :class:`~sgdlens.probes.Landscape2D`: filled contours of ``losses`` over
    ``(xs, ys)`` with a colour bar, the projected trajectory (gid ``sgdlens-trajectory``)
    when there is one, and the named points (``sgdlens-point``). Axis labels carry the
    explained variance of PCA directions when known. For a
    :class:`~sgdlens.probes.Landscape1D`: the loss against α.

    Args:
        result: a ``Landscape2D`` or ``Landscape1D`` (or any object with ``xs``, ``ys``,
            ``losses`` / ``alphas``, ``losses``).
        levels: contour levels.
        log: contour ``log10(loss)`` (for landscapes spanning decades).

    Example:
        >>> from types import SimpleNamespace
        >>> import numpy as np
        >>> g = np.linspace(-1, 1, 5)
        >>> l2 = SimpleNamespace(xs=g, ys=g, losses=g[:, None] ** 2 + g[None, :] ** 2,
        ...                      points={"final": (0.0, 0.0)}, trajectory=None,
        ...                      explained_variance=None)
        >>> landscape(l2).axes[0].get_xlabel()
        'direction 1'
    """
    if hasattr(result, "xs") and hasattr(result, "ys"):
        xs = np.asarray(_flat(result.xs), dtype=float)
        ys = np.asarray(_flat(result.ys), dtype=float)
        z = np.asarray(_flat(result.losses), dtype=float)
        if z.shape != (xs.size, ys.size):
            raise ValueError(
                f"landscape(): losses must have shape (len(xs), len(ys)) = "
                f"{(xs.size, ys.size)}, got {z.shape}"
            )
        if log:
            z = np.log10(np.where(z > 0, z, np.nan))
        fig, (ax,) = _figure(6.4, 5.2)
        cs = ax.contourf(xs, ys, z.T, levels=levels, cmap="viridis")
        ax.contour(xs, ys, z.T, levels=levels, colors="white", linewidths=0.4, alpha=0.5)
        fig.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
        traj = getattr(result, "trajectory", None)
        if traj is not None:
            t = np.asarray(_flat(traj), dtype=float)
            ax.plot(
                t[:, 0],
                t[:, 1],
                color="#ff7f0e",
                marker="o",
                ms=3,
                lw=1.5,
                label="trajectory",
                gid="sgdlens-trajectory",
            )
        for name, (px, py) in (getattr(result, "points", None) or {}).items():
            ax.plot([px], [py], "o", color="white", mec="black", ms=7, gid="sgdlens-point")
            ax.annotate(
                str(name),
                (px, py),
                textcoords="offset points",
                xytext=(5, 5),
                color="white",
                fontsize=9,
            )
        ev = getattr(result, "explained_variance", None)
        if ev is not None:
            e = _flat(ev)
            xl, yl = f"PC1 ({100 * e[0]:.0f}% of the path)", f"PC2 ({100 * e[1]:.0f}%)"
        else:
            xl, yl = "direction 1", "direction 2"
        _finish(ax, xlabel=xl, ylabel=yl, title="Loss landscape", legend=traj is not None)
        ax.grid(False)
        return fig
    if hasattr(result, "alphas") and hasattr(result, "losses"):
        a = np.asarray(_flat(result.alphas), dtype=float)
        y = np.asarray(_flat(result.losses), dtype=float)
        fig, (ax,) = _figure(6.4, 4.2)
        ax.plot(a, y, color="black", lw=1.8, gid="sgdlens-curve")
        ax.axvline(0.0, color="grey", ls=":", lw=1)
        _finish(
            ax,
            xlabel="α (filter-normalised direction)",  # noqa: RUF001
            ylabel="loss",
            title="Loss along a direction",
            legend=False,
        )
        return fig
    raise TypeError(f"landscape() takes a Landscape2D or Landscape1D, got {type(result).__name__}")
