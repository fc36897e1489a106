"""Which steps the lenses read: all of them, or a sample under ``overhead_budget=``.

With ``PhaseMonitor(overhead_budget=b)`` the monitor times (host clock, no device
synchronisation) everything its hooks do over each log interval: the steps the lenses read,
the steps they skip, and the log point's own work (scheduled probes left out: their own
``probe_budget`` governs them); the rest of the interval (from the first step after a log
point to the next log point, so that work between a log point and the next step, such as an
evaluation, is not taken for training) is the training step itself. At each
log point it sets ``every`` so that the whole monitor costs about ``b`` of a step: with ``r``
the time of a read step, ``s`` that of a skipped one and ``l`` the log work per step, it reads
a fraction ``f`` of the steps with ``f·r + (1 − f)·s + l ≤ b·step``.
The lenses then read every ``every``-th step, every log step, and every step a lens declares
due (``GradSNR`` closing a window), and at least 4 steps per log interval. Under
torch.distributed every rank takes rank 0's ``every`` (one broadcast per log point), so that
the ranks read the same steps. Lenses that accumulate through hooks (``every_step = True``:
the per-sample and micro-batch estimators) still update at every step.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

from sgdlens import _dist
from sgdlens._warn import warn

__all__ = ["SKIPPED", "Sampler"]

#: the pre-hook's mark for a step the lenses do not read
SKIPPED: Any = object()


class Sampler:
    """``every`` and the timing it is set from (see the module docstring)."""

    def __init__(self, budget: float | None, log_every: int) -> None:
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget <= 1
        ):
            raise ValueError(
                f"PhaseMonitor(overhead_budget={budget!r}) must be None (read every step) or a "
                f"fraction of a step in (0, 1], e.g. 0.03"
            )
        self.budget = None if budget is None else float(budget)
        #: at most this many steps apart, so that a log interval holds at least 4 read steps
        self.limit = max(1, log_every // 4)
        self.every = 1
        self._t0 = 0.0
        self._step_time = 0.0  # this step's time in the pre-step hook
        self._mark: float | None = None  # start of the current log interval
        self._busy = 0.0  # time in the per-step hook work this interval
        self._read_time = 0.0  # of which at the steps the lenses read
        self._reads = 0
        self._steps = 0
        self._ended: float | None = None  # when the last step's per-step work ended
        self._excluded = 0.0  # time this interval that is neither the monitor's nor a step's
        self.due: list[Any] = []  # the lenses that declare steps they must read (``due``)
        self.warned = False  # that the budget cannot be met (once)

    def reads(self, index: int, lenses: Sequence[Any], states: Sequence[Any]) -> bool:
        """Whether the lenses read step ``index`` (log steps are read regardless)."""
        if self.every == 1 or index % self.every == 0:
            return True
        return any(lenses[i].due(states[i], index) for i in self.due)

    def begin(self) -> None:
        """A hook starts (the pre-step or the post-step hook of one step)."""
        if self.budget is not None:
            self._t0 = time.perf_counter()
            if self._mark is None:  # a step after a log point starts the next interval
                self._mark = self._t0

    def pause(self) -> None:
        """The pre-step hook ends; the step's time in the hooks so far is kept."""
        if self.budget is not None:
            self._step_time += time.perf_counter() - self._t0

    def end(self, read: bool) -> None:
        """The post-step hook's per-step work ends (before any log-point work)."""
        if self.budget is None:
            return
        self._ended = time.perf_counter()
        spent = self._step_time + self._ended - self._t0
        self._step_time = 0.0
        self._busy += spent
        self._steps += 1
        if read:
            self._read_time += spent
            self._reads += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of this log interval out of the accounting (scheduled probes:
        ``probe_budget`` governs them)."""
        self._excluded += seconds

    def adapt(self) -> None:
        """At a log point, after its work: set ``every`` from the interval that ends here."""
        if self.budget is None:
            return
        now = time.perf_counter()
        if self._mark is not None and self._reads and self._steps:
            log = (now - self._ended if self._ended is not None else 0.0) - self._excluded
            n, skips = self._steps, self._steps - self._reads
            # the interval runs from the first step's pre-step hook to here: the steps after
            # the first whole, the first from its optimizer step on (time between a log point
            # and the next step, such as an evaluation, is not a training step's)
            spent = now - self._mark - self._busy - log - self._excluded
            bare = spent / max(1, n - 1)  # a step alone
            read = self._read_time / self._reads
            skip = (self._busy - self._read_time) / skips if skips else 0.0
            spare = self.budget * bare - skip - log / n  # per step, for the reads
            if bare > 0:
                want = math.ceil((read - skip) / spare) if spare > 0 else self.limit
                self.every = max(1, min(self.limit, want))
                self._check_floor(read, skip, log / n, bare)
        # every rank reads the same steps (under FSDP a read step holds a collective): rank 0's
        self.every = int(_dist.broadcast_object(self.every))
        self._mark = None  # the next interval starts at its first step
        self._busy = self._read_time = self._excluded = 0.0
        self._reads = self._steps = 0

    def _check_floor(self, read: float, skip: float, log: float, bare: float) -> None:
        """Warn once when even the sparsest sampling allowed (every ``limit``-th step) costs
        more than the budget: the user can then raise ``log_every`` or the budget."""
        assert self.budget is not None
        floor = (read + (self.limit - 1) * skip) / self.limit + log
        if floor > self.budget * bare and not self.warned:
            self.warned = True
            warn(
                f"PhaseMonitor(overhead_budget={self.budget}) cannot be met here: even reading "
                f"one step in {self.limit} (the fewest it allows: 4 per log interval) its "
                f"hooks take about {floor / bare:.1%} of a step, {log / bare:.1%} of it the log "
                f"point's own work (observe() and the optimizer's hook dispatch come on top); "
                f"raise log_every (fewer log points, sparser reads) or the budget",
            )
