"""The per-layer state machine: ``warmup → drift ⇄ diffusion`` over a window of steps."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sgdlens.phase._event import DIFFUSION, DRIFT, PHASES, WARMUP

__all__ = ["Channel", "Rule", "Switch"]


@dataclass(frozen=True)
class Rule:
    """The thresholds and time constants (in optimizer steps) of the state machine."""

    enter_diffusion: float
    enter_drift: float
    window: int
    dwell: int
    warmup: int

    @property
    def centre(self) -> float:
        """Geometric centre of the band: decides the first phase after warm-up."""
        return (self.enter_diffusion * self.enter_drift) ** 0.5


@dataclass(frozen=True)
class Switch:
    """A switch the rule decided: the new phase and the numbers behind it."""

    new: str
    median: float
    threshold: float
    steps: float  # steps the median stayed beyond the threshold (warm-up: steps of SNR seen)


class Channel:
    """State of one layer (or of the whole model): phase, SNR window, motion evidence."""

    def __init__(self, motion_window: int) -> None:
        self.phase = WARMUP
        self.snr: deque[tuple[float, float]] = deque()  # (step, SNR) of the last window steps
        self.first: float | None = None  # step of the first SNR value
        self.since: float | None = None  # step since which the median lies beyond the exit
        self.last_snr: float | None = None
        self.motion: deque[tuple[float, float]] = deque(maxlen=motion_window)
        self.dist: float | None = None
        self.path = 0.0
        self.path_step = 0.0
        self.noise: float | None = None  # last B / B_simple (NoiseScale), evidence only

    def add(self, rule: Rule, step: float, snr: float, frozen: bool) -> Switch | None:
        """Take one SNR value at ``step``; return the switch it decides, if any.

        ``frozen``: the phase was just switched by a loss spike; the value is recorded but no
        second switch is made on the same record.
        """
        self.snr.append((step, snr))
        while self.snr[0][0] <= step - rule.window:
            self.snr.popleft()
        self.last_snr = snr
        if self.first is None:
            self.first = step
        values = sorted(v for _, v in self.snr)
        if frozen:
            return None
        if self.phase == WARMUP:
            seen = step - self.first
            if snr > rule.enter_drift:  # the SNR shows drift: report it, however short
                return Switch(DRIFT, values[(len(values) - 1) // 2], rule.enter_drift, seen)
            if step >= rule.warmup:
                m = values[(len(values) - 1) // 2]
                return Switch(DRIFT if m >= rule.centre else DIFFUSION, m, rule.centre, seen)
            return None
        # At least half the window's values must lie beyond the threshold: the lower median
        # towards diffusion, the upper median towards drift.
        if self.phase == DRIFT:
            m, thr, target = values[(len(values) - 1) // 2], rule.enter_diffusion, DIFFUSION
            beyond = m < thr
        else:
            m, thr, target = values[len(values) // 2], rule.enter_drift, DRIFT
            beyond = m > thr
        if not beyond:
            self.since = None
            return None
        if self.since is None:
            self.since = step
        if step - self.since >= rule.dwell:
            return Switch(target, m, thr, step - self.since)
        return None

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.since = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "snr": [[t, v] for t, v in self.snr],
            "first": self.first,
            "since": self.since,
            "last_snr": self.last_snr,
            "motion": [[t, d] for t, d in self.motion],
            "dist": self.dist,
            "path": self.path,
            "path_step": self.path_step,
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], motion_window: int) -> Channel:
        ch = cls(motion_window)
        if d["phase"] not in PHASES:
            raise ValueError(f"load_state_dict: unknown phase {d['phase']!r} in the state")
        ch.phase = str(d["phase"])
        ch.snr.extend((float(t), float(v)) for t, v in d["snr"])
        ch.first = _opt_float(d["first"])
        ch.since = _opt_float(d["since"])
        ch.last_snr = _opt_float(d["last_snr"])
        ch.motion.extend((float(t), float(v)) for t, v in d["motion"])
        ch.dist = _opt_float(d["dist"])
        ch.path = float(d["path"])
        ch.path_step = float(d["path_step"])
        ch.noise = _opt_float(d["noise"])
        return ch


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)
