"""Argument checks of :class:`~sgdlens.phase.PhaseDetector` (clear errors at construction)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["KICKS", "check_config"]

KICKS = ("none", "global", "all")


def _int(name: str, value: object, low: int, example: int, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"PhaseDetector({name}={value!r}): {name} must be an int, got "
            f"{type(value).__name__}; pass a whole number of {unit}, e.g. {name}={example}"
        )
    if value < low:
        raise ValueError(
            f"PhaseDetector({name}={value!r}): {name} must be >= {low} {unit}; "
            f"pass e.g. {name}={example}"
        )
    return value


def _positive(name: str, value: object, example: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"PhaseDetector({name}={value!r}): {name} must be a real number, got "
            f"{type(value).__name__}; pass e.g. {name}={example}"
        )
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"PhaseDetector({name}={value!r}): {name} must be finite and > 0; "
            f"pass e.g. {name}={example}"
        )
    return v


def check_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The checked configuration, or a TypeError/ValueError naming the argument and a fix."""
    out: dict[str, Any] = {
        "enter_diffusion": _positive("enter_diffusion", cfg["enter_diffusion"], 0.8),
        "enter_drift": _positive("enter_drift", cfg["enter_drift"], 1.25),
    }
    if not out["enter_drift"] > out["enter_diffusion"]:
        raise ValueError(
            f"PhaseDetector(enter_diffusion={cfg['enter_diffusion']!r}, "
            f"enter_drift={cfg['enter_drift']!r}): enter_drift must be greater than "
            "enter_diffusion (the hysteresis band); pass e.g. enter_diffusion=0.8, "
            "enter_drift=1.25"
        )
    out["window"] = _int("window", cfg["window"], 1, 250, "optimizer steps")
    out["dwell"] = _int("dwell", cfg["dwell"], 0, 100, "optimizer steps")
    out["warmup"] = _int("warmup", cfg["warmup"], 0, 250, "optimizer steps")
    out["spike_threshold"] = _positive("spike_threshold", cfg["spike_threshold"], 10.0)
    out["spike_window"] = _int("spike_window", cfg["spike_window"], 1, 2500, "optimizer steps")
    kick = cfg["spike_kick"]
    if not isinstance(kick, str):
        raise TypeError(
            f"PhaseDetector(spike_kick={kick!r}): spike_kick must be a str, got "
            f"{type(kick).__name__}; pass one of {KICKS}"
        )
    if kick not in KICKS:
        raise ValueError(f"PhaseDetector(spike_kick={kick!r}): pass one of {KICKS}")
    out["spike_kick"] = kick
    out["motion_window"] = _int("motion_window", cfg["motion_window"], 3, 8, "records")
    signal = cfg["signal"]
    if not isinstance(signal, str):
        raise TypeError(
            f"PhaseDetector(signal={signal!r}): signal must be a str (a record key), got "
            f"{type(signal).__name__}; pass e.g. signal='grad_snr'"
        )
    if not signal or "/" in signal:
        raise ValueError(
            f"PhaseDetector(signal={signal!r}): signal must be a non-empty metric name "
            "without '/'; pass e.g. signal='grad_snr'"
        )
    out["signal"] = signal
    return out
