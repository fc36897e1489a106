"""What every figure shares: reading the run, axes, colours, events, lines or a heatmap."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import LinearSegmentedColormap, LogNorm, Normalize
from matplotlib.figure import Figure

from sgdlens._warn import warn
from sgdlens.records import History
from sgdlens.summary import phase_spans

Run = History | str | os.PathLike[str]

#: Colours of the phases (timeline bars; diffusion also shades the other figures).
PHASE_COLORS = {"warmup": "#bdbdbd", "drift": "#f28e2b", "diffusion": "#4e79a7"}
#: Above this many layers a per-layer metric is drawn as a layer x step heatmap, not lines.
MAX_LINES = 10
#: Runs with more records are drawn from this many (log-spaced: :func:`thin`).
MAX_POINTS = 4000
#: SNR colours: diffusion blue below 1, white at 1, drift orange above.
SNR_CMAP = LinearSegmentedColormap.from_list(
    "sgdlens_snr", [PHASE_COLORS["diffusion"], "#f7f7f7", PHASE_COLORS["drift"]]
)
_DIFFUSION_ALPHA = 0.13


def _history(run: Run) -> History:
    """The run to draw: a History as given, or the last run of a JSONL file; thinned to
    :data:`MAX_POINTS` records (see :func:`thin`)."""
    if isinstance(run, History):
        return thin(run)
    from sgdlens.records import group_runs, read_records

    runs = group_runs(read_records(run)[0])
    if not runs:
        raise ValueError(f"{os.fspath(run)} holds no records")
    if len(runs) > 1:
        warn(
            f"{os.fspath(run)} holds {len(runs)} runs; plotting the last "
            f"(pick one with sgdlens.load(path, run=i))",
        )
    return thin(runs[-1])


def thin(h: History, k: int | None = None) -> History:
    """``h`` with at most ``k`` (default :data:`MAX_POINTS`) of its records, for drawing.

    The records kept are spaced evenly in the logarithm of their index, first and last
    included, as the figures' step axes are logarithmic; events and the header are kept whole.
    A run of 200,000 records then draws in seconds, and no figure holds more points than its
    pixels can show.

    Example:
        >>> h = History([{"step": s} for s in range(1, 10_001)])
        >>> t = thin(h, 100)
        >>> len(t) <= 100, t.records[0]["step"], t.records[-1]["step"]
        (True, 1, 10000)
    """
    k = MAX_POINTS if k is None else k
    n = len(h.records)
    if n <= k:
        return h
    keep = np.unique(np.round(np.geomspace(1, n, k)).astype(int) - 1)
    out = History()
    for i in keep:
        out._add(h.records[int(i)])
    out.events, out.header, out.notes = h.events, h.header, h.notes
    return out


def _figure(width: float = 7.5, height: float = 4.6, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    if n <= 10:
        return [cmap(i) for i in range(n)]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _positive(y: np.ndarray) -> np.ndarray:
    """``y`` with non-positive and non-finite entries as nan (for log axes)."""
    y = np.asarray(y, dtype=float).copy()
    y[~(np.isfinite(y) & (y > 0))] = np.nan
    return y


def _finite(y: np.ndarray) -> np.ndarray:
    """``y`` with non-finite entries as nan."""
    y = np.asarray(y, dtype=float).copy()
    y[~np.isfinite(y)] = np.nan
    return y


def _xy(h: History, key: str, *, log: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x = h["step"]
    y = h[key]
    keep = np.isfinite(x) & np.isfinite(y)
    if log:
        keep &= (y > 0) & (x > 0)
    return x[keep], y[keep]


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _require(h: History, keys: Sequence[str], what: str) -> None:
    if not any(k in h for k in keys):
        raise ValueError(
            f"{what} needs one of the keys {list(keys)} in the run's records; "
            f"the run has {h.keys()[:20]}{' ...' if len(h.keys()) > 20 else ''}"
        )


def _layers_with(h: History, metric: str) -> list[str]:
    return [n for n in h.layers(metric) if np.isfinite(h[f"{metric}/{n}"]).any()]


def _shade_diffusion(ax: Any, h: History, *, label: bool = True) -> int:
    """Shade the whole-model diffusion spans; returns how many were drawn."""
    n = 0
    if "phase" not in h:
        return 0
    for start, end, phase in phase_spans(h):
        if phase != "diffusion":
            continue
        ax.axvspan(
            start,
            end,
            color=PHASE_COLORS["diffusion"],
            alpha=_DIFFUSION_ALPHA,
            lw=0,
            gid="sgdlens-diffusion",
            label="diffusion (whole model)" if label and n == 0 else None,
        )
        n += 1
    return n


def _mark_model_events(ax: Any, h: History) -> None:
    """Vertical lines at whole-model phase changes (dotted) and loss spikes (red)."""
    for e in h.events:
        step = e.get("step")
        if not isinstance(step, (int, float)):
            continue
        if e.get("event") == "spike":
            ax.axvline(step, color="#d62728", lw=1.0, ls="-", alpha=0.7, gid="sgdlens-spike")
        elif e.get("layer", "") == "" and e.get("event") in PHASE_COLORS:
            ax.axvline(
                step,
                color=PHASE_COLORS[str(e["event"])],
                lw=1.0,
                ls=":",
                gid="sgdlens-model-event",
            )


def _layer_events(h: History, layer: str) -> list[tuple[float, str]]:
    out = []
    for e in h.events:
        step = e.get("step")
        if (
            e.get("layer") == layer
            and e.get("event") in PHASE_COLORS
            and isinstance(step, (int, float))
        ):
            out.append((float(step), str(e["event"])))
    return out


def _mark_layer_events(
    ax: Any, h: History, layer: str, x: np.ndarray, y: np.ndarray, color: Any
) -> int:
    """Markers on a layer's curve at its phase events (▼ to diffusion, ▲ to drift)."""
    events = _layer_events(h, layer)
    if not events or len(x) == 0:
        return 0
    xs = np.array([s for s, _ in events])
    order = np.argsort(x)
    lx, ly = np.log(x[order]), np.log(y[order])
    ys = np.exp(np.interp(np.log(np.maximum(xs, 1e-300)), lx, ly))
    markers = np.array(["v" if new == "diffusion" else "^" for _, new in events])
    for m in ("v", "^"):
        sel = markers == m
        if sel.any():
            ax.scatter(
                xs[sel],
                ys[sel],
                marker=m,
                s=46,
                color=color,
                edgecolors="black",
                linewidths=0.6,
                zorder=5,
                gid="sgdlens-event",
            )
    return len(events)


