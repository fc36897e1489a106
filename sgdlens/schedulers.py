"""Learning-rate schedules that act on the phase detector.

:class:`PhaseLR` decays the learning rate when the whole model goes from the drift phase to
the diffusion phase, instead of at hand-picked milestones: the idea of statistical
stationarity tests for SGD (Pflug 1983; Yaida 2018; Lang, Xiao & Zhang, *Using Statistics to
Automate Stochastic Optimization*, NeurIPS 2019), with sgdlens's drift/diffusion detector as
the test. ``trigger="stationary"`` uses instead the statistical test those papers describe
(:mod:`sgdlens.stationarity`): Yaida's fluctuation-dissipation relation for ``torch.optim.SGD``,
tested with SASA's batch-means confidence interval.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from sgdlens._optim import unwrap_optimizer
from sgdlens.monitor import PhaseMonitor
from sgdlens.phase import PhaseEvent
from sgdlens.stationarity import SGDStationarity, StationarityTest

__all__ = ["PhaseLR"]

LR_DECAY = "lr_decay"


def _steps(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"PhaseLR({name}={value!r}): {name} must be an int (optimizer steps), got "
            f"{type(value).__name__}; pass e.g. {name}=0"
        )
    if value < 0:
        raise ValueError(f"PhaseLR({name}={value!r}): {name} must be >= 0; pass e.g. {name}=0")
    return int(value)


class PhaseLR(LRScheduler):
    """Multiply every group's learning rate by ``factor`` when the model goes drift → diffusion.

    Call ``scheduler.step()`` after ``optimizer.step()``, every step or every epoch, as with
    any torch scheduler. At each call it reads ``monitor.phase`` (the whole-model phase of the
    monitor's :class:`~sgdlens.phase.PhaseDetector`) and ``monitor.step``. The rate is
    decayed once per *diffusion episode* that the run entered **from drift** (the detector's
    whole-model event ``drift → diffusion``, a loss-spike kick's return included): when the
    model has been in diffusion for at least ``patience_steps`` steps (counted from the first
    call that saw it there), and at least ``cooldown_steps`` steps have passed since the last
    decay. A later episode (after the model went back to drift, e.g. after a loss spike)
    decays again; an episode that starts within the cooldown decays once the cooldown is
    over, if the model is still diffusing. Rates never go below ``min_lr``.

    An episode entered straight from the detector's warm-up (``warmup → diffusion``: the
    gradient SNR was below 1 from the first records, so the run has shown no transition)
    does not decay unless ``from_warmup=True``. Measured in ``docs/phase_lr.md``: on three
    small tasks whose SNR is below 1 from the start, cutting at the warm-up's end lost to the
    constant rate on all three, and none of the loss-stationarity triggers tried did
    reliably better than the constant rate.

    It is chainable: it multiplies the rate in ``group["lr"]`` as it finds it, so it composes
    with warm-up (``LinearLR``) or any other chainable scheduler stepped beside it, or inside
    ``ChainedScheduler``. :meth:`state_dict` / :meth:`load_state_dict` hold everything but
    the optimizer and the monitor (save the monitor's own ``state_dict`` beside it).

    Every decay is logged as an event in the monitor's records (``monitor.events``, every
    sink, ``history.events``): ``PhaseEvent(step, "", "diffusion", "lr_decay", evidence)``
    with evidence ``lr`` (the first group's new rate), ``old_lr`` and ``factor``.

    Args:
        optimizer: the optimizer (or a wrapper holding it in ``.optimizer``) that ``monitor``
            watches.
        monitor: a :class:`~sgdlens.PhaseMonitor` with a detector, attached to ``optimizer``.
        factor: multiplier in (0, 1) applied at each decay. 0.1, as in step decay.
        min_lr: a lower bound on the rate, one number or one per parameter group. 0.
        patience_steps: steps the model must stay in diffusion before the decay. 0: the
            detector's dwell already confirms the phase.
        cooldown_steps: steps after a decay during which no other decay happens. 0.
        from_warmup: also decay in a diffusion episode entered straight from the warm-up
            (the earlier rule: a cut at the warm-up's end whenever the run starts with SNR
            below 1). False.
        trigger: ``"drift"`` (the rule above, the default), or ``"stationary"`` /
            a :class:`~sgdlens.stationarity.StationarityTest`: decay when SASA's test finds
            the iterates stationary (``torch.optim.SGD`` only; the monitor then needs no
            detector). The test runs every ``test_every`` steps on the most recent half of
            the steps since the rates last changed; see :mod:`sgdlens.stationarity` and
            ``docs/phase_lr.md``. ``patience_steps`` and ``from_warmup`` do not apply to it;
            ``cooldown_steps`` and ``min_lr`` do.
        last_epoch: as for every torch scheduler (-1: start afresh).

    Raises:
        TypeError: ``monitor`` is not a PhaseMonitor, or an argument has the wrong type.
        ValueError: the monitor has no detector or watches another optimizer, ``factor``
            is outside (0, 1), or a step count or ``min_lr`` is negative.

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, model=model, log_every=10)
        >>> sched = PhaseLR(opt, monitor, factor=0.1)
        >>> sched.get_last_lr()
        [0.1]
        >>> monitor.close()
    """

    monitor: PhaseMonitor
    factor: float
    min_lrs: list[float]
    patience_steps: int
    cooldown_steps: int
    diffusing_since: int | None
    decayed: bool
    last_decay: int | None
    decays: int
    from_warmup: bool
    entered_from: str | None
    trigger: str
    test: StationarityTest | None
    tested_at: int
    last_test: dict[str, float] | None

    def __init__(
        self,
        optimizer: Any,
        monitor: PhaseMonitor,
        factor: float = 0.1,
        min_lr: float | Sequence[float] = 0.0,
        patience_steps: int = 0,
        cooldown_steps: int = 0,
        from_warmup: bool = False,
        last_epoch: int = -1,
        trigger: str | StationarityTest = "drift",
    ) -> None:
        opt = unwrap_optimizer(optimizer, "PhaseLR(optimizer=...)")
        if not isinstance(monitor, PhaseMonitor):
            raise TypeError(
                f"PhaseLR(monitor={monitor!r}): monitor must be a sgdlens.PhaseMonitor; "
                "pass the monitor attached to this optimizer, e.g. PhaseMonitor(opt, model=model)"
            )
        if isinstance(trigger, StationarityTest):
            test: StationarityTest | None = trigger
        elif trigger == "stationary":
            test = StationarityTest()
        elif trigger == "drift":
            test = None
        else:
            raise ValueError(
                f"PhaseLR(trigger={trigger!r}): trigger must be 'drift', 'stationary' or a "
                "sgdlens.stationarity.StationarityTest; pass e.g. trigger='stationary'"
            )
        if test is None and monitor.detector is None:
            raise ValueError(
                "PhaseLR(monitor=...): the monitor has no phase detector (it was built with "
                "detector=False); build it with detector=True or detector=PhaseDetector(...)"
            )
        if monitor.optimizer is None:
            raise ValueError(
                "PhaseLR(monitor=...): the monitor is closed (monitor.close() removed its hooks); "
                "attach a new one, e.g. PhaseMonitor(opt, model=model), and pass it"
            )
        if monitor.optimizer is not opt:
            raise ValueError(
                f"PhaseLR(monitor=...): the monitor watches another optimizer "
                f"({type(monitor.optimizer).__name__} at {id(monitor.optimizer):#x}), not this "
                f"{type(opt).__name__} at {id(opt):#x}; pass the monitor attached to this "
                "optimizer, e.g. PhaseMonitor.of(optimizer)"
            )
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise TypeError(f"PhaseLR(factor={factor!r}): factor must be a float; e.g. 0.1")
        if not 0.0 < float(factor) < 1.0:
            raise ValueError(
                f"PhaseLR(factor={factor!r}): factor must lie in (0, 1) (it multiplies the "
                "rate at each decay); pass e.g. factor=0.1"
            )
        if not isinstance(from_warmup, bool):
            raise TypeError(
                f"PhaseLR(from_warmup={from_warmup!r}): from_warmup must be a bool; "
                "pass from_warmup=False (decay only after drift) or True"
            )
        n = len(opt.param_groups)
        mins = list(min_lr) if isinstance(min_lr, Sequence) else [min_lr] * n
        if len(mins) != n or not all(
            isinstance(m, numbers.Real) and not isinstance(m, bool) and m >= 0 for m in mins
        ):
            raise ValueError(
                f"PhaseLR(min_lr={min_lr!r}): min_lr must be a number >= 0 or one per "
                f"parameter group ({n}); pass e.g. min_lr=0.0"
            )
        self.monitor = monitor
        self.factor = float(factor)
        self.min_lrs = [float(m) for m in mins]
        self.patience_steps = _steps("patience_steps", patience_steps)
        self.cooldown_steps = _steps("cooldown_steps", cooldown_steps)
        self.diffusing_since = None  # monitor step of the first call in diffusion
        self.decayed = False  # this diffusion episode has had its decay
        self.last_decay = None  # monitor step of the last decay
        self.decays = 0
        self.from_warmup = from_warmup
        self.entered_from = None  # the phase this diffusion episode came from
        self.trigger = "drift" if test is None else "stationary"
        self.test = test
        self.tested_at = 0  # stationarity-stream step count at the last test
        self.last_test = None  # the last test's mean, half_width, n, stationary
        self._stream: SGDStationarity | None = None
        if test is not None:
            try:
                self._stream = SGDStationarity(opt)
            except ValueError as err:
                raise ValueError(f"PhaseLR(trigger='stationary'): {err}") from None
        super().__init__(opt, last_epoch)

    def _due(self) -> bool:
        """Whether this call should decay (updates the episode bookkeeping)."""
        if self.monitor._closed:  # a closed monitor sees no steps: the rate is held
            return False
        if self._stream is not None:
            return self._stationary()
        t = self.monitor.step
        if self.monitor.phase != "diffusion":
            self.diffusing_since, self.decayed, self.entered_from = None, False, None
            return False
        if self.diffusing_since is None:
            self.diffusing_since = t
        if self.entered_from is None:  # once per episode (or a state saved before this key)
            self.entered_from = self._entry()
        if self.entered_from != "drift" and not self.from_warmup:
            return False
        cooled = self.last_decay is None or t - self.last_decay >= self.cooldown_steps
        return not self.decayed and cooled and t - self.diffusing_since >= self.patience_steps

    def _stationary(self) -> bool:
        """Run the stationarity test if it is due; whether it says to decay now."""
        stream, test = self._stream, self.test
        assert stream is not None and test is not None
        if stream.count - self.tested_at < test.test_every:
            return False
        n = test.window(stream.steps_at_rate)
        if n == 0:
            return False
        self.tested_at = stream.count
        delta, _ = stream.window(n)
        result = test(delta)
        self.last_test = {
            "mean": result.mean,
            "half_width": result.half_width,
            "n": float(result.n),
            "stationary": float(result.stationary),
        }
        t = self.monitor.step
        cooled = self.last_decay is None or t - self.last_decay >= self.cooldown_steps
        return result.stationary and cooled

    def _entry(self) -> str:
        """The phase the whole model left for its current diffusion episode (its last event
        into diffusion; ``"warmup"`` when the events hold none)."""
        for event in reversed(self.monitor.events):
            if event.layer == "" and event.new == "diffusion":
                return event.old
        return "warmup"

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The rates for this step: the current ones, times ``factor`` at a decay."""
        groups = self.optimizer.param_groups
        current = [float(g["lr"]) for g in groups]
        if getattr(self, "_is_initial", self.last_epoch == 0) or not self._due():
            return current
        new = [max(lr * self.factor, m) for lr, m in zip(current, self.min_lrs)]
        self.decayed, self.last_decay = True, self.monitor.step
        self.decays += 1
        if new != current:
            evidence = {"lr": new[0], "old_lr": current[0], "factor": self.factor}
            old = "diffusion"
            if self.trigger == "stationary" and self.last_test is not None:
                old = "stationary"
                evidence.update({k: self.last_test[k] for k in ("mean", "half_width", "n")})
            self.monitor.log_event(PhaseEvent(self.monitor.step, "", old, LR_DECAY, evidence))
        return new

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer and the monitor (plain Python types)."""
        skip = ("optimizer", "monitor", "_stream", "test")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        if self._stream is not None and self.test is not None:
            state["test"] = {k: getattr(self.test, k) for k in self.test.__dataclass_fields__}
            state["stationarity"] = self._stream.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the monitor and optimizer stay this one's)."""
        skip = ("optimizer", "monitor", "_stream", "test", "stationarity", "trigger")
        if state_dict.get("trigger", "drift") != self.trigger:
            saved = state_dict.get("trigger", "drift")
            raise ValueError(
                f"PhaseLR.load_state_dict: the state is for trigger={saved!r}, this scheduler "
                f"has trigger={self.trigger!r}; build it with the same trigger"
            )
        state = {k: v for k, v in state_dict.items() if k not in skip}
        self.__dict__.update(state)
        if self._stream is not None:
            self.test = StationarityTest(**state_dict["test"])
            self._stream.load_state_dict(state_dict["stationarity"])

    def __repr__(self) -> str:
        return (
            f"PhaseLR(factor={self.factor}, decays={self.decays}, "
            f"lr={[g['lr'] for g in self.optimizer.param_groups]})"
        )
