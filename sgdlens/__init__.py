"""sgdlens: see where your optimizer is."""

from sgdlens.records import History, load

__all__ = ["History", "load"]
__version__ = "0.1.0.dev0"
