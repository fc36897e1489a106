"""Lightning: a ``Callback`` that watches every optimizer the ``Trainer`` builds.

Works with both distributions of Lightning: ``lightning`` (``lightning.pytorch``) and
``pytorch_lightning``. The callback derives from the ``Callback`` base of each one installed,
so either ``Trainer`` accepts it. Needs the extra: ``pip install "sgdlens[lightning]"``.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> from sgdlens.integrations.lightning import PhaseMonitorCallback  # doctest: +SKIP
    >>> callback = PhaseMonitorCallback(log_every=20)  # doctest: +SKIP
    >>> L.Trainer(max_epochs=5, callbacks=[callback]).fit(module, loader)  # doctest: +SKIP
    >>> callback.monitor.phase  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sgdlens._warn import warn
from sgdlens.integrations import (
    check_callback_args,
    describe_event,
    monitor_kwargs_for,
    numeric_metrics,
    share_grad_scaler,
)
from sgdlens.monitor import PhaseMonitor, unwrap_optimizer
from sgdlens.records import Record

__all__ = ["PhaseMonitorCallback"]

_STATE_VERSION = 1


def _callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of every installed Lightning distribution."""
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            'sgdlens.integrations.lightning needs Lightning: pip install "sgdlens[lightning]" '
            "(or pip install pytorch-lightning)"
        )
    return tuple(bases)


# One class that is a Callback of both distributions (when both are installed), so that
# ``lightning.Trainer`` and ``pytorch_lightning.Trainer`` both accept it.
_Base: Any = type("_LightningCallback", _callback_bases(), {})


class _Relay:
    """The sink the callback gives each monitor: buffers records for the loggers, prints events
    and forwards to the user's sinks (rank 0 only). No ``close``: the monitor does not close it."""

    def __init__(self, owner: PhaseMonitorCallback, index: int) -> None:
        self.owner = owner
        self.index = index

    def __call__(self, record: Record) -> None:
        self.owner._receive(self.index, record)

    def __repr__(self) -> str:
        return f"PhaseMonitorCallback relay (optimizer {self.index})"


