"""Loss-spike detection over a window of optimizer steps, with hysteresis."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from sgdlens.phase._stats import relative_change, robust_z

__all__ = ["LossSpikes"]

MIN_LOSSES = 5  # a median and a MAD need a few values


class LossSpikes:
    """Recent losses by step; says when a loss jumps far above them.

    A loss is tested once the history spans half the window (``window / 2`` steps since the
    first loss) and holds at least 5 losses. It is a spike when its robust z against the losses
    of the last ``window`` steps exceeds ``threshold``; the next spike needs a loss back under
    half the threshold first (a jump to a level that stays is reported once).

    Args:
        threshold: robust standard deviations that make a spike.
        window: optimizer steps of loss history.

    Example:
        >>> spikes = LossSpikes(threshold=10.0, window=100)
        >>> [spikes.update(10 * i, 1.0 + 0.01 * (i % 3)) for i in range(1, 8)][-1] is None
        True
        >>> round(spikes.update(80, 5.0)["robust_z"])
        269
    """

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = threshold
        self.window = window
        self.losses: deque[tuple[float, float]] = deque()  # (step, loss)
        self.first: float | None = None  # step of the first loss ever seen
        self.spiking = False

    def evidence(self, loss: float | None) -> dict[str, float]:
        """``loss`` and ``loss_change`` (older → newer half of the held losses), if known."""
        ev: dict[str, float] = {}
        if loss is not None:
            ev["loss"] = loss
        change = relative_change([v for _, v in self.losses])
        if change is not None:
            ev["loss_change"] = change
        return ev

    def update(self, step: float, loss: float) -> dict[str, float] | None:
        """Take one loss; return the spike's evidence if it is a new spike, else ``None``."""
        found: dict[str, float] | None = None
        if self.first is None:
            self.first = step
        if len(self.losses) >= MIN_LOSSES and step - self.first >= self.window / 2:
            z, med, scale = robust_z([v for _, v in self.losses], loss)
            if z > self.threshold:
                if not self.spiking:
                    self.spiking = True
                    found = {
                        "loss": loss,
                        "loss_median": med,
                        "loss_scale": scale,
                        "robust_z": z,
                        "threshold": self.threshold,
                    }
            elif z < self.threshold / 2:
                self.spiking = False
        self.losses.append((step, loss))
        while self.losses[0][0] <= step - self.window:
            self.losses.popleft()
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": [[t, v] for t, v in self.losses],
            "first": self.first,
            "spiking": self.spiking,
        }

    def load(self, d: Mapping[str, Any]) -> None:
        self.losses = deque((float(t), float(v)) for t, v in d["losses"])
        self.first = None if d["first"] is None else float(d["first"])
        self.spiking = bool(d["spiking"])
