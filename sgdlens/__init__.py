"""sgdlens: see where your optimizer is.

``from sgdlens import PhaseMonitor`` and add one line to a training loop; see the README.
"""

from sgdlens import datasets, lenses, probes, sinks
from sgdlens.layers import Layers
from sgdlens.monitor import PhaseMonitor
from sgdlens.phase import PhaseDetector, PhaseEvent
from sgdlens.records import History, Record, load, runs

__all__ = [
    "History",
    "Layers",
    "PhaseDetector",
    "PhaseEvent",
    "PhaseMonitor",
    "Record",
    "datasets",
    "lenses",
    "load",
    "probes",
    "runs",
    "sinks",
]
__version__ = "0.1.0.dev0"
