"""Where records go.

A sink is anything callable with one record (a flat ``dict``). It may also have ``flush()`` and
``close()``; the monitor calls them when it flushes and closes. Built in:

* :class:`sgdlens.records.History` – in memory (every monitor keeps one as ``monitor.history``);
* :class:`JSONLSink` – one JSON object per line, appended and flushed per record;
* :class:`TensorBoardSink` – TensorBoard event files (extra ``sgdlens[tensorboard]``);
* :class:`WandbSink` – a Weights & Biases run (extra ``sgdlens[wandb]``);
* :class:`MLflowSink` – an MLflow run (extra ``sgdlens[mlflow]``).

The tracker sinks live in their own modules, imported on first use, so ``import sgdlens.sinks``
imports none of tensorboard, wandb or mlflow. Each takes the three kinds of record the monitor
emits: the run's header (see :mod:`sgdlens.header`) as the tracker's configuration or
parameters, metric records as scalars at the record's ``step``, and event records (phase
changes, loss spikes) as the tracker's alerts, tags or text.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TextIO, runtime_checkable

from sgdlens._warn import warn
from sgdlens.records import History, Value, to_json_line

if TYPE_CHECKING:  # at run time __getattr__ below imports them on first use
    from sgdlens.sinks.mlflow import MLflowSink
    from sgdlens.sinks.tensorboard import TensorBoardSink
    from sgdlens.sinks.wandb import WandbSink

__all__ = ["History", "JSONLSink", "MLflowSink", "Sink", "TensorBoardSink", "WandbSink"]
_LAZY = {
    "TensorBoardSink": "sgdlens.sinks.tensorboard",
    "WandbSink": "sgdlens.sinks.wandb",
    "MLflowSink": "sgdlens.sinks.mlflow",
}


@runtime_checkable
class Sink(Protocol):
    """Anything that takes a record."""

    def __call__(self, record: Mapping[str, Value]) -> Any: ...


def check_sinks(sinks: Any, owner: str) -> list[Any]:
    """``sinks`` as a list after checking that each is callable (errors name ``owner``)."""
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise TypeError(
            f"{owner}(sinks=...) must be a list of callables, got {sinks!r}; "
            f"e.g. sinks=[JSONLSink('run.jsonl')]"
        )
    sink_list = list(sinks)
    for i, sink in enumerate(sink_list):
        if not callable(sink):
            raise TypeError(
                f"{owner}(sinks=...)[{i}] is {type(sink).__name__} ({sink!r}), not callable; "
                f"a sink is called with each record, e.g. JSONLSink('run.jsonl') or print"
            )
    return sink_list


class JSONLSink:
    """Append records to a JSON-lines file, one object per line, flushed after each record.

    The file is opened in append mode at the first record, so a resumed run continues the same
    file and nothing already written is lost (and a process that never writes, such as a
    non-zero rank under torch.distributed, creates no file). Parent folders are created. Every
    line carries the run id under ``"run"`` (the id of the monitor's header record, else one the
    sink makes up), so runs appended to one file, or two monitors writing to it at once, are
    told apart by :func:`sgdlens.load` and :func:`sgdlens.runs`. If the file ends in a torn
    line (a crash mid-write), the first write starts a new line, so the torn record stays alone
    on its line and is skipped on reading.

    A record that cannot be written (disk full, file removed) is counted in ``dropped`` and
    warned about at the 1st, 10th, 100th, ... failure and at ``close()``; training goes on.

    Args:
        path: the ``.jsonl`` file to append to.
        fsync: also ``os.fsync`` after each record (survives a machine crash, costs a disk sync).

    Raises:
        ValueError: ``path`` is empty or a folder.
        PermissionError: the file or its folder is not writable.

    Example:
        >>> sink = JSONLSink("runs/exp1.jsonl")  # doctest: +SKIP
        >>> monitor = PhaseMonitor(opt, model=model, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"JSONLSink(path=...) must be a str or os.PathLike, got {type(path).__name__} "
                f"({path!r}); pass a file name such as 'runs/exp1.jsonl'"
            )
        if not isinstance(fsync, bool):
            raise TypeError(f"JSONLSink(fsync=...) must be a bool, got {fsync!r}")
        self.path = os.fspath(path)
        if not self.path.strip():
            raise ValueError(
                f"JSONLSink(path={self.path!r}) is empty; pass a file name such as "
                f"'runs/exp1.jsonl'"
            )
        if os.path.isdir(self.path):
            raise ValueError(
                f"JSONLSink(path={self.path!r}) is a folder; pass a file name inside it, "
                f"e.g. {os.path.join(self.path, 'run.jsonl')!r}"
            )
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        try:  # fail here, not at the first record
            if os.path.exists(self.path):
                open(self.path, "a").close()
            else:
                fd, probe = tempfile.mkstemp(dir=folder or ".", suffix=".sgdlens")
                os.close(fd)
                os.remove(probe)
        except OSError as e:
            raise PermissionError(
                f"JSONLSink(path={self.path!r}) is not writable ({e.strerror or e}); pass a "
                f"path you can write to"
            ) from None
        self.fsync = fsync
        self.dropped = 0
        self._run: str | None = None
        self._file: TextIO | None = None  # opened at the first record
        self._closed = False

    def __call__(self, record: Mapping[str, Value]) -> None:
        if self._closed:
            raise ValueError(f"JSONLSink({self.path!r}) is closed")
        if "header" in record and isinstance(record.get("run"), str):
            self._run = str(record["run"])
        elif self._run is None:
            from sgdlens.header import new_run_id

            self._run = new_run_id()
        line = to_json_line(record)
        if "run" not in record:
            line = f'{line[:-2]},"run":"{self._run}"}}\n'
        try:
            if self._file is None:
                self._file = self._open()
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as e:
            self.dropped += 1
            if math.log10(self.dropped).is_integer():
                warn(
                    f"JSONLSink({self.path!r}) could not write a record ({e}); "
                    f"{self.dropped} record(s) dropped so far",
                )

    def _open(self) -> TextIO:
        f = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a torn last line before appending
            f.flush()
        finally:
            f.close()
        return open(self.path, "a", encoding="utf-8")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self.dropped and not self._closed:
            warn(
                f"JSONLSink({self.path!r}) dropped {self.dropped} record(s) it could not write",
            )
        self._closed = True
        if self._file is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"JSONLSink({self.path!r})"


