"""TensorBoardSink: records as TensorBoard scalars (extra: ``pip install "sgdlens[tensorboard]"``).

This module imports tensorboard only when a sink is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sgdlens.records import Value

__all__ = ["TensorBoardSink"]

_SKIP = ("step", "time")


class TensorBoardSink:
    """Write records to TensorBoard event files through ``torch.utils.tensorboard``.

    Every numeric key of a record becomes a scalar at ``record["step"]`` (the optimizer step)
    with the record's ``time`` as wall time; ``step`` and ``time`` themselves are not written.
    TensorBoard groups tags by their first ``/`` part, so ``grad_snr/fc1`` lands beside
    ``grad_snr`` in the ``grad_snr`` section. The phase strings (``phase``,
    ``phase/<layer>``) are not scalars and are skipped in metric records; instead each event
    record (phase change or loss spike) becomes one line of text under the tag ``events``,
    e.g. ``step 120: fc2 drift -> diffusion``, and the run's header a table of text under the
    tag ``run``. The writer is flushed after every record.

    Args:
        log_dir: the run folder (created), as for ``SummaryWriter(log_dir=...)``; point
            ``tensorboard --logdir`` at it or a parent.
        prefix: prepended to every tag, e.g. ``"sgdlens/"`` beside a framework's own scalars.
        events: write event records as text (``False``: skip them).

    Example:
        >>> from sgdlens.sinks import TensorBoardSink
        >>> sink = TensorBoardSink("runs/tb/exp1")  # doctest: +SKIP
        >>> monitor = PhaseMonitor(opt, model=model, sinks=[sink])  # doctest: +SKIP
        >>> # ... train ..., then: tensorboard --logdir runs/tb
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], *, prefix: str = "", events: bool = True
    ) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(
                f"TensorBoardSink(log_dir=...) must be a str or os.PathLike, got "
                f"{type(log_dir).__name__} ({log_dir!r}); pass a folder such as 'runs/tb/exp1'"
            )
        if not isinstance(prefix, str):
            raise TypeError(
                f"TensorBoardSink(prefix=...) must be a str, got {prefix!r}; e.g. 'sgdlens/'"
            )
        if not isinstance(events, bool):
            raise TypeError(f"TensorBoardSink(events=...) must be a bool, got {events!r}")
        self.log_dir = os.fspath(log_dir)
        if os.path.isfile(self.log_dir):
            raise ValueError(
                f"TensorBoardSink(log_dir={self.log_dir!r}) is a file; pass a folder for the "
                f"event files, e.g. {self.log_dir + '_tb'!r}"
            )
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                'TensorBoardSink needs tensorboard: pip install "sgdlens[tensorboard]"'
            ) from e
        self.prefix = prefix
        self.events = events
        self.writer: Any = SummaryWriter(log_dir=self.log_dir)
        self._closed = False

    def __call__(self, record: Mapping[str, Value]) -> None:
        if self._closed:
            raise ValueError(f"TensorBoardSink({self.log_dir!r}) is closed")
        step = int(record["step"])  # type: ignore[arg-type]
        wall = record.get("time")
        walltime = float(wall) if isinstance(wall, (int, float)) else None
        if "header" in record:
            if self.events:
                self.writer.add_text(self.prefix + "run", _header_text(record), step)
        elif "event" in record:
            if self.events:
                self.writer.add_text(
                    self.prefix + "events", _event_text(record), step, walltime=walltime
                )
        else:
            for key, value in record.items():
                if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                self.writer.add_scalar(self.prefix + key, value, step, walltime=walltime)
        self.writer.flush()

    def flush(self) -> None:
        if not self._closed:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        if not self._closed:
            self.writer.close()
            self._closed = True

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!r})"


def _header_text(record: Mapping[str, Value]) -> str:
    from sgdlens.sinks import flat_header

    return "\n".join(f"    {k}: {v}" for k, v in flat_header(record).items())


def _event_text(record: Mapping[str, Value]) -> str:
    layer = record.get("layer") or "model"
    if record.get("event") == "spike":
        return f"step {record['step']}: loss spike ({layer})"
    return f"step {record['step']}: {layer} {record.get('old')} -> {record.get('event')}"