def _legend_outside(ax: Any, **kwargs: Any) -> None:
    """A legend right of the axes (constrained layout makes room for it)."""
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7.5,
        frameon=False,
        borderaxespad=0.0,
        **kwargs,
    )


def _finish(ax: Any, *, xlabel: str = "step", ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.25)
    if legend and ax.get_legend_handles_labels()[0]:
        _legend_outside(ax)


def pick(names: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``names``, evenly spread, first and last included.

    Example:
        >>> pick([f"h.{i}" for i in range(12)], 4)
        ['h.0', 'h.4', 'h.7', 'h.11']
    """
    if len(names) <= k:
        return list(names)
    idx = np.unique(np.round(np.linspace(0, len(names) - 1, k)).astype(int))
    return [names[i] for i in idx]


def metric_lines(
    ax: Any, h: History, metric: str, names: Sequence[str], *, model: bool = True
) -> None:
    """One curve per layer of ``metric/<layer>`` and, with ``model``, a thick black one for
    the whole model's ``metric`` (when the run has it)."""
    x = h["step"]
    for name, color in zip(names, _colors(len(names))):
        ax.plot(
            x,
            _positive(h[f"{metric}/{name}"]),
            color=color,
            lw=1.4,
            label=name,
            gid="sgdlens-layer",
        )
    if model and metric in h:
        ax.plot(
            x, _positive(h[metric]), color="black", lw=2.2, label="whole model", gid="sgdlens-model"
        )


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around positive steps, halfway on a log axis."""
    lx = np.log(x)
    if len(x) == 1:
        return np.exp([lx[0] - 0.1, lx[0] + 0.1])
    mid = (lx[1:] + lx[:-1]) / 2
    return np.exp(np.concatenate([[2 * lx[0] - mid[0]], mid, [2 * lx[-1] - mid[-1]]]))


def heatmap_axes(
    fig: Figure,
    ax: Any,
    h: History,
    metric: str,
    names: Sequence[str],
    *,
    snr: bool = False,
    label: str = "",
    linear: bool = False,
) -> Any:
    """Draw ``metric/<layer>`` as a layer x step heatmap on ``ax`` (log step axis, log colour
    scale, linear with ``linear``) with the whole model's phase changes as dotted lines; with
    ``snr`` the scale is diverging and centred at 1 and each layer's phase changes are marked
    on its row (▼ into diffusion, ▲ into drift). Returns the mesh."""
    x = h["step"]
    keep = np.isfinite(x) & (x > 0)
    order = np.argsort(x[keep], kind="stable")
    steps = x[keep][order]
    values = _finite if linear else _positive
    z = np.vstack([values(h[f"{metric}/{n}"])[keep][order] for n in names])
    finite = z[np.isfinite(z)]
    cmap: Any
    norm: Any
    if linear:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm, cmap = Normalize(lo, hi if hi > lo else lo + 1.0), matplotlib.colormaps["viridis"]
    elif snr:
        r = float(np.max(np.abs(np.log10(finite)))) if finite.size else 1.0
        r = min(max(r, 0.5), 4.0)
        norm, cmap = LogNorm(10**-r, 10**r), SNR_CMAP
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.1, 10.0)
        norm, cmap = LogNorm(lo, hi if hi > lo else lo * 10), matplotlib.colormaps["viridis"]
    mesh = ax.pcolormesh(
        _edges(steps),
        np.arange(len(names) + 1),
        z,
        norm=norm,
        cmap=cmap,
        shading="flat",
        gid="sgdlens-heatmap",
    )
    ax.set_xscale("log")
    ax.set_ylim(len(names), 0)
    every = max(1, math.ceil(len(names) / 30))
    ax.set_yticks([i + 0.5 for i in range(0, len(names), every)])
    ax.set_yticklabels(names[::every], fontsize=7 if len(names) > 12 else 8)
    row = {n: i for i, n in enumerate(names)}
    for m, new in (("v", "diffusion"), ("^", "drift")) if snr else ():
        pts = [
            (_num(e["step"]), row[str(e["layer"])] + 0.5)
            for e in h.events
            if e.get("event") == new
            and e.get("layer") in row
            and isinstance(e.get("step"), (int, float))
        ]
        if pts:
            ax.scatter(
                *zip(*pts),
                marker=m,
                s=14,
                color="black",
                linewidths=0,
                zorder=5,
                gid="sgdlens-event",
            )
    _mark_model_events(ax, h)
    cbar = fig.colorbar(mesh, ax=ax, label=label or metric, pad=0.01)
    if snr:
        cbar.ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("step")
    return mesh


def layered_figure(
    h: History,
    metric: str,
    names: Sequence[str],
    *,
    title: str,
    ylabel: str,
    snr: bool = False,
    shade: bool = True,
) -> tuple[Figure, Any]:
    """A per-layer metric's figure: lines for up to :data:`MAX_LINES` layers, else a heatmap
    under a panel with the whole model's curve (when the run has it). Returns the figure and
    the axes that holds the whole model's curve (``None`` if there is none)."""
    if len(names) <= MAX_LINES:
        fig, (ax,) = _figure()
        metric_lines(ax, h, metric, names)
        if shade:
            _shade_diffusion(ax, h)
        _mark_model_events(ax, h)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _finish(ax, ylabel=ylabel, title=title)
        return fig, ax
    model = metric in h
    height = min(3.2 + 0.09 * len(names), 9.0) + (1.6 if model else 0.0)
    fig = Figure(figsize=(8.5, height), layout="constrained")
    if model:
        grid = fig.add_gridspec(2, 1, height_ratios=[1.6, height - 1.6])
        top = fig.add_subplot(grid[0])
        heat = fig.add_subplot(grid[1], sharex=top)
        metric_lines(top, h, metric, [])
        if shade:
            _shade_diffusion(top, h, label=False)
        _mark_model_events(top, h)
        top.set_yscale("log")
        _finish(top, xlabel="", ylabel="whole model", title=title)
        top.tick_params(labelbottom=False)
    else:
        top, heat = None, fig.add_subplot(1, 1, 1)
        heat.set_title(title, fontsize=11)
    heatmap_axes(fig, heat, h, metric, names, snr=snr, label=ylabel)
    heat.set_ylabel(f"layer ({len(names)})")
    return fig, top if top is not None else heat
