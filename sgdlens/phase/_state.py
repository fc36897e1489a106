"""Serialisation of a phase detector's state: plain JSON-able Python types, versioned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sgdlens.phase._event import PhaseEvent

__all__ = ["STATE_VERSION", "check_version", "event_from_dict", "event_to_dict"]

STATE_VERSION = 2  # 1: time constants counted in records (sgdlens < 0.1 development builds)


def event_to_dict(e: PhaseEvent) -> dict[str, Any]:
    return {
        "step": e.step,
        "layer": e.layer,
        "old": e.old,
        "new": e.new,
        "evidence": dict(e.evidence),
    }


def event_from_dict(d: Mapping[str, Any]) -> PhaseEvent:
    return PhaseEvent(
        int(d["step"]),
        str(d["layer"]),
        str(d["old"]),
        str(d["new"]),
        {str(k): float(v) for k, v in d["evidence"].items()},
    )


def check_version(state: object) -> Mapping[str, Any]:
    """``state`` if it is a detector state this version reads; else a clear error."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"PhaseDetector.load_state_dict: expected the dict from state_dict(), got "
            f"{type(state).__name__}"
        )
    version = state.get("version")
    if version == 1:
        raise ValueError(
            "PhaseDetector.load_state_dict: this state (version 1) comes from a detector "
            "whose window, dwell and warmup counted records; this sgdlens counts optimizer "
            "steps (version 2) and cannot convert it. Start the detector afresh: drop the "
            "'detector' entry from the monitor's checkpoint, or build a new PhaseDetector "
            "and replay the saved records through update()"
        )
    if version != STATE_VERSION:
        raise ValueError(
            f"PhaseDetector.load_state_dict: unknown state version {version!r} (this sgdlens "
            f"reads version {STATE_VERSION}); pass the dict returned by "
            "PhaseDetector.state_dict()"
        )
    return state
