"""The phase detector: per-layer and whole-model state machines fed one record at a time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sgdlens.phase._channel import Channel, Rule, Switch
from sgdlens.phase._config import check_config
from sgdlens.phase._event import DIFFUSION, DRIFT, SPIKE, WARMUP, PhaseEvent
from sgdlens.phase._spike import LossSpikes
from sgdlens.phase._state import STATE_VERSION, check_version, event_from_dict, event_to_dict
from sgdlens.phase._stats import as_number, displacement_exponent, usable

__all__ = ["PhaseDetector"]

_CONFIG = (
    "enter_diffusion",
    "enter_drift",
    "window",
    "dwell",
    "warmup",
    "spike_threshold",
    "spike_window",
    "spike_kick",
    "motion_window",
    "signal",
)


class PhaseDetector:
    """Per-layer and whole-model drift/diffusion phases from gradient SNR, with hysteresis.

    Feed it one record per log point with :meth:`update`; read :attr:`phase` (whole model),
    :attr:`phases` (per layer) and :attr:`events`. Each layer, and the whole model, runs the
    state machine ``warmup → drift ⇄ diffusion`` (a layer may also enter ``diffusion``
    straight from warmup). **Every time constant is in optimizer steps** (the records'
    ``step``), so the same training logged every 10 or every 100 steps gives the same
    switches, give or take one log interval (measured in ``docs/phases.md``).

    **What it reads.** From each record: ``step``; ``<signal>/<layer>`` (default
    ``grad_snr/<layer>``) for each layer and ``<signal>`` for the whole model; optionally
    ``weight_dist[/<layer>]`` (‖w_t − w_0‖), ``update_size[/<layer>]`` (norm of one step's
    update), ``batch_over_noise_scale[/<layer>]`` and ``loss``. A layer exists from the first
    record with a usable ``<signal>/<layer>`` value. Missing keys, non-numbers, bools, nan/inf
    and negative SNR, distance or update values are skipped exactly as if the key were absent.
    A record without a usable ``step`` keeps the previous one.

    **The rule** (SNR decides; everything else is evidence, except the loss-spike kick). Per
    layer, on every record at step ``s`` that carries a usable SNR value, the *window* holds
    the SNR values of the records with step in ``(s − window, s]``:

    1. ``warmup``: as soon as the SNR exceeds ``enter_drift`` on a record, enter ``drift``
       (a drift the SNR shows is never hidden by the warm-up). Otherwise, at the first record
       with ``s >= warmup``, enter ``drift`` if the window's lower median is at least
       ``sqrt(enter_diffusion · enter_drift)`` (the band's geometric centre, 1.0 at the
       defaults), else ``diffusion``.
    2. ``drift → diffusion`` once at least half the window lies below ``enter_diffusion``
       (its lower median does) on every SNR record for ``dwell`` steps;
       ``diffusion → drift`` once at least half lies above ``enter_drift`` (its upper median
       does) for ``dwell`` steps. A record on which this fails resets the count; a record
       without a usable value leaves it as is. So phases alternate, and two SNR-driven
       switches of one layer are at least ``dwell`` steps apart.
    3. Loss spike (when records carry ``loss``): once the losses span ``spike_window / 2``
       steps (and at least 5 are held), a loss more than ``spike_threshold`` robust standard
       deviations above the median of the losses of the last ``spike_window`` steps
       (``(loss − median) / (1.4826 · MAD)``) is a ``spike`` event (``layer=""``), reported
       once: no further spike until a loss falls back under half the threshold. A spike
       resets every count towards diffusion and, with ``spike_kick="global"`` (the default),
       switches the whole-model phase from ``diffusion`` to ``drift`` at once (``"all"``:
       every layer too; ``"none"``: no switch); a kicked phase makes no second switch on that
       record, and goes back to diffusion by rule 2 if the SNR stays low (Smith & Topin's
       kick: long learning-rate cycles raise the loss without always lifting the SNR above 1).

    **Delay** (Hypothesis-tested in ``tests/test_phase.py``). With records every ``k`` steps,
    if the values before a change lie on the old side of the band centre and every value from
    the change on lies beyond the far threshold, the switch comes
    ``((n − 1) // 2) · k + ceil(dwell / k) · k`` steps after the first record beyond,
    ``n = ceil(window / k)`` being the records in a window: **200 steps at the defaults for
    k = 25, 50 or 100 and 220 for k = 10**. At ``log_every=50`` the defaults are the constants of
    the earlier record-counting detector (5-record window, 3-record dwell, 5 warm-up
    records); only the early drift entry at warm-up is new.

    **Evidence.** Phase events carry ``snr`` (this record's value), ``snr_median`` (the median
    compared), ``threshold`` (the one crossed) and ``steps`` (how long the median stayed
    beyond it; at warm-up, the steps of SNR seen); when available ``motion_exponent``
    (least-squares slope of log ``weight_dist`` against log ``step`` over the last
    ``motion_window`` records: ≈1 ballistic drift, ≤½ diffusion), ``net_to_path``
    (``weight_dist`` over the path length ``Σ update_size · Δstep``, an estimate because
    ``update_size`` is sampled at log points), ``batch_over_noise_scale`` (the last
    ``B / B_simple`` a :class:`~sgdlens.lenses.NoiseScale` lens logged: about the within-batch
    SNR², below 1 where noise dominates), ``loss`` and ``loss_change`` (relative change of the
    median loss from the older to the newer half of the loss window). Spike events carry
    ``loss``, ``loss_median``, ``loss_scale`` (1.4826 · MAD), ``robust_z`` and ``threshold``.

    Args:
        enter_diffusion: SNR below which a layer in drift starts counting towards diffusion.
            0.8: the transition is SNR = 1, with a band around it.
        enter_drift: SNR above which a layer in diffusion starts counting towards drift.
            1.25 = 1/0.8, so the band is symmetric in log SNR around 1.
        window: optimizer steps of SNR values whose median is compared. 250: five records at
            the monitor's default ``log_every=50``, robust to outliers in fewer than half.
        dwell: optimizer steps the median must stay beyond a threshold before a switch (0:
            switch on the first record beyond). 100.
        warmup: the step from which a layer may enter its first phase by the median (it
            enters drift sooner if a record shows SNR above ``enter_drift``). 250: one full
            window.
        spike_threshold: robust standard deviations that make a loss jump a spike. 10: a
            Smith & Topin kick multiplies the loss by 10–40.
        spike_window: optimizer steps of losses whose median and MAD define the recent level.
            2500 (fifty records at ``log_every=50``).
        spike_kick: what a spike switches from ``diffusion`` to ``drift``: ``"global"`` (the
            whole-model phase), ``"all"`` (also every layer) or ``"none"``.
        motion_window: records in the log-log fit of ``weight_dist`` (evidence only). 8.
        signal: the metric whose per-layer values (``"<signal>/<layer>"``) and whole-model
            value (``"<signal>"``) drive the phases. ``"grad_snr"``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names the argument, the value
            and a valid choice).

    Example:
        >>> import math, random
        >>> rng = random.Random(0)
        >>> det = PhaseDetector()
        >>> for i in range(1, 61):
        ...     level = 3.0 if i <= 30 else 0.3  # drift, then diffusion from step 310 on
        ...     snr = level * math.exp(rng.gauss(0.0, 0.1))
        ...     events = det.update({"step": 10 * i, "grad_snr/fc1": snr, "grad_snr": snr})
        >>> [(e.step, e.layer, e.old, e.new) for e in det.events]  # doctest: +NORMALIZE_WHITESPACE
        [(10, 'fc1', 'warmup', 'drift'), (10, '', 'warmup', 'drift'),
         (530, 'fc1', 'drift', 'diffusion'), (530, '', 'drift', 'diffusion')]
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
        window: int = 250,
        dwell: int = 100,
        warmup: int = 250,
        spike_threshold: float = 10.0,
        spike_window: int = 2500,
        spike_kick: str = "global",
        motion_window: int = 8,
        signal: str = "grad_snr",
    ) -> None:
        cfg = check_config(
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
        self.enter_diffusion: float = cfg["enter_diffusion"]
        self.enter_drift: float = cfg["enter_drift"]
        self.window: int = cfg["window"]
        self.dwell: int = cfg["dwell"]
        self.warmup: int = cfg["warmup"]
        self.spike_threshold: float = cfg["spike_threshold"]
        self.spike_window: int = cfg["spike_window"]
        self.spike_kick: str = cfg["spike_kick"]
        self.motion_window: int = cfg["motion_window"]
        self.signal: str = cfg["signal"]
        self._rule = Rule(
            self.enter_diffusion, self.enter_drift, self.window, self.dwell, self.warmup
        )
        self._global = Channel(self.motion_window)
        self._layers: dict[str, Channel] = {}
        self._events: list[PhaseEvent] = []
        self._spikes = LossSpikes(self.spike_threshold, self.spike_window)
        self._step = 0

    def _config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG}

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

    def log_event(self, event: PhaseEvent) -> None:
        """Append an event decided outside the detector (e.g. a scheduler's ``lr_decay``).

        It joins :attr:`events` and the checkpoint; it changes no phase.
        """
        if not isinstance(event, PhaseEvent):
            raise TypeError(f"log_event(event=...) must be a PhaseEvent, got {event!r}")
        self._events.append(event)

    # -- update -------------------------------------------------------------------------------

    def _layer_names(self, record: Mapping[str, object]) -> list[str]:
        prefix = self.signal + "/"
        n = len(prefix)
        return [k[n:] for k in record if isinstance(k, str) and k.startswith(prefix) and k[n:]]

    def update(self, record: Mapping[str, object]) -> list[PhaseEvent]:
        """Read one record; return the events it raised, in order.

        Order within a record: a loss spike and the switches it kicks, then the layer
        switches (layers in order of first appearance), then the whole-model switch. A layer
        kicked by the spike makes no second switch on the same record.
        """
        if not isinstance(record, Mapping):
            raise TypeError(
                f"PhaseDetector.update(record): expected a mapping such as "
                f"{{'step': 10, 'grad_snr': 1.3}}, got {type(record).__name__}"
            )
        step = as_number(record.get("step"))
        if step is not None:
            self._step = int(step)
        new: list[PhaseEvent] = []
        loss = as_number(record.get("loss"))
        loss_evidence = self._spikes.evidence(loss)
        kicked: set[str] = set()
        if loss is not None:
            spike = self._spikes.update(float(self._step), loss)
            if spike is not None:
                kicked = self._spike(spike, new)
        for name in self._layer_names(record):  # a layer exists once it has a usable value
            if name not in self._layers and usable(record[self.signal + "/" + name]):
                self._layers[name] = Channel(self.motion_window)
        for name, ch in self._layers.items():
            self._update_channel(ch, name, "/" + name, record, loss_evidence, new, name in kicked)
        self._update_channel(self._global, "", "", record, loss_evidence, new, "" in kicked)
        self._events.extend(new)
        return new

    def _update_channel(
        self,
        ch: Channel,
        layer: str,
        suffix: str,
        record: Mapping[str, object],
        loss_evidence: Mapping[str, float],
        out: list[PhaseEvent],
        kicked: bool,
    ) -> None:
        step = float(self._step)
        # Weight-motion evidence: never decides, always kept up to date.
        dist = as_number(record.get("weight_dist" + suffix))
        if dist is not None and dist >= 0.0:
            ch.dist = dist
            if not ch.motion or step > ch.motion[-1][0]:
                ch.motion.append((step, dist))
        noise = as_number(record.get("batch_over_noise_scale" + suffix))
        if noise is not None:
            ch.noise = noise
        upd = as_number(record.get("update_size" + suffix))
        if upd is not None and upd >= 0.0 and step > ch.path_step:
            ch.path += upd * (step - ch.path_step)
            ch.path_step = step
        snr = as_number(record.get(self.signal + suffix))
        if snr is None or snr < 0.0:
            return
        switch = ch.add(self._rule, step, snr, kicked)
        if switch is not None:
            self._switch(ch, layer, switch, loss_evidence, out)

    def _motion_evidence(self, ch: Channel) -> dict[str, float]:
        ev: dict[str, float] = {}
        c = displacement_exponent(ch.motion)
        if c is not None:
            ev["motion_exponent"] = c
        if ch.dist is not None and ch.path > 0.0:
            ev["net_to_path"] = ch.dist / ch.path
        if ch.noise is not None:  # B / B_simple ≈ the minibatch SNR²
            ev["batch_over_noise_scale"] = ch.noise
        return ev

    def _switch(
        self,
        ch: Channel,
        layer: str,
        switch: Switch,
        loss_evidence: Mapping[str, float],
        out: list[PhaseEvent],
    ) -> None:
        ev: dict[str, float] = {
            "snr": ch.last_snr if ch.last_snr is not None else switch.median,
            "snr_median": switch.median,
            "threshold": switch.threshold,
            "steps": switch.steps,
        }
        ev.update(self._motion_evidence(ch))
        ev.update(loss_evidence)
        out.append(PhaseEvent(self._step, layer, ch.phase, switch.new, ev))
        ch.enter(switch.new)

    def _spike(self, ev: dict[str, float], out: list[PhaseEvent]) -> set[str]:
        out.append(PhaseEvent(self._step, "", self._global.phase, SPIKE, dict(ev)))
        targets: list[tuple[str, Channel]] = []
        if self.spike_kick in ("global", "all"):
            targets.append(("", self._global))
        if self.spike_kick == "all":
            targets.extend(self._layers.items())
        for ch in [self._global, *self._layers.values()]:
            if ch.phase == DRIFT:
                ch.since = None  # a spike is evidence against leaving drift
        kicked: set[str] = set()
        for layer, ch in targets:
            if ch.phase == DIFFUSION:
                kicked.add(layer)
                kick_ev = dict(ev)
                kick_ev.update(self._motion_evidence(ch))
                if ch.last_snr is not None:
                    kick_ev["snr"] = ch.last_snr
                out.append(PhaseEvent(self._step, layer, DIFFUSION, DRIFT, kick_ev))
                ch.enter(DRIFT)
        return kicked

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The detector's configuration and state as plain JSON-able Python types.

        Safe for ``torch.save`` / ``torch.load(weights_only=True)`` and for ``json.dumps``
        (every float in it is finite).
        """
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "step": self._step,
            "global": self._global.to_dict(),
            "layers": {name: ch.to_dict() for name, ch in self._layers.items()},
            "spikes": self._spikes.to_dict(),
            "events": [event_to_dict(e) for e in self._events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, configuration included.

        After loading, the same future records give the same events as the detector that
        saved the state. The saved configuration replaces the one given at construction.

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: ``state`` is not a phase-detector state of this version (a state of
                the earlier record-counting detector, version 1, is refused with an
                explanation).
        """
        state = check_version(state)
        try:
            cfg = state["config"]
            if not isinstance(cfg, Mapping):
                raise TypeError("config is not a mapping")
            new = PhaseDetector(**cfg)
            mw = new.motion_window
            new._step = int(state["step"])
            new._global = Channel.from_dict(state["global"], mw)
            new._layers = {
                str(name): Channel.from_dict(d, mw) for name, d in state["layers"].items()
            }
            new._spikes.load(state["spikes"])
            new._events = [event_from_dict(e) for e in state["events"]]
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
