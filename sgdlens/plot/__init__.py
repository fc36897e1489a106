"""Matplotlib figures of a run and of probe results (``pip install "sgdlens[plot]"``).

Every function takes a run, as a :class:`~sgdlens.records.History` or the path of a JSONL
file (the last run in the file; pick another with :func:`sgdlens.load`), or a probe result, and
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
:func:`heatmap`            any per-layer metric as a layer x step heatmap
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

Per-layer figures draw one line per layer up to ``MAX_LINES`` (10) layers, legends right of
the axes; past that they draw a layer x step heatmap (SNR on a log colour scale centred at 1,
phase changes marked), so a run of hundreds of layers stays readable. ``gradient_stats`` draws
at most ``MAX_PAIRS`` (6) layers, evenly spread. A run longer than ``MAX_POINTS`` (4000)
records is drawn from that many, spaced evenly in log index (:func:`thin`).

Artists carry ``gid`` tags (``"sgdlens-diffusion"`` on shaded diffusion spans,
``"sgdlens-event"`` on event markers, ``"sgdlens-mean"``/``"sgdlens-std"`` on the gradient
curves, …) so that code and tests can find them.

Example:
    >>> from sgdlens import plot
    >>> fig = plot.gradient_stats("runs/demo.jsonl")  # doctest: +SKIP
    >>> fig.savefig("tishby.png")  # doctest: +SKIP
"""

from __future__ import annotations

try:
    import matplotlib  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f'sgdlens.plot needs matplotlib: pip install "sgdlens[plot]" ({e})') from e

from sgdlens.plot._base import MAX_LINES, MAX_POINTS, PHASE_COLORS, SNR_CMAP, thin
from sgdlens.plot.layers import available, compare, heatmap, phase_timeline
from sgdlens.plot.probes import interpolation, landscape
from sgdlens.plot.training import (
    MAX_PAIRS,
    gradient_stats,
    loss,
    noise_scale,
    sharpness,
    snr,
    weights,
)

__all__ = [
    "MAX_LINES",
    "MAX_PAIRS",
    "MAX_POINTS",
    "PHASE_COLORS",
    "SNR_CMAP",
    "available",
    "compare",
    "gradient_stats",
    "heatmap",
    "interpolation",
    "landscape",
    "loss",
    "noise_scale",
    "phase_timeline",
    "sharpness",
    "snr",
    "thin",
    "weights",
]
