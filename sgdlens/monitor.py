"""PhaseMonitor: attaches lenses to a ``torch.optim`` optimizer through its step hooks."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sgdlens._arguments import check_arguments, check_probe_model
from sgdlens._checkpoint import VERSION, check_state, lens_id, monitor_state, restore
from sgdlens._logpoint import emit, log_point, warn_once
from sgdlens._optim import unwrap_optimizer
from sgdlens._recording import Tally, event_record
from sgdlens._sampler import SKIPPED, Sampler
from sgdlens._view import build_view
from sgdlens.layers import LayersArg
from sgdlens.lenses.base import Lens, ParamView, State, Step, declares_sums
from sgdlens.phase import PhaseDetector, PhaseEvent
from sgdlens.probes.scheduled import Probe, ProbeScheduler
from sgdlens.records import History, Record

__all__ = ["PhaseMonitor"]

_ATTR = "_sgdlens_monitor"
#: record fields the monitor writes itself, which observe() may not replace
RESERVED = frozenset(
    {
        "step",
        "time",
        "nonfinite_steps",
        "phase",
        "event",
        "layer",
        "old",
        "run",
        "probe_time_fraction",
        "update_every",
    }
)


class PhaseMonitor:
    """Watch an optimizer: per-step lenses on device, one record per log point.

    The monitor attaches to *your* optimizer object with ``register_step_pre_hook`` and
    ``register_step_post_hook``; LR schedulers, ``GradScaler``, ``state_dict()`` and framework
    code keep working, and training is bit-for-bit the same as without it. After each
    ``optimizer.step()`` every lens updates its on-device state (no host synchronisation);
    every ``log_every`` steps the monitor stacks the lenses' results into one tensor, copies it
    to the host once and sends the record to ``monitor.history`` and every sink.

    Records hold ``step``, ``time``, the lenses' keys (``grad_snr/<layer>``, ``weight_norm``, …),
    ``nonfinite_steps`` (steps whose gradients held NaN/Inf, skipped by every running
    statistic) and the means of anything passed to :meth:`observe` since the last record.

    Args:
        optimizer: a ``torch.optim.Optimizer``, or a wrapper holding one in ``.optimizer``.
        model: the model, to name layers after its modules (a module's own parameters form
            one layer); without it layers are named ``group<i>.<j>`` per parameter.
        layers: how parameters group into the layers of the per-layer keys: ``"auto"`` (by
            module up to 16 modules with parameters, else by repeated block such as
            ``transformer.h.3``), ``"modules"``, ``"blocks"``, ``"params"`` (per tensor), a
            function from parameter name to group name (``None``: whole-model keys only), or
            :class:`sgdlens.Layers` with ``include``/``exclude`` name patterns; see
            :mod:`sgdlens.layers`.
        lenses: the lenses to run (copied; see :mod:`sgdlens.lenses`); ``None`` for the
            default ``[GradSNR(), WeightNorms(), GradNorm()]``.
        sinks: where records go besides ``monitor.history``: callables taking a record, such
            as :class:`sgdlens.sinks.JSONLSink`.
        log_every: optimizer steps between records.
        detector: the :class:`~sgdlens.phase.PhaseDetector` that reads each record (its phase
            keys ``phase`` and ``phase/<layer>`` go into the record); ``True`` for a default
            one, ``False`` for none.
        trace_steps: per-step loss and gradient norm kept on device for the last
            ``trace_steps`` steps (default: ``log_every``, at most 1024) and written out with
            each phase event or loss spike, so the steps before it are never lost; 0: none.
        overhead_budget: ``None`` (the default): the lenses read every step. A fraction of a
            step (0.03: 3 %): the monitor times its own per-step work and, from the second log
            interval on, has the lenses read every ``k``-th step (at most ``log_every // 4``
            apart, and every log step and window end), ``k`` chosen at each log point to
            keep that work near the budget; records carry ``update_every`` (``k``).
            Statistics are then exact over the steps read (``GradSNR``'s window mean and
            spread over the sampled steps of each window; ``nonfinite_steps`` counts
            non-finite steps among them). Per-sample and micro-batch lenses still update at
            every step.
        keep_records: keep only the last that many records (and events) in
            ``monitor.history`` (``None``: all); sinks still get every record, so a
            :class:`~sgdlens.sinks.JSONLSink` file stays complete while memory stays bounded.
        probes: loss-surface probes to run at log points on a schedule (see
            :mod:`sgdlens.probes.scheduled`: ``sharpness_probe``, ``trace_probe``,
            ``barrier_probe``, or any :class:`~sgdlens.probes.Probe`); needs ``model``.
        probe_budget: the most probe time may take, as a fraction of the wall time since the
            monitor attached (0.05: 5 %); due probes are postponed to stay within it, and
            records carry ``probe_time_fraction``.
        probe_model: under FSDP, a plain (unsharded) module of the model's architecture for
            the probes: at each probe run every rank gathers the full weights
            (``get_model_state_dict``), rank 0 loads them into ``probe_model``, runs the probes
            on it with a stand-in optimizer of the same class (first param group's learning
            rate, no state: an Adam run gets the plain sharpness) and sends the numbers to the
            other ranks. Needed for ``probes=`` under FSDP, refused otherwise.

    Phase events reach ``monitor.events``, every :meth:`on_phase_change` callback, and every
    sink as an event record ``{"step", "time", "event", "layer", "old", "evidence/<name>",
    "trace/step", "trace/loss", "trace/grad_norm"}`` (``History`` keeps those apart in
    ``history.events``).

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, model=model, log_every=10)
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     loss = model(torch.randn(16, 4)).pow(2).mean()
        ...     loss.backward()
        ...     opt.step()
        ...     monitor.observe(loss=loss)
        >>> len(monitor.history), "grad_snr/0" in monitor.history.records[-1]
        (2, True)
        >>> monitor.close()
    """

    optimizer: Any  # the torch.optim.Optimizer; None once closed
    model: nn.Module | None
    log_every: int
    grouping: LayersArg
    view: ParamView
    lenses: list[Lens]
    states: list[State]
    history: History
    sinks: list[Callable[[Record], Any]]
    step: int
    tally: Tally
    _n_params: int
    _warned: set[str]
    _handles: list[Any]
    _lens_handles: list[Any]
    detector: PhaseDetector | None
    probes: ProbeScheduler | None
    _callbacks: list[Callable[[PhaseEvent], Any]]
    _read: Any  # the Step the pre-hook read, None, or SKIPPED
    _closed: str
    _outer: Any
    _nested: int

    def __init__(
        self,
        optimizer: Any,
        *,
        model: nn.Module | None = None,
        lenses: Iterable[Lens] | None = None,
        sinks: Iterable[Callable[[Record], Any]] = (),
        log_every: int = 50,
        layers: LayersArg = "auto",
        detector: PhaseDetector | bool = True,
        trace_steps: int | None = None,
        keep_records: int | None = None,
        overhead_budget: float | None = None,
        probes: Sequence[Probe] = (),
        probe_budget: float = 0.05,
        probe_model: nn.Module | None = None,
    ) -> None:
        opt, found, trace, probe_list, lens_list, sink_list = check_arguments(
            optimizer,
            model,
            lenses,
            sinks,
            log_every,
            layers,
            detector,
            trace_steps,
            probes,
            probe_budget,
        )
        self.sampler = Sampler(overhead_budget, int(log_every))
        if getattr(opt, _ATTR, None) is not None:
            raise ValueError(
                f"this {type(opt).__name__} already has a PhaseMonitor; close() it first, or "
                f"use PhaseMonitor.of(optimizer) to reach it"
            )
        self.optimizer = opt
        self.model = model
        self.log_every = int(log_every)
        self.grouping = layers  # the layers= argument (the run header records it)
        self.started = time.time()  # attach time (the run header's start)
        self.run_id: str | None = None  # set by the first record's header, or a checkpoint
        self.view = build_view(opt, model, self.log_every, layers)
        check_probe_model(probe_list, probe_model, self.view)
        try:
            self.history = History(max_records=keep_records)
        except ValueError as e:
            raise ValueError(
                str(e).replace("History(max_records=", "PhaseMonitor(keep_records=")
            ) from None
        self.lenses = lens_list
        self.states = [lens.init(self.view) for lens in lens_list]
        self._declared = [declares_sums(lens) for lens in lens_list]  # local/finish, or compute
        # what a step the sampler leaves out still runs: the lenses that must see every step
        # (they accumulate through hooks) and those that name steps they must read
        indices = range(len(lens_list))
        self._every_step = [i for i in indices if getattr(lens_list[i], "every_step", False)]
        self.sampler.due = [i for i in indices if callable(getattr(lens_list[i], "due", None))]
        # built before any hook is attached: a probe it refuses leaves nothing behind
        self.probes = (
            ProbeScheduler(probe_list, float(probe_budget), probe_model, model=model)
            if probe_list
            else None
        )
        # lenses that watch more than the optimizer (module or gradient hooks) attach here
        self._lens_handles = []
        try:
            for lens in lens_list:
                attach = getattr(lens, "attach", None)
                if callable(attach):
                    self._lens_handles += attach(model, self.view)
        except BaseException:  # a lens refusing must not leave the others' hooks behind
            for h in self._lens_handles:
                h.remove()
            raise
        self.sinks = [self.history, *sink_list]
        self.step = 0
        self._n_params = len(self.view.params)
        self.tally = Tally(self.view, int(trace))  # steps read, observed scalars, the trace
        self._warned: set[str] = set()
        self.detector = found
        self._callbacks: list[Callable[[PhaseEvent], Any]] = []
        self._read = None  # the Step the pre-hook read, finished by the post-hook
        self._closed = ""  # the optimizer's class name once closed
        self._outer = None  # the frame of the step() call in progress
        self._nested = 0  # step() calls inside it (a subclass calling super().step())
        self._handles = [
            opt.register_step_pre_hook(self._pre_step),
            opt.register_step_post_hook(self._post_step),
        ]
        setattr(opt, _ATTR, self)

    # -- attaching -----------------------------------------------------------------------

    @classmethod
    def wrap(cls, optimizer: Any, **kwargs: Any) -> Any:
        """Attach a monitor and return the *same* optimizer object (for one-expression set-up).

        Example:
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = PhaseMonitor.wrap(torch.optim.AdamW(model.parameters()), model=model)
            >>> PhaseMonitor.of(opt).log_every
            50
        """
        cls(optimizer, **kwargs)
        return optimizer

    @staticmethod
    def of(optimizer: Any) -> PhaseMonitor:
        """The monitor attached to ``optimizer`` (or to the optimizer it wraps)."""
        mon = getattr(unwrap_optimizer(optimizer), _ATTR, None)
        if mon is None:
            raise LookupError(
                f"no PhaseMonitor is attached to this {type(optimizer).__name__}; attach one "
                f"with PhaseMonitor(optimizer, model=model) or PhaseMonitor.wrap(...)"
            )
        return mon

    def close(self) -> None:
        """Remove every hook, close the sinks and let go of the model and optimizer.

        Idempotent. ``history``, ``events``, ``phase``, the lenses' settings and
        :meth:`state_dict` stay readable (a framework may checkpoint after the run ends); a
        closed monitor kept for them holds no reference to the model, optimizer or parameters.
        """
        for h in self._handles + self._lens_handles:
            h.remove()
        self._handles, self._lens_handles = [], []
        if self.optimizer is not None and getattr(self.optimizer, _ATTR, None) is self:
            delattr(self.optimizer, _ATTR)
        for sink in self.sinks[1:]:
            if callable(getattr(sink, "close", None)):
                sink.close()  # type: ignore[attr-defined]
        if self.optimizer is not None:
            self._closed = type(self.optimizer).__name__
            for lens in self.lenses:
                if callable(getattr(lens, "release", None)):
                    lens.release()
            self.optimizer = self.model = None
            self.view = dataclasses.replace(
                self.view, params=(), optimizer=None, _index={}, shared={}
            )

    def flush(self) -> None:
        """Flush every sink that can be flushed."""
        for sink in self.sinks:
            if callable(getattr(sink, "flush", None)):
                sink.flush()  # type: ignore[attr-defined]

    def __enter__(self) -> PhaseMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PhaseMonitor({self._closed or type(self.optimizer).__name__}, step={self.step}, "
            f"log_every={self.log_every}, layers={len(self.view.layers)}, lenses={self.lenses})"
        )

    # -- the hot path --------------------------------------------------------------------

    def observe(self, **values: Tensor | float) -> None:
        """Record scalars such as the loss; each record carries their mean since the last one.

        Call it before ``optimizer.step()`` (after ``backward()``), so that a record at step
        ``s`` averages the losses of the batches that drove steps ``s − log_every + 1 … s``.
        Tensors stay on their device (no synchronisation); pass the loss tensor as it is.

        Example:
            >>> monitor.observe(loss=loss)  # doctest: +SKIP
        """
        if self._closed:
            return
        for name, value in values.items():
            if name not in self.tally.observed:
                self._check_observed_name(name)
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"observe({name}=...) needs a single number, got a tensor of shape "
                        f"{tuple(value.shape)}; reduce it first, e.g. {name}=loss.mean()"
                    )
                v: Tensor | float = value if value.dim() == 0 else value.reshape(())
                if value.device != self.view.device:
                    v = value.to(self.view.device).reshape(())
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                v = float(value)
            else:
                raise TypeError(f"observe({name}=...) must be a number or tensor, got {value!r}")
            self.tally.observe(name, v)

    def _check_observed_name(self, name: str) -> None:
        taken = {m for lens in self.lenses for m in getattr(lens, "metrics", ())}
        if self.probes is not None:
            taken.update(p.name for p in self.probes.probes)
            taken.update(k.name for p in self.probes.probes for k in p.keys)
        if "/" in name or name in RESERVED or name in taken:
            raise ValueError(
                f"observe({name}=...): {name!r} is a key the monitor writes itself "
                f"({'a per-layer key' if '/' in name else 'reserved'}: the record's own fields "
                f"{sorted(RESERVED)} and the lenses' and probes' metrics {sorted(taken)}); "
                f"choose another name, e.g. observe(my_{name.replace('/', '_')}=...)"
            )

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # torch wraps every class's own step(): a subclass whose step() calls super().step()
        # runs the hooks twice, the inner pair while the outer call is still on the stack
        if self._outer is not None and _on_stack(self._outer):
            self._nested += 1
            return
        self._outer, self._nested = sys._getframe(1), 0
        index = self.step + 1
        logging = index % self.log_every == 0
        self.sampler.begin()
        if not (logging or self.sampler.reads(index, self.lenses, self.states)):
            self._read = SKIPPED
            self.sampler.pause()
            return
        step = Step(self.view, index, logging=logging)
        with torch.no_grad():
            if step.logging:
                for lens, state in zip(self.lenses, self.states):
                    lens.prepare(state, step)
            # A step pre-hook gets (optimizer, args, kwargs) with args[0] the optimizer itself.
            # The gradients are final before step() unless it gets a closure (LBFGS), which
            # computes them inside, or a GradScaler left the unscaling to a fused optimizer
            # (it sets optimizer.grad_scale for the step; the kernel unscales .grad in place).
            # Otherwise read them now, before the optimizer (or a later hook) can rewrite
            # .grad in place, and while backward() has left them in cache.
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            later = closure is not None or isinstance(
                getattr(optimizer, "grad_scale", None), Tensor
            )
            self._read = None if later else self._update(step)
        self.sampler.pause()

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._nested:
            self._nested -= 1
            return
        self._outer = None
        self.step += 1
        if self._read is SKIPPED:  # sampled out: only the lenses that need every step
            self._read = None
            self.sampler.begin()
            if self._every_step:
                with torch.no_grad():
                    self._update_lenses(Step(self.view, self.step, False), every_step_only=True)
            self.sampler.end(read=False)
            return
        self.sampler.begin()
        with torch.no_grad():
            step = self._read or self._update(
                Step(self.view, self.step, self.step % self.log_every == 0)
            )
            self._read = None
            self.sampler.end(read=True)
            if step.logging:
                self._check_param_groups()
                log_point(self, step)
                self.sampler.adapt()

    def _update(self, step: Step) -> Step:
        """Every lens's per-step update, the finite-step count and the per-step trace."""
        self._update_lenses(step)
        self.tally.count(step)
        return step

    def _update_lenses(self, step: Step, every_step_only: bool = False) -> None:
        """The lenses' updates (at a step the sampler leaves out, only those that accumulate
        through hooks and must see every step), then the shared per-sample pass is reset."""
        try:
            for i in self._every_step if every_step_only else range(len(self.lenses)):
                self.states[i] = self.lenses[i].update(self.states[i], step)
        finally:
            engine = self.view.shared.get("per_sample")
            if engine is not None:  # one per-sample pass, read by every lens that needs it
                engine.reset()

    def _check_param_groups(self) -> None:
        n = len([p for g in self.optimizer.param_groups for p in g["params"]])
        if n != self._n_params:
            warn_once(
                self,
                "groups",
                f"the optimizer now holds {n} parameters, the monitor watches the "
                f"{self._n_params} it held when attached; attach a new monitor after "
                f"add_param_group()",
            )

    # -- phases ---------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """The whole model's phase: ``"warmup"``, ``"drift"`` or ``"diffusion"``."""
        return self.detector.phase if self.detector is not None else "warmup"

    @property
    def phases(self) -> dict[str, str]:
        """The phase of every layer."""
        return self.detector.phases if self.detector is not None else {}

    @property
    def events(self) -> list[PhaseEvent]:
        """Every phase event and loss spike so far, in order."""
        return self.detector.events if self.detector is not None else []

    def log_event(self, event: PhaseEvent) -> None:
        """Log an event decided outside the detector (e.g. ``PhaseLR``'s ``"lr_decay"``).

        It is sent to every sink as an event record (``history.events``) and, with a detector,
        joins :attr:`events` and the detector's checkpoint. It changes no phase and calls no
        :meth:`on_phase_change` callback.
        """
        if not isinstance(event, PhaseEvent):
            raise TypeError(f"log_event(event=...) must be a PhaseEvent, got {event!r}")
        if self.detector is not None:
            self.detector.log_event(event)
        emit(self, event_record(event, {}))

    def on_phase_change(self, callback: Callable[[PhaseEvent], Any]) -> Callable[[PhaseEvent], Any]:
        """Call ``callback(event)`` at every phase event or loss spike; usable as a decorator.

        Example:
            >>> @monitor.on_phase_change  # doctest: +SKIP
            ... def report(event):
            ...     print(event.step, event.layer or "model", event.old, "->", event.new)
        """
        if not callable(callback):
            raise TypeError(f"on_phase_change(callback=...) must be callable, got {callback!r}")
        self._callbacks.append(callback)
        return callback

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state: step count, counters and every lens's state (tensors, numbers).

        Save it beside the model's and optimizer's; a run resumed from all three produces the
        records the uninterrupted run would have. Loadable with ``torch.load(weights_only=True)``.
        Like ``nn.Module.state_dict`` it holds references to live tensors, not copies.
        """
        return monitor_state(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a monitor built with the same arguments.

        Everything is checked before anything is loaded (lenses, layers, ``log_every``, the
        shape of every state tensor); a load that fails part-way puts the monitor back as it
        was, so a refused checkpoint never leaves a half-loaded monitor.
        """
        check_state(
            state_dict,
            VERSION,
            {
                "lenses": ([lens_id(lens) for lens in self.lenses], "the same lenses"),
                "layers": (list(self.view.layers), "the same model (layers)"),
                "log_every": (self.log_every, "log_every={saved}"),
            },
            self.states,
        )
        backup = copy.deepcopy(self.state_dict())
        try:
            restore(self, state_dict)
        except BaseException:
            restore(self, backup)
            raise


def _on_stack(frame: Any) -> bool:
    """Whether ``frame`` is still running (is an ancestor of the caller's frame)."""
    f: Any = sys._getframe(2)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False
