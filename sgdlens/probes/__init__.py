"""Occasional loss-surface measurements: curvature, interpolation, landscapes, flatness.

One calling convention everywhere: ``loss_fn(model, batch) -> scalar tensor``, and ``data`` is one
batch or an iterable of batches whose losses are averaged with equal weight per batch (see
:class:`Batches`). Every probe runs inside :func:`preserved`, so the model (and its gradients,
buffers, RNG state and train/eval flags) is bit-for-bit unchanged afterwards, on return or
exception; losses at other weights are evaluated with ``torch.func.functional_call``.

=========================  =========================================================
probe                      cost (per batch of ``data``)
=========================  =========================================================
:func:`hvp`                1 forward + 2 backward (finite-difference fallback: 2 + 2)
:func:`sharpness`          one HVP per Lanczos iteration (``result.hvps``, ~10-20)
:func:`hessian_trace`      ``samples`` HVPs
:func:`interpolate`        ``steps`` forwards (x2 with a metric)
:func:`landscape_1d`       ``steps`` forwards
:func:`landscape_2d`       ``nx * ny`` forwards (vmapped in chunks)
:func:`flatness`           ~15 forwards per direction
:func:`align`              weights: a few linear assignments per group; activations: 2 forwards
=========================  =========================================================

Second-order probes need double backward; where a kernel lacks it (fused attention on CPU) they
retry under the math attention kernel and then fall back to finite differences, and say so.
"""

from sgdlens.probes._common import Batches
from sgdlens.probes.align import align
from sgdlens.probes.directions import random_direction
from sgdlens.probes.eos import eos_ratio, eos_threshold
from sgdlens.probes.flatness import FlatnessResult, flatness
from sgdlens.probes.hvp import HVPResult, hvp
from sgdlens.probes.interpolate import BasinVerdict, InterpolationResult, basin_test, interpolate
from sgdlens.probes.planes import landscape_plane, landscape_trajectory
from sgdlens.probes.restore import preserved
from sgdlens.probes.scheduled import Probe, barrier_probe, sharpness_probe, trace_probe
from sgdlens.probes.sharpness import SharpnessResult, sharpness
from sgdlens.probes.slices import Landscape1D, Landscape2D, landscape_1d, landscape_2d
from sgdlens.probes.trace import TraceResult, hessian_trace

__all__ = [
    "BasinVerdict",
    "Batches",
    "FlatnessResult",
    "HVPResult",
    "InterpolationResult",
    "Landscape1D",
    "Landscape2D",
    "Probe",
    "SharpnessResult",
    "TraceResult",
    "align",
    "barrier_probe",
    "basin_test",
    "eos_ratio",
    "eos_threshold",
    "flatness",
    "hessian_trace",
    "hvp",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "landscape_plane",
    "landscape_trajectory",
    "preserved",
    "random_direction",
    "sharpness",
    "sharpness_probe",
    "trace_probe",
]
