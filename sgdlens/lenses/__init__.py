"""Per-step, on-device statistics. A lens list is composable: ``lenses=[GradSNR(), GradNorm()]``.

``default()`` is the set a monitor uses when given ``lenses=None``.
"""

from sgdlens.lenses.base import Lens, ParamView, Step
from sgdlens.lenses.batch_snr import BatchSNR
from sgdlens.lenses.grad_norm import GradNorm
from sgdlens.lenses.grad_snr import GradSNR
from sgdlens.lenses.noise_scale import NoiseScale
from sgdlens.lenses.weights import WeightNorms

__all__ = [
    "BatchSNR",
    "GradNorm",
    "GradSNR",
    "Lens",
    "NoiseScale",
    "ParamView",
    "Step",
    "WeightNorms",
    "default",
]


def default() -> list[Lens]:
    """A new default lens list: ``[GradSNR(), WeightNorms(), GradNorm()]``."""
    return [GradSNR(), WeightNorms(), GradNorm()]
