"""Online drift/diffusion phase detection from log-point records (pure Python).

Shwartz-Ziv & Tishby (2017) describe two phases of SGD: *drift*, where the mean gradient
dominates its minibatch noise (gradient SNR ≫ 1), and *diffusion*, where noise dominates
(SNR < 1). Saxe et al. (2018) show the transition is generic (ReLU, linear nets) and not tied
to compression, so sgdlens reports the SNR regime only, not an information-theoretic claim.
A large learning rate near convergence knocks a run back out of its basin (Smith & Topin
2017), so the detector also goes back from diffusion to drift, and treats a loss spike as
evidence for that.

:class:`PhaseDetector` reads the flat records the monitor produces at log points and keeps a
small state machine per layer and for the whole model. It needs no torch: everything here is
stdlib arithmetic on numbers already on the host. The rule and every default are documented on
the class; ``docs/phases.md`` gives the science and the measured properties.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PhaseDetector",
    "PhaseEvent",
    "displacement_exponent",
    "robust_z",
]

WARMUP = "warmup"
DRIFT = "drift"
DIFFUSION = "diffusion"
SPIKE = "spike"
_KICKS = ("none", "global", "all")
_STATE_VERSION = 1
_MAD_TO_STD = 1.4826  # MAD × 1.4826 estimates the std of a normal distribution
_Z_CAP = 1e300  # keeps robust z finite (JSON-able) when the loss history is constant


@dataclass(frozen=True)
class PhaseEvent:
    """One change of phase, or a loss spike.

    Attributes:
        step: the record's ``step`` (optimizer steps seen so far).
        layer: the layer name, or ``""`` for the whole model.
        old: the phase before (``"warmup"``, ``"drift"`` or ``"diffusion"``).
        new: the phase after, or ``"spike"`` for a loss spike (which is an event, not a phase:
            after it the phase is unchanged unless the spike kicks it back to drift, which is
            a separate event).
        evidence: the numbers behind the event (see :class:`PhaseDetector`).
    """

    step: int
    layer: str
    old: str
    new: str
    evidence: dict[str, float]


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def _number(x: object) -> float | None:
    """``x`` as a finite float, or ``None`` for anything else (nan, inf, str, bool, None)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    y = float(x)
    return y if math.isfinite(y) else None


def _usable(x: object) -> bool:
    """Whether ``x`` is a usable SNR value: a finite number >= 0."""
    y = _number(x)
    return y is not None and y >= 0.0


