"""Overview figures: which figures a run supports, any per-layer metric as a heatmap, the
phase timeline, and runs overlaid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from sgdlens.plot._base import (
    PHASE_COLORS,
    Run,
    _colors,
    _figure,
    _finish,
    _history,
    _layers_with,
    _legend_outside,
    heatmap_axes,
)
from sgdlens.records import History
from sgdlens.schema import scale_of
from sgdlens.summary import phase_spans

#: Above this many rows the phase timeline is drawn as one coloured grid, not bars.
MAX_BARS = 40


def available(run: Run) -> list[str]:
    """The names of the run figures this run's records support.

    Example:
        >>> available(History([{"step": 1, "grad_snr": 2.0, "loss": 0.3}]))
        ['snr', 'loss']
    """
    h = _history(run)
    keys = set(h.keys())

    def per_layer(metric: str) -> bool:
        return bool(h.layers(metric))

    out = []
    if per_layer("grad_mean") and per_layer("grad_std"):
        out.append("gradient_stats")
    if "grad_snr" in keys or per_layer("grad_snr"):
        out.append("snr")
    if "loss" in keys:
        out.append("loss")
    if "noise_scale" in keys or per_layer("noise_scale"):
        out.append("noise_scale")
    if any(per_layer(m) or m in keys for m in ("weight_norm", "weight_dist")):
        out.append("weights")
    if "sharpness" in keys or "eos_ratio" in keys:
        out.append("sharpness")
    if "phase" in keys or per_layer("phase"):
        out.append("phase_timeline")
    return out


def heatmap(run: Run, metric: str = "grad_snr", *, layers: Sequence[str] | None = None) -> Figure:
    """Any per-layer metric as a layer x step heatmap (one row per layer, first at the top).

    Log step axis; the colour scale is the metric's scale in the run's schema
    (:mod:`sgdlens.schema`; without one, ``"snr"`` for ``grad_snr`` and ``batch_snr``, else
    ``"log"``): log, linear, or for an SNR diverging and centred at 1 (blue below: diffusion,
    orange above: drift) with each layer's phase changes marked on its row (▼ into diffusion,
    ▲ into drift; gid ``sgdlens-event``). The whole model's phase changes are dotted vertical
    lines. Readable at hundreds of layers.

    Args:
        run: a History or a JSONL path.
        metric: the metric whose ``<metric>/<layer>`` keys to draw.
        layers: the rows (default: every layer with the metric).

    Example:
        >>> from sgdlens.records import History
        >>> h = History([{"step": s, **{f"grad_snr/l{i}": 2.0 / (i + 1) for i in range(30)}}
        ...              for s in (1, 2, 4)])
        >>> [c.get_gid() for c in heatmap(h).axes[0].collections]
        ['sgdlens-heatmap']
    """
    h = _history(run)
    names = list(layers) if layers is not None else _layers_with(h, metric)
    if not names:
        raise ValueError(f"heatmap needs '{metric}/<layer>' keys in the records; the run has none")
    fig = Figure(figsize=(8.5, min(2.4 + 0.09 * len(names), 9.0)), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    scale = scale_of(h.header, metric)
    heatmap_axes(fig, ax, h, metric, names, snr=scale == "snr", linear=scale == "linear")
    ax.set_title(f"{metric} per layer", fontsize=11)
    ax.set_ylabel(f"layer ({len(names)})")
    return fig


def phase_timeline(run: Run) -> Figure:
    """The phase of the whole model (top row) and of each layer over steps, as coloured bars.

    Warm-up grey, drift orange, diffusion blue (bars' gid ``sgdlens-phase-<phase>``); a dot
    marks each phase change. Log step axis, like the other figures. Past :data:`MAX_BARS`
    rows the phases are one coloured grid (gid ``sgdlens-phase-grid``) with thinned labels.

    Example:
        >>> from sgdlens.records import History
        >>> spans = [(1, "warmup"), (5, "drift"), (9, "diffusion")]
        >>> h = History([{"step": s, "phase": p} for s, p in spans])
        >>> [t.get_text() for t in phase_timeline(h).axes[0].get_yticklabels()]
        ['whole model']
    """
    h = _history(run)
    rows = [("whole model", "phase")] if "phase" in h else []
    rows += [(n, f"phase/{n}") for n in h.layers("phase")]
    if not rows:
        raise ValueError("phase_timeline needs 'phase' or 'phase/<layer>' keys in the records")
    if len(rows) > MAX_BARS:
        return _phase_grid(h, rows)
    fig, (ax,) = _figure(8.0, 0.9 + 0.42 * len(rows))
    steps = h["step"]
    finite = steps[np.isfinite(steps) & (steps > 0)]
    end = float(finite.max()) if finite.size else 1.0
    for i, (_label, key) in enumerate(rows):
        y = len(rows) - 1 - i
        spans = phase_spans(h, key)
        for j, (start, stop, phase) in enumerate(spans):
            stop = stop if j < len(spans) - 1 else max(stop, end)
            width = max(stop - start, 0.0)
            ax.broken_barh(
                [(start, width)],
                (y - 0.38, 0.76),
                facecolors=PHASE_COLORS.get(phase, "#999999"),
                gid=f"sgdlens-phase-{phase}",
            )
            if j > 0:
                ax.plot([start], [y], "o", ms=4, color="black", gid="sgdlens-event")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    if finite.size and finite.min() > 0:
        ax.set_xscale("log")
    from matplotlib.patches import Patch

    _legend_outside(ax, handles=[Patch(color=c, label=p) for p, c in PHASE_COLORS.items()])
    ax.set_xlabel("step")
    ax.set_title("Phase per layer", fontsize=11)
    return fig


def compare(
    runs: Sequence[Run],
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> Figure:
    """Runs overlaid, one panel per whole-model metric (first run solid, others dashed).

    Args:
        runs: two or more runs.
        labels: a label per run (default ``A``, ``B``, …).
        metrics: whole-model keys to draw (default: whichever of ``loss``, ``grad_snr``,
            ``grad_mean``, ``grad_std``, ``noise_scale``, ``weight_dist``, ``sharpness`` any run
            has). Each run's whole-model phase changes are dotted vertical lines in its colour.

    Example:
        >>> from sgdlens.records import History
        >>> a = History([{"step": s, "loss": 1.0 / s} for s in (1, 2)])
        >>> b = History([{"step": s, "loss": 2.0 / s} for s in (1, 2)])
        >>> len(compare([a, b]).axes[0].lines)
        2
    """
    hs = [_history(r) for r in runs]
    if len(hs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(hs)}")
    labels = list(labels) if labels is not None else [chr(ord("A") + i) for i in range(len(hs))]
    if len(labels) != len(hs):
        raise ValueError(f"compare: {len(labels)} labels for {len(hs)} runs")
    default = (
        "loss",
        "grad_snr",
        "grad_mean",
        "grad_std",
        "noise_scale",
        "weight_dist",
        "sharpness",
    )
    keys = list(metrics) if metrics is not None else [m for m in default if any(m in h for h in hs)]
    if not keys:
        raise ValueError(f"compare: the runs share none of the metrics {list(default)}")
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    colors = _colors(len(hs))
    styles = ["-", "--", ":", "-."]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        positive = True
        for h, label, color, style in zip(hs, labels, colors, styles * len(hs)):
            if key not in h:
                continue
            y = h[key]
            positive &= bool(np.all(y[np.isfinite(y)] > 0))
            ax.plot(h["step"], y, color=color, ls=style, lw=1.6, label=label, gid="sgdlens-run")
            for e in h.events:
                if e.get("layer", "") == "" and e.get("event") in ("drift", "diffusion"):
                    step = e.get("step")
                    if isinstance(step, (int, float)):
                        ax.axvline(step, color=color, ls=":", lw=1, gid="sgdlens-model-event")
        ax.set_xscale("log")
        if positive:
            ax.set_yscale("log")
        _finish(ax, ylabel=key, title=key, legend=i == 0)
    return fig


def _phase_grid(h: History, rows: list[tuple[str, str]]) -> Figure:
    """The phase timeline of many rows as one categorical grid."""
    from matplotlib.patches import Patch

    x = h["step"]
    keep = np.isfinite(x) & (x > 0)
    order = np.argsort(x[keep], kind="stable")
    steps = x[keep][order]
    code = {p: i for i, p in enumerate(PHASE_COLORS)}
    z = np.full((len(rows), len(steps)), np.nan)
    for i, (_, key) in enumerate(rows):
        col = [v for v, k in zip(h.column(key), keep) if k]
        z[i] = [code.get(str(col[j]), np.nan) if col[j] is not None else np.nan for j in order]
    from sgdlens.plot._base import _edges

    fig = Figure(figsize=(8.5, 9.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap(list(PHASE_COLORS.values()))
    ax.pcolormesh(
        _edges(steps),
        np.arange(len(rows) + 1),
        z,
        cmap=cmap,
        vmin=-0.5,
        vmax=2.5,
        shading="flat",
        gid="sgdlens-phase-grid",
    )
    ax.set_xscale("log")
    ax.set_ylim(len(rows), 0)
    every = max(1, math.ceil(len(rows) / 30))
    ax.set_yticks([i + 0.5 for i in range(0, len(rows), every)])
    ax.set_yticklabels([label for label, _ in rows][::every], fontsize=7)
    _legend_outside(ax, handles=[Patch(color=c, label=p) for p, c in PHASE_COLORS.items()])
    ax.set_xlabel("step")
    ax.set_title(f"Phase per layer ({len(rows) - ('phase' in h)} layers)", fontsize=11)
    return fig
