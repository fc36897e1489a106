"""Hugging Face ``Trainer``: a ``TrainerCallback`` and :func:`attach`, which places it.

Needs the extra: ``pip install "sgdlens[transformers]"``.

Why :func:`attach` and not only ``Trainer(callbacks=[...])``: the ``Trainer`` builds its
callback list as ``DefaultFlowCallback``, then the reporting integrations chosen by
``report_to`` (TensorBoard, W&B, MLflow, …), then the user's callbacks, and it calls them in
that order. ``Trainer.log`` appends a *copy* of the logs to ``state.log_history`` and then calls
``on_log`` with the logs dict. A user callback therefore runs after every reporting
integration has already sent that dict away. :func:`attach` moves the callback to just after
``DefaultFlowCallback``, so the keys it adds to ``logs`` reach every ``report_to`` integration;
in either place it also adds them to the entry just appended to ``state.log_history``. The
Trainer's console printer (``ProgressCallback``, or ``PrinterCallback`` without tqdm) would print
every key of the logs, a line of kilobytes on a real model; :func:`attach` puts a small
callback just before it that takes the sgdlens keys out again, so the console shows the
Trainer's own numbers only. What lands where:

=============================  ==========================================================
place                          sgdlens keys
=============================  ==========================================================
``report_to`` integrations     numeric keys under ``prefix`` (with :func:`attach`)
``state.log_history``          numeric keys under ``prefix`` (always)
the console printer            none
``sinks=`` (e.g. JSONLSink)    every record, header and event, with the phase strings
=============================  ==========================================================

It also
wraps ``trainer.training_step`` (a documented override point) to hand each batch's loss to the
monitor before the optimizer steps, since callbacks are never shown the loss.

Example:
    >>> from sgdlens.integrations.transformers import attach  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
    >>> callback = attach(trainer, log_every=10)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.state.log_history[-2]["sgdlens/grad_snr"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor

from sgdlens._warn import warn
from sgdlens.integrations import (
    check_callback_args,
    describe_event,
    numeric_metrics,
    share_grad_scaler,
)
from sgdlens.lenses._optimizer_moments import resuming
from sgdlens.monitor import PhaseMonitor
from sgdlens.records import Record

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import (
        DefaultFlowCallback,
        PrinterCallback,
        ProgressCallback,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'sgdlens.integrations.transformers needs transformers: pip install "sgdlens[transformers]"'
    ) from e

__all__ = ["STATE_FILE", "PhaseMonitorCallback", "attach"]

STATE_FILE = "sgdlens_monitor.pt"
"""The file the callback writes into every checkpoint folder (``checkpoint-<step>/``)."""

_PRINTERS = (PrinterCallback, ProgressCallback)  # the Trainer's console output


class PhaseMonitorCallback(TrainerCallback):
    """Watch the Hugging Face ``Trainer``'s optimizer with a :class:`~sgdlens.PhaseMonitor`.

    At ``on_train_begin`` (after ``accelerator.prepare``) it attaches a monitor to the real
    optimizer under accelerate's ``AcceleratedOptimizer``, naming layers after the model's
    modules. At every ``on_log`` the latest record produced since the previous log is added to
    the logs under ``prefix`` (numeric keys only), both to the entry of
    ``trainer.state.log_history`` and — when placed by :func:`attach` — to what the
    ``report_to`` integrations receive. By default ``log_every`` is the Trainer's logging
    interval (``state.logging_steps``), so each logging step carries the record of that step.
    Phase events and loss spikes are printed once each (main process only).

    The monitor's state is saved as ``checkpoint-<step>/sgdlens_monitor.pt`` at every
    checkpoint (main process) and restored when training resumes from that checkpoint
    (``trainer.train(resume_from_checkpoint=...)``), so the step count and every running
    statistic continue. Gradient accumulation needs nothing special: the hooks fire on real
    optimizer steps only, and a step that fp16's ``GradScaler`` skips is not seen.

    Logged keys (default prefix): ``sgdlens/grad_snr``, ``sgdlens/grad_snr/<layer>``,
    ``sgdlens/grad_mean[/<layer>]``, ``sgdlens/grad_std[/<layer>]``,
    ``sgdlens/grad_norm[/<layer>]``, ``sgdlens/weight_norm[/<layer>]``,
    ``sgdlens/update_size[/<layer>]``, ``sgdlens/update_ratio[/<layer>]``,
    ``sgdlens/nonfinite_steps`` and (with :func:`attach`) ``sgdlens/loss``
    (``sgdlens/weight_dist[/<layer>]`` with ``lenses.WeightNorms()`` or ``lenses.full()``).
    The phase strings stay in ``callback.monitor.history`` and the sinks.

    Args:
        log_every: optimizer steps between records; ``None`` for the Trainer's logging
            interval.
        prefix: prepended to every key added to the logs.
        print_events: print each phase event and loss spike once.
        **monitor_kwargs: any other :class:`~sgdlens.PhaseMonitor` argument (``lenses``,
            ``sinks``, ``detector``, ``trace_steps``), checked here. ``sinks`` get the raw
            records on the main process; they are flushed, not closed, when training ends.

    Example:
        >>> callback = PhaseMonitorCallback(log_every=10)  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])  # doctest: +SKIP
        >>> attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        log_every: int | None = None,
        prefix: str = "sgdlens/",
        print_events: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        kwargs = dict(monitor_kwargs, log_every=log_every)
        self._sinks = check_callback_args("PhaseMonitorCallback", prefix, print_events, kwargs)
        self._kwargs = kwargs
        self.prefix = prefix
        self.print_events = print_events
        self.monitor: PhaseMonitor | None = None
        self._adopted = False
        self._latest: Record | None = None
        self._losses: list[Tensor] = []
        self._resume_from: str | None = None
        self._accelerator: Any = None  # set by attach(): its GradScaler, under fp16
        self._placed = False  # attach() put it before report_to and a _Quiet before the printer
        self._zero = True

    # -- attaching ---------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()
        optimizer, model = kwargs.get("optimizer"), kwargs.get("model")
        if optimizer is None:
            warn("PhaseMonitorCallback: the Trainer passed no optimizer")
            return
        self._zero = bool(state.is_world_process_zero)
        self._latest, self._losses = None, []
        monitor_kwargs = dict(self._kwargs)
        monitor_kwargs.setdefault("log_every", max(1, int(state.logging_steps or 1)))
        try:
            self.monitor = PhaseMonitor.of(optimizer)
            self.monitor.sinks.append(self._receive)
            self._adopted = True
        except LookupError:
            module = model if isinstance(model, torch.nn.Module) else None
            # resuming, the Trainer has loaded the optimizer's state already, the monitor's
            # comes next (_resume): a lens reading the optimizer's buffers waits for it
            with resuming() if state.global_step > 0 else contextlib.nullcontext():
                self.monitor = PhaseMonitor(
                    optimizer, model=module, sinks=[self._receive], **monitor_kwargs
                )
            self._adopted = False
        # under fp16 (the accelerator is known through attach())
        share_grad_scaler(self.monitor, getattr(self._accelerator, "scaler", None))
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args: Any, state: Any) -> None:
        if self.monitor is None:
            return
        folders = []
        if isinstance(self._resume_from, str):
            folders.append(self._resume_from)
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.append(args.resume_from_checkpoint)
        folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                saved = torch.load(path, map_location=self.monitor.view.device, weights_only=True)
                self.monitor.load_state_dict(saved)
                return
        warn(
            f"PhaseMonitorCallback: training resumes at step {state.global_step} but no "
            f"{STATE_FILE} was found in {folders}; the monitor starts afresh",
        )

    def _detach(self) -> None:
        if self.monitor is not None and self._receive in self.monitor.sinks:
            if self._adopted:
                self.monitor.sinks.remove(self._receive)
            else:
                self.monitor.close()
        for sink in self._sinks:
            if callable(getattr(sink, "flush", None)):
                sink.flush()  # type: ignore[attr-defined]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()

    # -- checkpoints -------------------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer._save_checkpoint has just written <output_dir>/checkpoint-<global_step>/
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.monitor is None or not state.is_world_process_zero or not os.path.isdir(folder):
            return
        torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    # -- the loss, before the step -------------------------------------------------------------

    def _on_loss(self, loss: Any) -> None:
        if self.monitor is not None and isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        losses, self._losses = self._losses, []
        if self.monitor is not None and losses:
            # training_step already divides by the accumulation steps: the sum is the step's
            # loss, the number the Trainer itself logs as "loss"
            self.monitor.observe(loss=torch.stack(losses).sum())

    # -- records into the logs -----------------------------------------------------------------

    def _receive(self, record: Record) -> None:
        if not self._zero:
            return
        if "event" in record:
            if self.print_events:
                print(describe_event(record))
        elif "header" not in record:  # the run's header goes to the sinks only
            self._latest = record
        for sink in self._sinks:
            try:
                sink(record)
            except Exception as e:  # a broken sink must not stop training
                warn(f"sink {sink!r} failed: {e!r}")

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        record, self._latest = self._latest, None
        if record is None or logs is None:
            return
        metrics = numeric_metrics(record, self.prefix)
        if self._placed:  # seen by the report_to integrations; _Quiet hides them from the printer
            logs.update(metrics)
        if state.log_history and isinstance(state.log_history[-1], dict):
            state.log_history[-1].update(metrics)  # Trainer.log appended a copy before on_log

    # -- placement -----------------------------------------------------------------------------

    def attach(self, trainer: Any) -> PhaseMonitorCallback:
        """Place this callback in ``trainer`` where its keys reach ``report_to`` (see module)."""
        handler = trainer.callback_handler
        callbacks = handler.callbacks
        self._accelerator = getattr(trainer, "accelerator", None)
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[-1] + 1 if flow else 0, self)
        for cb in [cb for cb in callbacks if isinstance(cb, _Quiet) and cb.owner is self]:
            callbacks.remove(cb)
        printers = [i for i, cb in enumerate(callbacks) if isinstance(cb, _PRINTERS)]
        callbacks.insert(printers[0] if printers else len(callbacks), _Quiet(self))
        self._placed = True
        if not getattr(trainer.training_step, "_sgdlens", False):
            original = trainer.training_step

            @functools.wraps(original)
            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = original(*args, **kwargs)
                for cb in trainer.callback_handler.callbacks:
                    if isinstance(cb, PhaseMonitorCallback):
                        cb._on_loss(loss)
                return loss

            training_step._sgdlens = True  # type: ignore[attr-defined]
            trainer.training_step = training_step

            original_train = trainer.train

            @functools.wraps(original_train)
            def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
                for cb in trainer.callback_handler.callbacks:
                    if isinstance(cb, PhaseMonitorCallback):
                        cb._resume_from = resume_from_checkpoint
                return original_train(resume_from_checkpoint, *args, **kwargs)

            trainer.train = train
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs.items())
        return f"PhaseMonitorCallback({args}{', ' if args else ''}prefix={self.prefix!r})"