def numeric(record: Mapping[str, Value], prefix: str = "") -> dict[str, float]:
    """A metric record's numbers under ``prefix`` (``step``, ``time``, text and lists dropped)."""
    return {
        prefix + k: float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flat_header(header: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A header record as flat ``{key: scalar}`` (``param_groups.0.lr``), for trackers' configs;
    the record schema (``schema``, what each key means) is left out.

    Example:
        >>> flat_header({"run": "r1", "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99]}]})
        {'run': 'r1', 'param_groups.0.lr': 0.1, 'param_groups.0.betas': '[0.9, 0.99]'}
    """
    out: dict[str, Any] = {}
    for k, v in header.items():
        if k == "schema" and "header" in header:
            continue
        if isinstance(v, Mapping):
            out.update(flat_header(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                out.update(flat_header(x, f"{prefix}{k}.{i}."))
        elif isinstance(v, list):
            out[prefix + k] = str(v) if len(str(v)) <= 250 else f"[{len(v)} values]"
        else:
            out[prefix + k] = v
    return out


def event_text(record: Mapping[str, Value]) -> str:
    """One line for an event record, e.g. ``step 120: fc2 drift -> diffusion``."""
    layer = record.get("layer") or "model"
    if record.get("event") == "spike":
        return f"step {record.get('step')}: loss spike ({layer})"
    return f"step {record.get('step')}: {layer} {record.get('old')} -> {record.get('event')}"


def __getattr__(name: str) -> Any:
    # the tracker sinks live in their own modules so that a tracker is imported only on use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
