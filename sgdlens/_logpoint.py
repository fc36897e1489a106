"""The log point: the numbers of a record, the phases and probes, and the sinks."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sgdlens import _dist
from sgdlens._recording import event_record
from sgdlens._warn import warn
from sgdlens.header import header_once
from sgdlens.lenses.base import Step, reduce_sums
from sgdlens.records import Record

if TYPE_CHECKING:
    from sgdlens.monitor import PhaseMonitor

__all__ = ["emit", "log_point", "warn_once"]


def log_point(mon: PhaseMonitor, step: Step) -> None:
    """One record: the lenses' keys (their declared sums and the observed scalars added up over
    the ranks in one all-reduce), copied to the host at once; the detector's phases, the due
    probes, and the record and any events sent on."""
    values: dict[str, Tensor] = {}
    # every lens's cross-rank sums and the observed scalars: one all-reduce (see Lens.local)
    two = mon._declared  # which lenses split compute into local and finish
    local = [
        lens.local(state, step) if t else {} for lens, state, t in zip(mon.lenses, mon.states, two)
    ]
    observed = mon.tally.take_observed()
    sums = reduce_sums(mon.view, mon.lenses, local, observed[1])
    for lens, state, t, mine in zip(mon.lenses, mon.states, two, sums):
        values.update(lens.finish(state, step, mine) if t else lens.compute(state, step))
    values["nonfinite_steps"] = mon.tally.updates - mon.tally.finite_steps()
    if mon.sampler.budget is not None:
        values["update_every"] = torch.tensor(float(mon.sampler.every))
    for name, mean in mon.tally.means(*observed).items():
        if name in values:  # a lens that declares no metrics logged this name
            warn_once(
                mon,
                f"observe {name}",
                f"observe({name}=...) is also a lens key; "
                "the record keeps the lens's value: rename the observed one",
            )
        else:
            values[name] = mean
    dev, dt = mon.view.device, mon.view.dtype
    host = torch.stack([v.to(device=dev, dtype=dt) for v in values.values()]).tolist()
    numbers: dict[str, float] = dict(zip(values, host))
    record: Record = {"step": mon.step, "time": time.time(), **numbers}
    record["nonfinite_steps"] = int(numbers["nonfinite_steps"])
    events = mon.detector.update(record) if mon.detector is not None else []
    if mon.detector is not None:
        record.update(mon.detector.annotate(record))
    if mon.probes is not None and mon.model is not None:
        start = time.perf_counter()
        record.update(mon.probes.run(mon.step, bool(events), mon.model, mon.optimizer))
        mon.sampler.exclude(time.perf_counter() - start)  # probes have their own budget
    emit(mon, record)
    if events:
        trace = mon.tally.trace_lists()
        for event in events:
            emit(mon, event_record(event, trace))
            for callback in mon._callbacks:
                callback(event)


def warn_once(mon: PhaseMonitor, key: str, message: str) -> None:
    """Warn once per ``key`` for the life of the monitor."""
    if key not in mon._warned:
        mon._warned.add(key)
        warn(message)


def emit(mon: PhaseMonitor, record: Record) -> None:
    """Send ``record`` to every sink (rank 0's; the others keep their history), the run
    header first; a sink that raises is skipped with a warning."""
    header = header_once(mon)  # a run starts with its header record (sgdlens.header)
    if header is not None:
        emit(mon, header)
    sinks = mon.sinks if _dist.rank_and_size()[0] == 0 else mon.sinks[:1]
    for sink in sinks:
        try:
            sink(record)
        except Exception as e:  # a broken sink must not stop training
            warn_once(mon, repr(sink), f"sink {sink!r} failed and is skipped: {e!r}")
