"""A probe: a measurement ``fn(model, optimizer) -> {key: number}`` and *when* to run it.

:class:`Probe` checks its arguments at construction and says which step it is next due at;
:class:`~sgdlens.probes.scheduled.ProbeScheduler` runs it there, within the monitor's budget.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sgdlens.schema import Key

__all__ = ["Probe", "ProbeFn"]

ProbeFn = Callable[[nn.Module, torch.optim.Optimizer], Mapping[str, float]]


class Probe:
    """A measurement the monitor runs on a schedule.

    Args:
        fn: ``fn(model, optimizer) -> {key: number}``; the keys go into the record.
        name: a name for messages and the checkpoint state.
        every: run at the first log point at or after every ``every`` optimizer steps.
        per_decade: run at log-spaced steps, this many per decade (10, 100, 1000, …).
        on_event: also run at a log point where the phase detector raised an event.
        state: a dict that ``fn`` keeps between runs (e.g. a warm start), saved in the
            monitor's checkpoint (``PhaseMonitor.state_dict``) and put back by
            ``load_state_dict``, so a resumed run continues as the uninterrupted one would.
        keys: the keys ``fn`` returns, as whole-model :class:`~sgdlens.schema.Key` s
            (``per_layer=False``), for the run header's schema; names alone are taken as
            undescribed keys on a log scale.
        check: ``check(model)`` raises TypeError/ValueError for a model ``fn`` cannot
            measure (a reference of another architecture, say); the scheduler calls it once,
            before the first run (at construction where it is given the model), and a probe
            it refuses is dropped from the schedule with one warning instead of failing at
            every log point.

    Example:
        >>> probe = Probe(lambda model, opt: {"w0": float(next(model.parameters())[0, 0])},
        ...               name="first-weight", every=100)
    """

    def __init__(
        self,
        fn: ProbeFn,
        *,
        name: str,
        every: int | None = None,
        per_decade: int | None = None,
        on_event: bool = False,
        state: dict[str, Any] | None = None,
        keys: Sequence[Key | str] = (),
        check: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Probe(fn=...) must be callable as fn(model, optimizer), got {fn!r}")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Probe(name={name!r}) must be a non-empty string without '/'")
        for arg, value in (("every", every), ("per_decade", per_decade)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            ):
                raise ValueError(f"Probe({arg}={value!r}) must be a positive int or None")
        if not isinstance(on_event, bool):
            raise TypeError(f"Probe(on_event=...) must be a bool, got {on_event!r}")
        if every is None and per_decade is None and not on_event:
            raise ValueError(
                f"Probe(name={name!r}) has no schedule: give every=, per_decade= or on_event=True"
            )
        if state is not None and not isinstance(state, dict):
            raise TypeError(
                f"Probe(state=...) must be a dict that fn keeps between runs, or None, got "
                f"{type(state).__name__}"
            )
        if check is not None and not callable(check):
            raise TypeError(f"Probe(check=...) must be callable as check(model), got {check!r}")
        self.fn, self.name, self.check = fn, name, check
        self.keys = tuple(k if isinstance(k, Key) else Key(k, per_layer=False) for k in keys)
        self.state: dict[str, Any] = {} if state is None else state
        self.every, self.per_decade, self.on_event = every, per_decade, on_event

    def __repr__(self) -> str:
        return (
            f"Probe({self.name!r}, every={self.every}, per_decade={self.per_decade}, "
            f"on_event={self.on_event})"
        )

    def next_after(self, step: int) -> float:
        """The first scheduled step strictly after ``step`` (``inf`` if none)."""
        nxt = math.inf
        if self.every is not None:
            nxt = (step // self.every + 1) * self.every
        if self.per_decade is not None:
            k = math.floor(self.per_decade * math.log10(step)) + 1 if step >= 1 else 0
            while (target := math.ceil(10 ** (k / self.per_decade))) <= step:
                k += 1
            nxt = min(nxt, target)
        return nxt
