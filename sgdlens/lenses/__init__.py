"""Per-step, on-device statistics. A lens list is composable: ``lenses=[GradSNR(), GradNorm()]``.

Presets are plain lists, cheap to expensive: ``default()`` is the set a monitor uses when
given ``lenses=None`` (at most one copy of the parameters on the device: ``GradSNR``'s window
sum); ``full()`` adds the distance from the attach-time weights, the gradient noise scale and
the within-batch SNR (per-sample hooks on logged steps).
"""

from sgdlens.lenses.base import Key, Lens, ParamView, Step
from sgdlens.lenses.batch_snr import BatchSNR
from sgdlens.lenses.grad_norm import GradNorm
from sgdlens.lenses.grad_snr import GradSNR
from sgdlens.lenses.noise_scale import NoiseScale
from sgdlens.lenses.weights import WeightNorms

__all__ = [
    "BatchSNR",
    "GradNorm",
    "GradSNR",
    "Key",
    "Lens",
    "NoiseScale",
    "ParamView",
    "Step",
    "WeightNorms",
    "default",
    "full",
]


def default() -> list[Lens]:
    """A new default lens list: ``[GradSNR(), WeightNorms(distance=False), GradNorm()]``."""
    return [GradSNR(), WeightNorms(distance=False), GradNorm()]


def full() -> list[Lens]:
    """Every lens: ``[GradSNR(), WeightNorms(), GradNorm(), NoiseScale(), BatchSNR()]``.

    ``NoiseScale`` and ``BatchSNR`` need the model (``PhaseMonitor(model=...)``); the per-sample
    estimators cost most on the steps they read.
    """
    return [GradSNR(), WeightNorms(), GradNorm(), NoiseScale(), BatchSNR()]