def displacement_exponent(points: Iterable[tuple[float, float]]) -> float | None:
    """Local exponent ``c`` of ``‖w_t − w_0‖ ∝ t^c``: least-squares slope in log-log space.

    ``c ≈ 1`` is ballistic motion (drift), ``½`` a random walk (diffusion), ``< ½``
    sub-diffusion (SCIENCE.md §A5).

    Args:
        points: ``(t, distance)`` pairs; pairs with ``t <= 0`` or ``distance <= 0`` (or
            non-finite) are ignored.

    Returns:
        The slope, or ``None`` with fewer than 3 usable points or all at one ``t``.

    Example:
        >>> round(displacement_exponent([(1, 2.0), (4, 4.0), (16, 8.0)]), 6)
        0.5
    """
    xs: list[float] = []
    ys: list[float] = []
    for t, d in points:
        if t > 0 and d > 0 and math.isfinite(t) and math.isfinite(d):
            xs.append(math.log(t))
            ys.append(math.log(d))
    if len(xs) < 3:
        return None
    mx = math.fsum(xs) / len(xs)
    my = math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0:
        return None
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def robust_z(history: Sequence[float], x: float) -> tuple[float, float, float]:
    """How far ``x`` lies above ``history``, in robust standard deviations.

    ``z = (x − median) / (1.4826 · MAD)``; the scale is floored at ``1e-9 · |median|`` (and at
    the smallest positive float) so a constant history gives a large, finite ``z``.

    Args:
        history: recent finite values (at least one).
        x: the new value.

    Returns:
        ``(z, median, scale)``. ``z`` is capped at ``1e300``.

    Example:
        >>> robust_z([1.0, 2.0, 3.0, 4.0, 5.0], 13.0)[0] > 5
        True
    """
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = max(_MAD_TO_STD * mad, 1e-9 * abs(med), 5e-324)
    z = (x - med) / scale
    return (min(z, _Z_CAP) if z == z else 0.0), med, scale


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class _Channel:
    """State of one layer (or of the whole model): phase, SNR window, motion history."""

    def __init__(self, window: int, motion_window: int) -> None:
        self.phase = WARMUP
        self.seen = 0  # finite SNR values seen
        self.pending = 0  # consecutive records whose median lies beyond the exit threshold
        self.snr: deque[float] = deque(maxlen=window)
        self.last_snr: float | None = None
        self.motion: deque[tuple[float, float]] = deque(maxlen=motion_window)
        self.dist: float | None = None
        self.path = 0.0
        self.path_step = 0.0
        self.noise: float | None = None  # last B / B_simple (NoiseScale), evidence only

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "seen": self.seen,
            "pending": self.pending,
            "snr": list(self.snr),
            "last_snr": self.last_snr,
            "motion": [[t, d] for t, d in self.motion],
            "dist": self.dist,
            "path": self.path,
            "path_step": self.path_step,
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], window: int, motion_window: int) -> _Channel:
        ch = cls(window, motion_window)
        if d["phase"] not in (WARMUP, DRIFT, DIFFUSION):
            raise ValueError(f"load_state_dict: unknown phase {d['phase']!r} in the state")
        ch.phase = str(d["phase"])
        ch.seen = int(d["seen"])
        ch.pending = int(d["pending"])
        ch.snr.extend(float(v) for v in d["snr"])
        ch.last_snr = None if d["last_snr"] is None else float(d["last_snr"])
        ch.motion.extend((float(t), float(v)) for t, v in d["motion"])
        ch.dist = None if d["dist"] is None else float(d["dist"])
        ch.path = float(d["path"])
        ch.path_step = float(d["path_step"])
        noise = d.get("noise")
        ch.noise = None if noise is None else float(noise)
        return ch


def _check_int(name: str, value: object, low: int, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"PhaseDetector({name}={value!r}): {name} must be an int, got "
            f"{type(value).__name__}; pass a whole number of records, e.g. {name}={example}"
        )
    if value < low:
        raise ValueError(
            f"PhaseDetector({name}={value!r}): {name} must be >= {low}; pass e.g. {name}={example}"
        )
    return value


def _check_float(name: str, value: object, example: float) -> float:
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