def attach(
    trainer: Any, callback: PhaseMonitorCallback | None = None, **kwargs: Any
) -> PhaseMonitorCallback:
    """Add a :class:`PhaseMonitorCallback` to a ``transformers.Trainer`` where it works fully.

    Uses ``callback`` if given, else the ``PhaseMonitorCallback`` already in the trainer's
    callbacks, else a new one built from ``kwargs``. The callback goes right after
    ``DefaultFlowCallback`` (before the ``report_to`` integrations), and
    ``trainer.training_step`` is wrapped to pass each batch's loss to the monitor.

    Args:
        trainer: a ``transformers.Trainer`` (before ``train()``).
        callback: the callback to place; ``None`` to find or build one.
        **kwargs: arguments for a new :class:`PhaseMonitorCallback` (only when none exists).

    Returns:
        The placed callback; ``callback.monitor`` is set when training begins.

    Example:
        >>> callback = attach(trainer, log_every=10)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> callback.monitor.phase  # doctest: +SKIP
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not callable(getattr(trainer, "training_step", None)):
        raise TypeError(
            f"attach(trainer=...) needs a transformers.Trainer, got {type(trainer).__name__}; "
            f"build the Trainer first, then attach(trainer)"
        )
    if callback is not None and not isinstance(callback, PhaseMonitorCallback):
        raise TypeError(
            f"attach(callback=...) must be a PhaseMonitorCallback or None, got {callback!r}"
        )
    existing = [cb for cb in handler.callbacks if isinstance(cb, PhaseMonitorCallback)]
    if callback is None and existing:
        if kwargs:
            raise ValueError(
                f"attach(trainer, {', '.join(kwargs)}=...): the trainer already has a "
                f"PhaseMonitorCallback; pass no arguments to place it, or build it with them"
            )
        callback = existing[0]
    if callback is None:
        callback = PhaseMonitorCallback(**kwargs)
    elif kwargs:
        raise ValueError(
            f"attach(trainer, callback, {', '.join(kwargs)}=...): give the arguments to "
            f"PhaseMonitorCallback(...) instead"
        )
    return callback.attach(trainer)


class _Quiet(TrainerCallback):
    """Placed by :func:`attach` just before the Trainer's console printer (``ProgressCallback``
    or ``PrinterCallback``): takes the sgdlens keys out of ``logs`` once the ``report_to``
    integrations have them, so the console line stays the Trainer's own. They stay in
    ``state.log_history``."""

    def __init__(self, owner: PhaseMonitorCallback) -> None:
        self.owner = owner

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if logs is not None and self.owner.prefix:
            for key in [k for k in logs if k.startswith(self.owner.prefix)]:
                del logs[key]
