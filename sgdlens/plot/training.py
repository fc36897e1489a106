"""Figures of training metrics over steps: gradients, SNR, loss, noise scale, weights,
sharpness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sgdlens.plot._base import (
    MAX_LINES,
    PHASE_COLORS,
    Run,
    _colors,
    _figure,
    _finish,
    _history,
    _layers_with,
    _legend_outside,
    _mark_layer_events,
    _mark_model_events,
    _num,
    _positive,
    _require,
    _shade_diffusion,
    heatmap_axes,
    layered_figure,
    metric_lines,
    pick,
)
from sgdlens.summary import phase_spans

#: gradient_stats draws two curves per layer, for at most this many layers.
MAX_PAIRS = 6


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
    its standard deviation ``grad_std/<l>`` dashed (see docs/science.md). A run with more
    than :data:`MAX_PAIRS` layers shows that many, evenly spread from first to last (the SNR
    heatmap shows them all). Where the mean lies above
    the std the layer drifts; below, it diffuses. The whole model's diffusion spans (from the
    ``phase`` column) are shaded, each layer's phase events are marked on its mean curve
    (▼ into diffusion, ▲ into drift), whole-model changes are dotted vertical lines and loss
    spikes red ones.

    Args:
        run: a History or a JSONL path.
        layers: the layers to draw (default: every layer with both keys, at most
            :data:`MAX_PAIRS` of them).
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
    every = [n for n in _layers_with(h, "grad_mean") if f"grad_std/{n}" in h]
    names = list(layers) if layers is not None else pick(every, MAX_PAIRS)
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
    shown = f" ({len(names)} of {len(every)} layers)" if len(names) < len(every) else ""
    _finish(
        ax,
        ylabel=f"gradient norm {unit}".strip(),
        title=f"Gradient mean (solid) and std (dashed) per layer{shown}",
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
    _legend_outside(ax, handles=handles)
    return fig


def snr(run: Run, *, layers: Sequence[str] | None = None, shade: bool = True) -> Figure:
    """Gradient SNR per layer (``grad_snr/<l>``) and for the whole model (``grad_snr``, black).

    Log-log axes, a horizontal line at SNR = 1 (gid ``sgdlens-snr1``), diffusion spans shaded.
    With more than :data:`MAX_LINES` layers the layers are a layer x step heatmap (gid
    ``sgdlens-heatmap``) on a log colour scale centred at 1 (blue: diffusion, orange: drift),
    each layer's phase changes marked, under a panel with the whole model's SNR.

    Example:
        >>> from sgdlens.records import History
        >>> fig = snr(History([{"step": s, "grad_snr": 5.0 / s} for s in (1, 10, 100)]))
        >>> fig.axes[0].get_yscale()
        'log'
    """
    h = _history(run)
    names = list(layers) if layers is not None else _layers_with(h, "grad_snr")
    _require(h, ["grad_snr", *[f"grad_snr/{n}" for n in names]], "snr")
    title = "Gradient signal-to-noise ratio"
    fig, ax = layered_figure(
        h, "grad_snr", names, title=title, ylabel="gradient SNR", snr=True, shade=shade
    )
    if ax is not None and len(names) <= MAX_LINES:
        ax.set_ylabel("gradient SNR (mean / std)")
    ax.axhline(1.0, color="grey", lw=1, ls="--", gid="sgdlens-snr1")
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
    (SNR² ≈ B / B_simple, see docs/science.md). More than :data:`MAX_LINES`
    layers are drawn as a heatmap, as in :func:`snr`.

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
    names = list(layers) if layers is not None else _layers_with(h, "noise_scale")
    ylabel = "B_simple = tr Σ / |G|²"
    fig, ax = layered_figure(
        h, "noise_scale", names, title="Gradient noise scale", ylabel=ylabel, shade=shade
    )
    if "noise_scale" in h and "batch_over_noise_scale" in h:
        b = h["noise_scale"] * h["batch_over_noise_scale"]
        b = b[np.isfinite(b) & (b > 0)]
        if b.size:
            ax.axhline(
                float(np.median(b)),
                color="grey",
                ls="--",
                lw=1,
                label="batch size B",
                gid="sgdlens-batch",
            )
            _legend_outside(ax)
    return fig


def weights(run: Run, *, layers: Sequence[str] | None = None, shade: bool = True) -> Figure:
    """Weight norms, distance from initialisation and update ratio, one panel each.

    Panels for whichever of ``weight_norm/<l>``, ``weight_dist/<l>`` (log-log: slope 1 is
    ballistic drift, ½ a random walk; see docs/science.md) and ``update_ratio/<l>`` the run has.

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
    many = layers is None and max(len(_layers_with(h, m)) for m, _, _ in panels) > MAX_LINES
    fig, axes = _figure(5.0 * len(panels), 4.4 if not many else 6.5, ncols=len(panels))
    for ax, (metric, title, ylabel) in zip(axes, panels):
        names = list(layers) if layers is not None else _layers_with(h, metric)
        if many:
            heatmap_axes(fig, ax, h, metric, names, label=ylabel)
            ax.set_title(title, fontsize=11)
            continue
        metric_lines(ax, h, metric, names, model=False)
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
