"""Matplotlib figures of a run and of probe results (``pip install "sgdlens[plot]"``).

Every function takes a run, as a :class:`~sgdlens.records.History` or the path of a JSONL
file (the last run in the file, see :func:`sgdlens.report.split_runs`), or a probe result, and
returns a new :class:`matplotlib.figure.Figure`. Figures are built without ``pyplot``, so no
GUI backend is touched and nothing accumulates in pyplot's figure list: save one with
``fig.savefig("snr.png")`` (Agg renders it), or show it in a notebook by leaving it as the
cell's value.

=========================  ===================================================
function                   shows (keys read)
=========================  ===================================================
:func:`gradient_stats`     Shwartz-Ziv & Tishby's figure: per-layer ‖mean g‖ and std,
                           log-log, diffusion shaded, events marked
                           (``grad_mean/<l>``, ``grad_std/<l>``, ``phase``)
:func:`snr`                gradient SNR and the SNR = 1 line (``grad_snr[/<l>]``)
:func:`loss`               the loss, spikes marked (``loss``)
:func:`noise_scale`        noise scale B_simple and the batch size (``noise_scale[/<l>]``)
:func:`weights`            weight norms, distance from init, update ratio
                           (``weight_norm/<l>``, ``weight_dist/<l>``, ``update_ratio/<l>``)
:func:`sharpness`          sharpness and the edge-of-stability threshold
                           (``sharpness``, ``eos_threshold`` or ``eos_ratio``)
:func:`phase_timeline`     phase of each layer over steps (``phase[/<l>]``)
:func:`compare`            runs overlaid (whole-model keys)
:func:`interpolation`      1-D interpolation curves with the barrier (``InterpolationResult``)
:func:`landscape`          2-D contours with the projected trajectory (``Landscape2D``)
=========================  ===================================================

Artists carry ``gid`` tags (``"sgdlens-diffusion"`` on shaded diffusion spans,
``"sgdlens-event"`` on event markers, ``"sgdlens-mean"``/``"sgdlens-std"`` on the gradient
curves, …) so that code and tests can find them.

Example:
    >>> from sgdlens import plot
    >>> fig = plot.gradient_stats("runs/demo.jsonl")  # doctest: +SKIP
    >>> fig.savefig("tishby.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    import matplotlib
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f'sgdlens.plot needs matplotlib: pip install "sgdlens[plot]" ({e})') from e

from sgdlens.records import History
from sgdlens.report import phase_spans

__all__ = [
    "available",
    "compare",
    "gradient_stats",
    "interpolation",
    "landscape",
    "loss",
    "noise_scale",
    "phase_timeline",
    "sharpness",
    "snr",
    "weights",
]

Run = History | str | os.PathLike[str]

#: Colours of the phases (timeline bars; diffusion also shades the other figures).
PHASE_COLORS = {"warmup": "#bdbdbd", "drift": "#f28e2b", "diffusion": "#4e79a7"}
_DIFFUSION_ALPHA = 0.13


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _history(run: Run) -> History:
    if isinstance(run, History):
        return run
    from sgdlens.records import group_runs, read_records

    runs = group_runs(read_records(run)[0])
    if not runs:
        raise ValueError(f"{os.fspath(run)} holds no records")
    if len(runs) > 1:
        warnings.warn(
            f"{os.fspath(run)} holds {len(runs)} runs; plotting the last "
            f"(pick one with sgdlens.load(path, run=i))",
            stacklevel=3,
        )
    return runs[-1]


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


def _metric_lines(
    ax: Any, h: History, metric: str, layers: Sequence[str] | None, *, model: bool = True
) -> None:
    """One curve per layer of ``metric/<layer>`` and, with ``model``, a thick black one for
    the whole model's ``metric`` (when the run has it)."""
    names = list(layers) if layers is not None else _layers_with(h, metric)
    x = h["step"]
    for name, color in zip(names, _colors(len(names))):
        ax.plot(x, _positive(h[f"{metric}/{name}"]), color=color, lw=1.4, label=name,
                gid="sgdlens-layer")  # fmt: skip
    if model and metric in h:
        ax.plot(x, _positive(h[metric]), color="black", lw=2.2, label="whole model",
                gid="sgdlens-model")  # fmt: skip


def _finish(ax: Any, *, xlabel: str = "step", ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.25)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, ncol=2, loc="best", framealpha=0.85)


# --------------------------------------------------------------------------------------------
# Run figures
# --------------------------------------------------------------------------------------------