class PhaseDetector:
    """Per-layer and whole-model drift/diffusion phases from gradient SNR, with hysteresis.

    Feed it one record per log point with :meth:`update`; read :attr:`phase` (whole model),
    :attr:`phases` (per layer) and :attr:`events`. Each layer, and the whole model, runs the
    state machine ``warmup → drift ⇄ diffusion`` (a layer may also enter ``diffusion``
    straight from warmup).

    **What it reads.** From each record: ``step``; ``<signal>/<layer>`` (default
    ``grad_snr/<layer>``) for each layer and ``<signal>`` for the whole model; optionally
    ``weight_dist[/<layer>]`` (‖w_t − w_0‖), ``update_size[/<layer>]`` (norm of one step's
    update) and ``loss``. A layer exists from the first record with a usable
    ``<signal>/<layer>`` value. Missing keys, non-numbers, bools, nan/inf and negative SNR,
    distance or update values are skipped exactly as if the key were absent.

    **The rule** (SNR decides; everything else is evidence, except the loss-spike kick). Per
    layer, on every record that carries a finite SNR value:

    1. ``m`` = median of the last ``window`` SNR values (the lower median while fewer are
       held; the same as exp of the median of log SNR).
    2. ``warmup``: after ``warmup`` values, enter ``drift`` if
       ``m >= sqrt(enter_diffusion · enter_drift)`` (the band's geometric centre, 1.0 at the
       defaults), else ``diffusion``.
    3. ``drift → diffusion`` once ``m < enter_diffusion`` on ``dwell`` consecutive SNR
       records; ``diffusion → drift`` once ``m > enter_drift`` on ``dwell`` consecutive SNR
       records. A record whose median is not beyond the threshold resets the count; a
       record without a usable value leaves it as is. So phases alternate and any two
       SNR-driven switches of one layer are at least ``dwell`` SNR records apart.
    4. Loss spike (when records carry ``loss``): once the loss window is half full
       (``(spike_window + 1) // 2`` finite losses, 25 at the defaults), a loss more than
       ``spike_threshold`` robust standard deviations above the median of the last
       ``spike_window`` losses (``(loss − median) / (1.4826 · MAD)``) is a ``spike``
       event (``layer=""``). It is reported once: no further spike until a loss falls
       back under half the threshold (hysteresis: a jump to a level that stays is reported
       once, while the window slowly takes in the new level and its spread). A spike resets
       every drift count towards diffusion and, with ``spike_kick="global"`` (the default),
       switches the whole-model phase from ``diffusion`` to ``drift`` at once (``"all"``:
       every layer too; ``"none"``: no switch); a kicked phase makes no second switch on that
       record, and goes back to diffusion by rule 3 if the SNR stays low. This is Smith &
       Topin's kick: long learning-rate cycles raise the loss without always lifting a
       one-epoch SNR above 1.

    **Delay and false alarms** (Hypothesis-tested in ``tests/test_phase.py``; rates measured
    in ``docs/phases.md``). If the SNR records before a change of level lie on the old side
    of the band centre and every record from the change on lies beyond the far threshold,
    the switch comes exactly ``(window − 1) // 2 + dwell − 1`` SNR records after the
    change: **4 records at the defaults**. A layer never leaves its phase while its median
    stays on its side of the far threshold. With log-normal noise of log-sd σ around a
    level on or outside the band edge, no event follows the entry in 10,000 records when
    σ ≤ δ/4, where δ is the log-distance from the level to the far threshold (0.446 at the
    band edge); the first phase is right when σ ≤ δ_c/4, δ_c the log-distance from the
    level to the band centre (0.223 at the band edge).

    **Evidence.** Phase events carry ``snr`` (this record's value), ``snr_median`` (``m``),
    ``threshold`` (the one crossed) and ``records`` (the dwell count); when available
    ``motion_exponent`` (least-squares slope of log ``weight_dist`` against log ``step``
    over the last ``motion_window`` records: ≈1 ballistic drift, ≤½ diffusion),
    ``net_to_path`` (``weight_dist`` over the path length ``Σ update_size · Δstep``
    accumulated since step 0, an estimate because ``update_size`` is sampled at log
    points), ``batch_over_noise_scale`` (the last ``B / B_simple`` a
    :class:`~sgdlens.lenses.NoiseScale` lens logged for the layer: about the within-batch
    SNR², below 1 where noise dominates), ``loss`` and ``loss_change`` (relative change of
    the median loss between the
    older and newer half of the loss window; negative while the loss falls). Spike events
    carry ``loss``, ``loss_median``, ``loss_scale`` (1.4826 · MAD), ``robust_z`` and
    ``threshold``.

    Args:
        enter_diffusion: SNR below which a layer in drift starts counting towards diffusion.
            0.8: the transition is SNR = 1 (SCIENCE.md §A1), with a band around it.
        enter_drift: SNR above which a layer in diffusion starts counting towards drift.
            1.25 = 1/0.8, so the band is symmetric in log SNR around 1 (SCIENCE.md §A6).
        window: number of recent SNR values whose median is compared (odd). 5: robust to
            two outliers in any five records, adds 2 records of delay.
        dwell: consecutive records the median must stay beyond a threshold before a switch,
            the minimum time between switches. 3: catches SNR excursions that last about
            5 records (an LR kick lifts SNR for a few to a few dozen epochs, SCIENCE.md §A7).
        warmup: SNR values seen before a layer enters its first phase. 5 (= ``window``): the
            first decision uses a full window.
        spike_threshold: robust standard deviations that make a loss jump a spike. 10: a
            Smith & Topin kick multiplies the loss by 10–40; Gaussian noise gave no spike in
            10^6 records, heavy-tailed noise about one per 1,000 (``docs/phases.md``).
        spike_window: losses whose median and MAD define the recent level. 50.
        spike_kick: what a spike switches from ``diffusion`` to ``drift``: ``"global"`` (the
            whole-model phase), ``"all"`` (also every layer) or ``"none"``.
        motion_window: records in the log-log fit of ``weight_dist``. 8.
        signal: the metric whose per-layer values (``"<signal>/<layer>"``) and whole-model
            value (``"<signal>"``) drive the phases. ``"grad_snr"``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names the argument, the value
            and a valid choice).

    Example:
        >>> import random
        >>> rng = random.Random(0)
        >>> det = PhaseDetector()
        >>> for i in range(60):
        ...     level = 3.0 if i < 30 else 0.3  # drift, then diffusion from record 30 on
        ...     snr = level * math.exp(rng.gauss(0.0, 0.1))
        ...     events = det.update({"step": 10 * i, "grad_snr/fc1": snr, "grad_snr": snr})
        >>> [(e.step, e.layer, e.old, e.new) for e in det.events]  # doctest: +NORMALIZE_WHITESPACE
        [(40, 'fc1', 'warmup', 'drift'), (40, '', 'warmup', 'drift'),
         (340, 'fc1', 'drift', 'diffusion'), (340, '', 'drift', 'diffusion')]
        >>> det.phase, det.phases
        ('diffusion', {'fc1': 'diffusion'})
        >>> det.annotate({})
        {'phase': 'diffusion', 'phase/fc1': 'diffusion'}
    """

    def __init__(
        self,
        *,
        enter_diffusion: float = 0.8,
        enter_drift: float = 1.25,
        window: int = 5,
        dwell: int = 3,
        warmup: int = 5,
        spike_threshold: float = 10.0,
        spike_window: int = 50,
        spike_kick: str = "global",
        motion_window: int = 8,
        signal: str = "grad_snr",
    ) -> None:
        self._configure(
            {
                "enter_diffusion": enter_diffusion,
                "enter_drift": enter_drift,
                "window": window,
                "dwell": dwell,
                "warmup": warmup,
                "spike_threshold": spike_threshold,
                "spike_window": spike_window,
                "spike_kick": spike_kick,
                "motion_window": motion_window,
                "signal": signal,
            }
        )
        self._reset()

    # -- configuration ------------------------------------------------------------------------

    def _configure(self, cfg: Mapping[str, Any]) -> None:
        self.enter_diffusion = _check_float("enter_diffusion", cfg["enter_diffusion"], 0.8)
        self.enter_drift = _check_float("enter_drift", cfg["enter_drift"], 1.25)
        if not self.enter_drift > self.enter_diffusion:
            raise ValueError(
                f"PhaseDetector(enter_diffusion={cfg['enter_diffusion']!r}, "
                f"enter_drift={cfg['enter_drift']!r}): enter_drift must be greater than "
                "enter_diffusion (the hysteresis band); pass e.g. enter_diffusion=0.8, "
                "enter_drift=1.25"
            )
        self.window = _check_int("window", cfg["window"], 1, 5)
        if self.window % 2 == 0:
            raise ValueError(
                f"PhaseDetector(window={self.window!r}): window must be odd so that the "
                f"median is one of the values; pass e.g. window={self.window + 1}"
            )
        self.dwell = _check_int("dwell", cfg["dwell"], 1, 3)
        self.warmup = _check_int("warmup", cfg["warmup"], 1, 5)
        self.spike_threshold = _check_float("spike_threshold", cfg["spike_threshold"], 10.0)
        self.spike_window = _check_int("spike_window", cfg["spike_window"], 5, 50)
        kick = cfg["spike_kick"]
        if not isinstance(kick, str):
            raise TypeError(
                f"PhaseDetector(spike_kick={kick!r}): spike_kick must be a str, got "
                f"{type(kick).__name__}; pass one of {_KICKS}"
            )
        if kick not in _KICKS:
            raise ValueError(f"PhaseDetector(spike_kick={kick!r}): pass one of {_KICKS}")
        self.spike_kick = kick
        self.motion_window = _check_int("motion_window", cfg["motion_window"], 3, 8)
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
        self.signal = signal
        # Geometric centre of the band: decides the first phase after warmup.
        self._centre = math.sqrt(self.enter_diffusion * self.enter_drift)

    def _config(self) -> dict[str, Any]:
        return {
            "enter_diffusion": self.enter_diffusion,
            "enter_drift": self.enter_drift,
            "window": self.window,
            "dwell": self.dwell,
            "warmup": self.warmup,
            "spike_threshold": self.spike_threshold,
            "spike_window": self.spike_window,
            "spike_kick": self.spike_kick,
            "motion_window": self.motion_window,
            "signal": self.signal,
        }

    def _reset(self) -> None:
        self._global = _Channel(self.window, self.motion_window)
        self._layers: dict[str, _Channel] = {}
        self._events: list[PhaseEvent] = []
        self._losses: deque[float] = deque(maxlen=self.spike_window)
        self._spiking = False
        self._step = 0

    # -- public state -------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """The whole-model phase: ``"warmup"``, ``"drift"`` or ``"diffusion"``."""
        return self._global.phase

    @property
    def phases(self) -> dict[str, str]:
        """The phase of every layer seen so far, by layer name (whole model excluded)."""
        return {name: ch.phase for name, ch in self._layers.items()}

    @property
    def events(self) -> list[PhaseEvent]:
        """Every event so far, in order (a copy)."""
        return list(self._events)

    def annotate(self, record: Mapping[str, object] | None = None) -> dict[str, str]:
        """The phase keys to add to a record: ``{"phase": ..., "phase/<layer>": ...}``.

        Covers every layer seen so far plus any layer that ``record`` names (``"warmup"``
        until it has been updated). Does not change the state.
        """
        out = {"phase": self._global.phase}
        for name, ch in self._layers.items():
            out["phase/" + name] = ch.phase
        if record is not None:
            for name in self._layer_names(record):
                out.setdefault("phase/" + name, WARMUP)
        return out

    # -- update -------------------------------------------------------------------------------

    def _layer_names(self, record: Mapping[str, object]) -> list[str]:
        prefix = self.signal + "/"
        n = len(prefix)
        return [k[n:] for k in record if isinstance(k, str) and k.startswith(prefix) and k[n:]]

    def update(self, record: Mapping[str, object]) -> list[PhaseEvent]:
        """Read one record; return the events it raised, in order.

        Order within a record: a loss spike and the switches it kicks, then the layer
        switches (layers in order of first appearance), then the whole-model switch. A layer kicked
        by the spike makes no second switch on the same record.
        """
        if not isinstance(record, Mapping):
            raise TypeError(
                f"PhaseDetector.update(record): expected a mapping such as "
                f"{{'step': 10, 'grad_snr': 1.3}}, got {type(record).__name__}"
            )
        step = _number(record.get("step"))
        if step is not None:
            self._step = int(step)
        new: list[PhaseEvent] = []
        loss = _number(record.get("loss"))
        loss_evidence = self._loss_evidence(loss)
        kicked: set[str] = set()
        if loss is not None:
            kicked = self._update_loss(loss, new)
        for name in self._layer_names(record):  # a layer exists once it has a usable value
            if name not in self._layers and _usable(record[self.signal + "/" + name]):
                self._layers[name] = _Channel(self.window, self.motion_window)
        for name, ch in self._layers.items():
            self._update_channel(ch, name, "/" + name, record, loss_evidence, new, name in kicked)
        self._update_channel(self._global, "", "", record, loss_evidence, new, "" in kicked)
        self._events.extend(new)
        return new

    def _loss_evidence(self, loss: float | None) -> dict[str, float]:
        ev: dict[str, float] = {}
        if loss is not None:
            ev["loss"] = loss
        n = len(self._losses)
        if n >= 4:
            old = list(self._losses)[: n // 2]
            recent = list(self._losses)[n // 2 :]
            m_old = statistics.median(old)
            if m_old != 0.0:
                ev["loss_change"] = (statistics.median(recent) - m_old) / abs(m_old)
        return ev

    def _update_channel(
        self,
        ch: _Channel,
        layer: str,
        suffix: str,
        record: Mapping[str, object],
        loss_evidence: Mapping[str, float],
        out: list[PhaseEvent],
        kicked: bool,
    ) -> None:
        step = float(self._step)
        # Weight-motion evidence: never decides, always kept up to date.
        dist = _number(record.get("weight_dist" + suffix))
        if dist is not None and dist >= 0.0:
            ch.dist = dist
            if not ch.motion or step > ch.motion[-1][0]:
                ch.motion.append((step, dist))
        noise = _number(record.get("batch_over_noise_scale" + suffix))
        if noise is not None:
            ch.noise = noise
        upd = _number(record.get("update_size" + suffix))
        if upd is not None and upd >= 0.0 and step > ch.path_step:
            ch.path += upd * (step - ch.path_step)
            ch.path_step = step

        snr = _number(record.get(self.signal + suffix))
        if snr is None or not _usable(snr):
            return
        ch.snr.append(snr)
        ch.last_snr = snr
        ch.seen += 1
        m = statistics.median_low(ch.snr)
        if kicked:  # switched by a loss spike on this very record: no second switch
            return
        if ch.phase == WARMUP:
            if ch.seen >= self.warmup:
                target = DRIFT if m >= self._centre else DIFFUSION
                self._switch(ch, layer, target, m, self._centre, loss_evidence, out)
            return
        if ch.phase == DRIFT:
            beyond, target, thr = m < self.enter_diffusion, DIFFUSION, self.enter_diffusion
        else:
            beyond, target, thr = m > self.enter_drift, DRIFT, self.enter_drift
        ch.pending = ch.pending + 1 if beyond else 0
        if ch.pending >= self.dwell:
            self._switch(ch, layer, target, m, thr, loss_evidence, out)

    def _motion_evidence(self, ch: _Channel) -> dict[str, float]:
        ev: dict[str, float] = {}
        c = displacement_exponent(ch.motion)
        if c is not None:
            ev["motion_exponent"] = c
        if ch.dist is not None and ch.path > 0.0:
            ev["net_to_path"] = ch.dist / ch.path
        if ch.noise is not None:  # B / B_simple ≈ the minibatch SNR² (SCIENCE.md §A2)
            ev["batch_over_noise_scale"] = ch.noise
        return ev

    def _switch(
        self,
        ch: _Channel,
        layer: str,
        target: str,
        m: float,
        thr: float,
        loss_evidence: Mapping[str, float],
        out: list[PhaseEvent],
    ) -> None:
        ev: dict[str, float] = {
            "snr": ch.last_snr if ch.last_snr is not None else m,
            "snr_median": m,
            "threshold": thr,
            "records": float(ch.pending if ch.phase != WARMUP else ch.seen),
        }
        ev.update(self._motion_evidence(ch))
        ev.update(loss_evidence)
        out.append(PhaseEvent(self._step, layer, ch.phase, target, ev))
        ch.phase = target
        ch.pending = 0

    def _update_loss(self, loss: float, out: list[PhaseEvent]) -> set[str]:
        kicked: set[str] = set()
        if len(self._losses) >= (self.spike_window + 1) // 2:
            z, med, scale = robust_z(self._losses, loss)
            if z > self.spike_threshold:
                if not self._spiking:
                    self._spiking = True
                    kicked = self._spike(loss, z, med, scale, out)
            elif z < self.spike_threshold / 2:
                self._spiking = False
        self._losses.append(loss)
        return kicked

    def _spike(
        self, loss: float, z: float, med: float, scale: float, out: list[PhaseEvent]
    ) -> set[str]:
        ev = {
            "loss": loss,
            "loss_median": med,
            "loss_scale": scale,
            "robust_z": z,
            "threshold": self.spike_threshold,
        }
        out.append(PhaseEvent(self._step, "", self._global.phase, SPIKE, dict(ev)))
        targets: list[tuple[str, _Channel]] = []
        if self.spike_kick in ("global", "all"):
            targets.append(("", self._global))
        if self.spike_kick == "all":
            targets.extend(self._layers.items())
        kicked: set[str] = set()
        for ch in [self._global, *self._layers.values()]:
            if ch.phase == DRIFT:
                ch.pending = 0  # a spike is evidence against leaving drift
        for layer, ch in targets:
            if ch.phase == DIFFUSION:
                kicked.add(layer)
                kick_ev = dict(ev)
                kick_ev.update(self._motion_evidence(ch))
                if ch.last_snr is not None:
                    kick_ev["snr"] = ch.last_snr
                out.append(PhaseEvent(self._step, layer, DIFFUSION, DRIFT, kick_ev))
                ch.phase = DRIFT
                ch.pending = 0
        return kicked

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The detector's configuration and state as plain JSON-able Python types.

        Safe for ``torch.save`` / ``torch.load(weights_only=True)`` and for ``json.dumps``
        (every float in it is finite).
        """
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step": self._step,
            "global": self._global.to_dict(),
            "layers": {name: ch.to_dict() for name, ch in self._layers.items()},
            "losses": list(self._losses),
            "spiking": self._spiking,
            "events": [
                {
                    "step": e.step,
                    "layer": e.layer,
                    "old": e.old,
                    "new": e.new,
                    "evidence": dict(e.evidence),
                }
                for e in self._events
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, configuration included.

        After loading, the same future records give the same events as the detector that
        saved the state. The saved configuration replaces the one given at construction.

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: ``state`` is not a phase-detector state of a known version.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"PhaseDetector.load_state_dict: expected the dict from state_dict(), got "
                f"{type(state).__name__}"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"PhaseDetector.load_state_dict: unknown state version "
                f"{state.get('version')!r} (this sgdlens reads version {_STATE_VERSION}); "
                "pass the dict returned by PhaseDetector.state_dict()"
            )
        try:
            cfg = state["config"]
            if not isinstance(cfg, Mapping):
                raise TypeError("config is not a mapping")
            new = PhaseDetector(**cfg)
            w, mw = new.window, new.motion_window
            new._step = int(state["step"])
            new._global = _Channel.from_dict(state["global"], w, mw)
            new._layers = {
                str(name): _Channel.from_dict(d, w, mw) for name, d in state["layers"].items()
            }
            new._losses.extend(float(v) for v in state["losses"])
            new._spiking = bool(state["spiking"])
            new._events = [
                PhaseEvent(
                    int(e["step"]),
                    str(e["layer"]),
                    str(e["old"]),
                    str(e["new"]),
                    {str(k): float(v) for k, v in e["evidence"].items()},
                )
                for e in state["events"]
            ]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"PhaseDetector.load_state_dict: malformed state ({type(e).__name__}: {e}); "
                "pass the dict returned by PhaseDetector.state_dict()"
            ) from e
        self.__dict__.update(new.__dict__)

    def __repr__(self) -> str:
        return (
            f"PhaseDetector(phase={self.phase!r}, layers={len(self._layers)}, "
            f"events={len(self._events)})"
        )