class PhaseMonitorCallback(_Base):
    """Watch every optimizer a Lightning ``Trainer`` builds with a :class:`~sgdlens.PhaseMonitor`.

    At ``on_fit_start`` (after the strategy has built the optimizers and moved the model) the
    callback attaches one monitor to each optimizer in ``trainer.optimizers``, naming layers
    after the LightningModule's modules. It then

    * feeds the training loss: the tensor Lightning passes to ``on_before_backward`` (undoing
      the gradient-accumulation division and the 16-mixed loss scale), handed to the monitor of
      the optimizer that steps next in ``on_before_optimizer_step`` — before the step, so a record
      averages exactly the losses of the batches that drove its steps;
    * logs each record to ``trainer.loggers`` (numeric keys only, under ``prefix``) from rank 0
      only, at the step index Lightning's own ``self.log`` uses for the same batch
      (``trainer.global_step - 1`` with one optimizer): on a batch whose ``self.log`` metrics
      Lightning sends to its loggers (``log_every_n_steps``) through ``pl_module.log_dict`` in
      ``on_train_batch_end``, so they join the module's metrics in one ``log_metrics`` call (one
      ``CSVLogger`` row); on any other batch through each logger's ``log_metrics`` at that step
      index. It prints each phase event once (the run's header record goes to ``sinks`` only);
    * saves the monitors' state in Lightning checkpoints (``state_dict``/``load_state_dict``),
      so ``trainer.fit(..., ckpt_path=...)`` continues the step count and every running
      statistic;
    * closes the monitors (removes every hook) when fitting ends or fails.

    Gradient accumulation, precision plugins and manual optimisation need nothing special: the
    monitor's hooks sit on the real ``torch.optim`` optimizer, so they fire on real optimizer
    steps only (not on accumulating batches, not on a step the 16-mixed ``GradScaler`` skips).
    With several optimizers (manual optimisation) every optimizer has its own monitor and its
    keys carry ``opt<i>/`` after the prefix. An optimizer that already has a monitor (for
    example ``PhaseMonitor.wrap`` in ``configure_optimizers``) is adopted, not replaced.

    Logged keys (with the default prefix; ``<layer>`` is a layer as ``layers=`` groups them,
    a module name such as ``net.0`` for small models): ``sgdlens/grad_snr``,
    ``sgdlens/grad_snr/<layer>``, ``sgdlens/grad_mean[/<layer>]``,
    ``sgdlens/grad_std[/<layer>]``, ``sgdlens/grad_norm[/<layer>]``,
    ``sgdlens/weight_norm[/<layer>]``, ``sgdlens/update_size[/<layer>]``,
    ``sgdlens/update_ratio[/<layer>]``, ``sgdlens/nonfinite_steps`` and ``sgdlens/loss`` —
    whatever numeric keys the lenses produce (``sgdlens/weight_dist[/<layer>]`` with
    ``lenses.WeightNorms()`` or ``lenses.full()``).
    Phase names are strings and do not go to loggers; they are printed as events, kept in
    ``callback.monitor.history`` and written by the ``sinks`` (e.g. ``JSONLSink``).

    Args:
        log_every: optimizer steps between records; ``None`` (default) for the Trainer's
            ``log_every_n_steps``.
        prefix: prepended to every key sent to the loggers.
        print_events: print each phase event and loss spike once (rank 0).
        **monitor_kwargs: any other :class:`~sgdlens.PhaseMonitor` argument (``lenses``,
            ``sinks``, ``detector``, ``trace_steps``), checked here. ``sinks`` get the raw records
            (plus ``"optimizer": i`` with several optimizers) on rank 0; they are flushed, not
            closed, when fitting ends.

    Attributes:
        monitors: one monitor per optimizer of the current (or last) fit; their ``history``
            stays readable after ``fit`` returns.

    Example:
        >>> import lightning as L  # doctest: +SKIP
        >>> sink = JSONLSink("runs/a.jsonl")  # doctest: +SKIP
        >>> cb = PhaseMonitorCallback(log_every=10, sinks=[sink])  # doctest: +SKIP
        >>> L.Trainer(max_steps=200, callbacks=[cb]).fit(module, loader)  # doctest: +SKIP
        >>> cb.monitor.phase, cb.monitor.history["grad_snr"]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        log_every: int | None = None,
        prefix: str = "sgdlens/",
        print_events: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs = dict(monitor_kwargs, log_every=log_every)
        self._sinks = check_callback_args("PhaseMonitorCallback", prefix, print_events, kwargs)
        self._kwargs = kwargs  # validated; without sinks, log_every only when given
        self.prefix = prefix
        self.print_events = print_events
        self.monitors: list[PhaseMonitor] = []
        self._adopted: list[bool] = []
        self._index: dict[int, int] = {}
        self._losses: list[Tensor] = []
        self._buffer: list[tuple[int, Record]] = []
        self._logged: set[str] = set()  # keys sent through pl_module.log at the last batch
        self._pending_state: dict[str, Any] | None = None
        self._attached = False
        self._zero = True

    @property
    def monitor(self) -> PhaseMonitor:
        """The monitor of the first (usually the only) optimizer."""
        if not self.monitors:
            raise LookupError(
                "PhaseMonitorCallback.monitor: no monitor yet; it is attached when "
                "trainer.fit(...) starts"
            )
        return self.monitors[0]

    # -- attaching -------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        self._zero = bool(trainer.is_global_zero)
        kwargs = dict(self._kwargs)
        kwargs.setdefault("log_every", max(1, int(getattr(trainer, "log_every_n_steps", 50))))
        self.monitors, self._adopted, self._index = [], [], {}
        self._losses, self._buffer, self._logged = [], [], set()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            warn(
                "PhaseMonitorCallback: the Trainer built no optimizer (configure_optimizers "
                "returned none); nothing to monitor",
            )
        for i, opt in enumerate(optimizers):
            real = unwrap_optimizer(opt)
            relay = _Relay(self, i)
            try:
                monitor = PhaseMonitor.of(real)
                monitor.sinks.append(relay)
                adopted = True
            except LookupError:
                monitor = PhaseMonitor(
                    real, model=pl_module, sinks=[relay], **monitor_kwargs_for(kwargs, i)
                )
                adopted = False
            self.monitors.append(monitor)
            self._adopted.append(adopted)
            self._index[id(real)] = i
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        for monitor in self.monitors:
            share_grad_scaler(monitor, scaler)  # under 16-mixed
        self._attached = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    def _detach(self) -> None:
        if self._attached:
            for monitor, adopted in zip(self.monitors, self._adopted):
                if adopted:
                    monitor.sinks[:] = [s for s in monitor.sinks if not isinstance(s, _Relay)]
                else:
                    monitor.close()
        self._attached = False
        for sink in self._sinks:
            if callable(getattr(sink, "flush", None)):
                sink.flush()  # type: ignore[attr-defined]

    # -- the loss, before the step -------------------------------------------------------------

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if not self.monitors or not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        value = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # 16-mixed: the loss arrives scaled
            scale = getattr(scaler, "_scale", None)  # on device; get_scale() would sync
            value = value / (
                scale.to(value.device) if isinstance(scale, Tensor) else scaler.get_scale()
            )
        if pl_module.automatic_optimization:  # Lightning divided it by accumulate_grad_batches
            value = value * trainer.accumulate_grad_batches
        self._losses.append(value)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        index = self._index.get(id(unwrap_optimizer(optimizer)))
        if index is None:
            return
        for value in losses:
            self.monitors[index].observe(loss=value)

    # -- records to the loggers ----------------------------------------------------------------

    def _receive(self, index: int, record: Record) -> None:
        if not self._zero:
            return
        several = len(self.monitors) > 1
        if "event" in record:
            if self.print_events:
                print(describe_event(record, f"optimizer {index}" if several else ""))
        elif "header" not in record:  # the run's header goes to the sinks only
            self._buffer.append((index, record))
        out = dict(record, optimizer=index) if several else record
        for sink in self._sinks:
            try:
                sink(out)
            except Exception as e:  # a broken sink must not stop training
                warn(f"sink {sink!r} failed: {e!r}")

    def _flush(self, trainer: Any, pl_module: Any = None) -> None:
        """Send the buffered records to the loggers. In ``on_train_batch_end`` of a batch whose
        ``self.log`` metrics Lightning sends to its loggers, they go through ``pl_module.log``
        and share Lightning's ``log_metrics`` call (one ``CSVLogger`` row); else straight to
        each logger at the step index Lightning uses for that batch."""
        self._forget_logged(trainer)
        buffer, self._buffer = self._buffer, []
        if not buffer or not trainer.is_global_zero or not trainer.loggers:
            return
        several = len(self.monitors) > 1
        step = _log_step(trainer)
        join = pl_module is not None and _lightning_logs_now(trainer, pl_module)
        direct: dict[str, Any] = {}  # the records of this batch, in one row where keys allow
        for index, record in buffer:
            prefix = f"{self.prefix}opt{index}/" if several else self.prefix
            metrics = numeric_metrics(record, prefix)
            if join and not self._logged & metrics.keys():
                # a second record of one optimizer in this batch (its keys already logged)
                # goes direct; float64 on the CPU: no rounding, no device copy
                values = {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
                pl_module.log_dict(
                    values, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True
                )
                self._logged |= metrics.keys()
                continue
            if direct.keys() & metrics.keys():  # a second record of one optimizer: a new row
                _log_metrics(trainer, direct, step)
                direct = {}
            direct.update(metrics)
        if direct:
            _log_metrics(trainer, direct, step)

    def _forget_logged(self, trainer: Any) -> None:
        """Lightning sends a ``self.log`` step value again at each of its later log steps of
        the epoch; mark the keys logged at an earlier batch as reset so that stale values do
        not reach the loggers."""
        if not self._logged:
            return
        results: Any = getattr(trainer, "_results", None) or {}  # Lightning's _ResultCollection
        for result in results.values():
            if result.meta.fx == "on_train_batch_end" and result.meta.name in self._logged:
                result.reset()
        self._logged = set()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush(trainer)
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The monitors' states (copies), saved by Lightning in every checkpoint."""
        if self.monitors:
            return {
                "version": _STATE_VERSION,
                "monitors": [copy.deepcopy(m.state_dict()) for m in self.monitors],
            }
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the monitors from a checkpoint (applied when the monitors attach)."""
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION or "monitors" not in state_dict:
            raise ValueError(
                "PhaseMonitorCallback.load_state_dict(state_dict=...) needs a dict from "
                f"PhaseMonitorCallback.state_dict() (version {_STATE_VERSION}); got keys "
                f"{sorted(state_dict)}"
            )
        if self._attached:  # some strategies restore after on_fit_start
            self._restore(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        saved = list(state["monitors"])
        if len(saved) != len(self.monitors):
            warn(
                f"PhaseMonitorCallback: the checkpoint holds {len(saved)} monitor states but "
                f"the Trainer built {len(self.monitors)} optimizers; the monitors start afresh",
            )
            return
        for monitor, monitor_state in zip(self.monitors, saved):
            monitor.load_state_dict(monitor_state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs.items())
        return f"PhaseMonitorCallback({args}{', ' if args else ''}prefix={self.prefix!r})"


def _log_metrics(trainer: Any, metrics: dict[str, Any], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _log_step(trainer: Any) -> int:
    """The step index Lightning's own ``self.log`` uses for the batch now ending (the count of
    batches that stepped before it), so sgdlens keys share the rows of the module's metrics;
    ``global_step - 1`` where that counter is missing."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else max(int(trainer.global_step) - 1, 0)


def _lightning_logs_now(trainer: Any, pl_module: Any) -> bool:
    """Whether Lightning sends this batch's ``self.log`` step metrics to its loggers after
    ``on_train_batch_end``: the test of ``_LoggerConnector.update_train_step_metrics``. ``False``
    where the Trainer lacks those internals."""
    try:
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return False
        return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
    except AttributeError:
        return False
