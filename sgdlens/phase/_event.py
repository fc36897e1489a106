"""The phase names and the event a phase detector reports."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DIFFUSION", "DRIFT", "PHASES", "SPIKE", "WARMUP", "PhaseEvent"]

WARMUP = "warmup"
DRIFT = "drift"
DIFFUSION = "diffusion"
SPIKE = "spike"
PHASES = (WARMUP, DRIFT, DIFFUSION)


@dataclass(frozen=True)
class PhaseEvent:
    """One change of phase, a loss spike, or a decision logged by a scheduler.

    Attributes:
        step: the record's ``step`` (optimizer steps seen so far).
        layer: the layer name, or ``""`` for the whole model.
        old: the phase before (``"warmup"``, ``"drift"`` or ``"diffusion"``).
        new: the phase after, or ``"spike"`` for a loss spike (which is an event, not a phase:
            after it the phase is unchanged unless the spike kicks it back to drift, which is
            a separate event). :class:`sgdlens.schedulers.PhaseLR` logs ``"lr_decay"``.
        evidence: the numbers behind the event (see :class:`PhaseDetector`).

    Example:
        >>> PhaseEvent(350, "fc1", "drift", "diffusion", {"snr": 0.6}).new
        'diffusion'
    """

    step: int
    layer: str
    old: str
    new: str
    evidence: dict[str, float]