def available(run: Run) -> list[str]:
    """The names of the run figures this run's records support.

    Example:
        >>> available(History([{"step": 1, "grad_snr": 2.0, "loss": 0.3}]))
        ['snr', 'loss']
    """
    h = _history(run)
    keys = set(h.keys())

    def per_layer(metric: str) -> bool:
        return any(k.startswith(metric + "/") for k in keys)

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


def gradient_stats(
    run: Run,
    *,
    layers: Sequence[str] | None = None,
    normalize: bool = False,
    shade: bool = True,
    events: bool = True,
) -> Figure:
    """Shwartz-Ziv & Tishby's figure: per-layer gradient mean and std over steps, log-log.

    One colour per layer; the norm of the window's mean gradient ``grad_mean/<l>`` solid,
    its standard deviation ``grad_std/<l>`` dashed (SCIENCE §A1). Where the mean lies above
    the std the layer drifts; below, it diffuses. The whole model's diffusion spans (from the
    ``phase`` column) are shaded, each layer's phase events are marked on its mean curve
    (▼ into diffusion, ▲ into drift), whole-model changes are dotted vertical lines and loss
    spikes red ones.

    Args:
        run: a History or a JSONL path.
        layers: the layers to draw (default: every layer with both keys).
        normalize: divide both by the layer's ``weight_norm/<l>``, as the paper's figure does
            (the SNR is unchanged).
        shade: shade the whole model's diffusion spans.
        events: mark phase events and spikes.

    Returns:
        The figure (one axes; 2 lines per layer, gids ``sgdlens-mean`` and ``sgdlens-std``).

    Raises:
        ValueError: the run has no ``grad_mean/<l>`` and ``grad_std/<l>`` keys.

    Example:
        >>> from sgdlens.records import History
        >>> h = History(
        ...     [{"step": s, "grad_mean/fc1": 1 / s, "grad_std/fc1": 0.1} for s in (1, 10, 100)]
        ... )
        >>> fig = gradient_stats(h)
        >>> [line.get_gid() for line in fig.axes[0].lines]
        ['sgdlens-mean', 'sgdlens-std']
    """
    h = _history(run)
    names = (
        list(layers)
        if layers is not None
        else [n for n in _layers_with(h, "grad_mean") if f"grad_std/{n}" in h]
    )
    if not names:
        raise ValueError(
            "gradient_stats needs per-layer 'grad_mean/<layer>' and 'grad_std/<layer>' keys "
            "(the GradSNR lens logs them); the run has none"
        )
    fig, (ax,) = _figure(8.0, 5.0)
    for name, color in zip(names, _colors(len(names))):
        mean, std = h[f"grad_mean/{name}"], h[f"grad_std/{name}"]
        if normalize:
            if f"weight_norm/{name}" not in h:
                raise ValueError(f"normalize=True needs 'weight_norm/{name}' in the records")
            wn = h[f"weight_norm/{name}"]
            mean, std = mean / wn, std / wn
        x = h["step"]
        m, s = _positive(mean), _positive(std)
        ax.plot(x, m, color=color, lw=1.8, label=f"{name} mean", gid="sgdlens-mean")
        ax.plot(x, s, color=color, lw=1.4, ls="--", label=f"{name} std", gid="sgdlens-std")
        if events:
            ok = np.isfinite(x) & np.isfinite(m) & (x > 0)
            _mark_layer_events(ax, h, name, x[ok], m[ok], color)
    if shade:
        _shade_diffusion(ax, h)
    if events:
        _mark_model_events(ax, h)
    ax.set_xscale("log")
    ax.set_yscale("log")
    unit = "/ ‖W‖" if normalize else ""
    _finish(
        ax,
        ylabel=f"gradient norm {unit}".strip(),
        title="Gradient mean (solid) and std (dashed) per layer",
        legend=False,
    )
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], color=c, lw=2, label=n) for n, c in zip(names, _colors(len(names)))
    ]
    handles += [
        Line2D([], [], color="black", lw=1.8, label="mean ‖ḡ‖"),
        Line2D([], [], color="black", lw=1.4, ls="--", label="std"),
    ]
    if shade and any(p == "diffusion" for _, _, p in phase_spans(h)):
        handles.append(Patch(color=PHASE_COLORS["diffusion"], alpha=0.3, label="diffusion"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def snr(run: Run, *, layers: Sequence[str] | None = None, shade: bool = True) -> Figure:
    """Gradient SNR per layer (``grad_snr/<l>``) and for the whole model (``grad_snr``, black).

    Log-log axes, a horizontal line at SNR = 1 (gid ``sgdlens-snr1``), diffusion spans shaded.

    Example:
        >>> from sgdlens.records import History
        >>> fig = snr(History([{"step": s, "grad_snr": 5.0 / s} for s in (1, 10, 100)]))
        >>> fig.axes[0].get_yscale()
        'log'
    """
    h = _history(run)
    _require(h, ["grad_snr", *[f"grad_snr/{n}" for n in h.layers("grad_snr")]], "snr")
    fig, (ax,) = _figure()
    _metric_lines(ax, h, "grad_snr", layers)
    ax.axhline(1.0, color="grey", lw=1, ls="--", gid="sgdlens-snr1")
    if shade:
        _shade_diffusion(ax, h)
    _mark_model_events(ax, h)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(ax, ylabel="gradient SNR (mean / std)", title="Gradient signal-to-noise ratio")
    return fig


def loss(run: Run, *, shade: bool = True) -> Figure:
    """The ``loss`` column over steps (log x; log y when positive), spikes marked ×.

    Example:
        >>> from sgdlens.records import History
        >>> fig = loss(History([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]))
        >>> fig.axes[0].get_ylabel()
        'loss'
    """
    h = _history(run)
    _require(h, ["loss"], "loss")
    fig, (ax,) = _figure()
    x, y = h["step"], h["loss"]
    positive = bool(np.all(y[np.isfinite(y)] > 0))
    ax.plot(x, y, color="black", lw=1.5, label="loss", gid="sgdlens-loss")
    sp = [
        e for e in h.events if e.get("event") == "spike" and isinstance(e.get("step"), (int, float))
    ]
    if sp:
        sx = np.array([float(e["step"]) for e in sp if isinstance(e["step"], (int, float))])
        sy = np.array([_num(e.get("evidence/loss")) for e in sp])
        ok = np.isfinite(x) & np.isfinite(y)
        missing = ~np.isfinite(sy)
        sy[missing] = np.interp(sx[missing], x[ok], y[ok]) if ok.any() else np.nan
        ax.scatter(
            sx,
            sy,
            marker="x",
            s=60,
            color="#d62728",
            zorder=5,
            label="loss spike",
            gid="sgdlens-event",
        )
    if shade:
        _shade_diffusion(ax, h)
    ax.set_xscale("log")
    if positive:
        ax.set_yscale("log")
    _finish(ax, ylabel="loss", title="Training loss")
    return fig


def noise_scale(run: Run, *, layers: Sequence[str] | None = None, shade: bool = True) -> Figure:
    """Gradient noise scale ``B_simple`` (``noise_scale/<l>``, ``noise_scale``) over steps.

    When the run logs ``batch_over_noise_scale`` the batch size ``B`` is drawn as a dashed
    line (gid ``sgdlens-batch``): above it, the minibatch gradient is mostly noise
    (SNR² ≈ B / B_simple, SCIENCE §0.4).

    Example:
        >>> from sgdlens.records import History
        >>> fig = noise_scale(History([{"step": s, "noise_scale": 10.0 * s} for s in (1, 2)]))
        >>> len(fig.axes[0].lines)
        1
    """
    h = _history(run)
    _require(
        h, ["noise_scale", *[f"noise_scale/{n}" for n in h.layers("noise_scale")]], "noise_scale"
    )
    fig, (ax,) = _figure()
    _metric_lines(ax, h, "noise_scale", layers)
    if "noise_scale" in h and "batch_over_noise_scale" in h:
        b = h["noise_scale"] * h["batch_over_noise_scale"]
        b = b[np.isfinite(b) & (b > 0)]
        if b.size:
            ax.axhline(float(np.median(b)), color="grey", ls="--", lw=1, label="batch size B",
                       gid="sgdlens-batch")  # fmt: skip
    if shade:
        _shade_diffusion(ax, h)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(ax, ylabel="B_simple = tr Σ / |G|²", title="Gradient noise scale")
    return fig


def weights(run: Run, *, layers: Sequence[str] | None = None, shade: bool = True) -> Figure:
    """Weight norms, distance from initialisation and update ratio, one panel each.

    Panels for whichever of ``weight_norm/<l>``, ``weight_dist/<l>`` (log-log: slope 1 is
    ballistic drift, ½ a random walk, SCIENCE §A5) and ``update_ratio/<l>`` the run has.

    Example:
        >>> from sgdlens.records import History
        >>> h = History([{"step": s, "weight_norm/fc1": 1.0, "weight_dist/fc1": 0.1 * s}
        ...              for s in (1, 2)])
        >>> fig = weights(h)
        >>> [ax.get_title() for ax in fig.axes]
        ['Weight norm', 'Distance from init']
    """
    h = _history(run)
    panels = [
        (m, t, y)
        for m, t, y in (
            ("weight_norm", "Weight norm", "‖W‖"),
            ("weight_dist", "Distance from init", "‖W − W₀‖"),  # noqa: RUF001
            ("update_ratio", "Update ratio", "‖ΔW‖ / ‖W‖"),
        )
        if _layers_with(h, m)
    ]
    if not panels:
        raise ValueError(
            "weights needs 'weight_norm/<layer>', 'weight_dist/<layer>' or "
            "'update_ratio/<layer>' keys (the WeightNorms lens logs them); the run has none"
        )
    fig, axes = _figure(5.0 * len(panels), 4.4, ncols=len(panels))
    for ax, (metric, title, ylabel) in zip(axes, panels):
        _metric_lines(ax, h, metric, layers, model=False)
        if shade:
            _shade_diffusion(ax, h, label=False)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _finish(ax, ylabel=ylabel, title=title, legend=ax is axes[0])
    return fig


def sharpness(run: Run, *, threshold: float | None = None, shade: bool = True) -> Figure:
    """Sharpness over steps against the edge-of-stability threshold (2/η for plain GD).

    Reads ``sharpness`` and the threshold from ``eos_threshold``, or from
    ``sharpness / eos_ratio``, or from ``threshold=`` (e.g. ``2 / lr``; see
    :func:`sgdlens.probes.eos_threshold` for momentum and Adam). The threshold is a dashed
    line (gid ``sgdlens-eos``). A run with only ``eos_ratio`` is drawn as the ratio against 1.

    Args:
        run: a History or a JSONL path.
        threshold: a fixed threshold to draw when the records carry none.
        shade: shade the whole model's diffusion spans.

    Example:
        >>> from sgdlens.records import History
        >>> h = History([{"step": s, "sharpness": 10.0 * s, "eos_threshold": 40.0}
        ...              for s in (1, 2, 4)])
        >>> [line.get_gid() for line in sharpness(h).axes[0].lines]
        ['sgdlens-sharpness', 'sgdlens-eos']
    """
    h = _history(run)
    _require(h, ["sharpness", "eos_ratio"], "sharpness")
    fig, (ax,) = _figure()
    x = h["step"]
    if "sharpness" in h:
        s = h["sharpness"]
        ax.plot(
            x,
            s,
            color="black",
            lw=1.8,
            marker=".",
            label="sharpness λ_max",
            gid="sgdlens-sharpness",
        )
        if "eos_threshold" in h:
            thr = h["eos_threshold"]
        elif "eos_ratio" in h:
            thr = s / h["eos_ratio"]
        elif threshold is not None:
            thr = np.full_like(s, float(threshold))
        else:
            thr = None
        if thr is not None:
            ax.plot(
                x,
                thr,
                color="#d62728",
                ls="--",
                lw=1.5,
                label="EoS threshold (2/η)",
                gid="sgdlens-eos",
            )
        ylabel = "top Hessian eigenvalue"
    else:
        ax.plot(
            x,
            h["eos_ratio"],
            color="black",
            lw=1.8,
            marker=".",
            label="sharpness / threshold",
            gid="sgdlens-sharpness",
        )
        ax.axhline(
            1.0, color="#d62728", ls="--", lw=1.5, label="edge of stability", gid="sgdlens-eos"
        )
        ylabel = "sharpness / EoS threshold"
    if shade:
        _shade_diffusion(ax, h)
    ax.set_xscale("log")
    _finish(ax, ylabel=ylabel, title="Sharpness and the edge of stability")
    return fig


def phase_timeline(run: Run) -> Figure:
    """The phase of the whole model (top row) and of each layer over steps, as coloured bars.

    Warm-up grey, drift orange, diffusion blue (bars' gid ``sgdlens-phase-<phase>``); a dot
    marks each phase change. Log step axis, like the other figures.

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

    ax.legend(
        handles=[Patch(color=c, label=p) for p, c in PHASE_COLORS.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
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


# --------------------------------------------------------------------------------------------
# Probe figures
# --------------------------------------------------------------------------------------------


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
    SCIENCE §A4; ≤ 0 inside one convex basin).

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
