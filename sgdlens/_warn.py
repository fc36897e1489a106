"""Warnings that point at the user's line, however deep in hooks they are raised."""

from __future__ import annotations

import sys
import warnings
from types import FrameType

#: packages whose frames are never the user's line: this one, torch (its optimizer step runs
#: the monitor's hooks, its autograd engine the per-sample ones) and the trainers that call
#: both (a warning raised under ``trainer.fit(...)`` points at that call)
INTERNAL = (
    "sgdlens",
    "torch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside :data:`INTERNAL` packages (the training
    loop's ``optimizer.step()``, ``loss.backward()`` or ``trainer.fit(...)`` line), so the
    filters and the location the user sees are those of their own code."""
    level = 2  # stacklevel 2: warn()'s caller
    frame = sys._getframe(1)
    up: FrameType | None = frame.f_back
    while _internal(frame.f_globals.get("__name__", "")) and up is not None:
        level, frame, up = level + 1, up, up.f_back  # (a hook on another thread: its top)
    warnings.warn(message, category, stacklevel=level)


def _internal(module: str) -> bool:
    return module.split(".", 1)[0] in INTERNAL
