"""sgdlens: see where your optimizer is.

``from sgdlens import PhaseMonitor`` and add one line to a training loop; see the README.
"""

from sgdlens import lenses, sinks
from sgdlens.monitor import PhaseMonitor
from sgdlens.records import History, Record, load

__all__ = ["History", "PhaseMonitor", "Record", "lenses", "load", "sinks"]
__version__ = "0.1.0.dev0"
