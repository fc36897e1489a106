"""What the monitor tallies between records, on the device: steps, observed scalars, a trace."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sgdlens import _dist
from sgdlens.lenses.base import ParamView, Step
from sgdlens.phase import PhaseEvent
from sgdlens.records import Record


class Tally:
    """The monitor's own running counts, kept on the parameters' device (no host reads
    between log points) and saved in its checkpoints.

    Attributes:
        updates: steps the lenses read (all of them unless ``overhead_budget`` samples).
        finite: how many of those had finite gradients (0-d tensor; where the step's flag is
            a host bool, the CPU, the count is kept on the host and folded in when read:
            :meth:`finite_steps`).
        trace: ring of (last observed loss, squared gradient norm), one row per step read;
            ``trace_steps`` holds each row's step index on the host.
        last_loss: the last observed ``loss``.
        observed: name -> [device sum, count] of the scalars observed since the last record.
        observed_names: every name ever observed (the run header's schema lists them).
    """

    def __init__(self, view: ParamView, trace_steps: int) -> None:
        dev, dt = view.device, view.dtype
        self.dtype, self.sharded = dt, view.sharded
        self.updates = 0
        self.finite = torch.zeros((), dtype=dt, device=dev)
        self._finite_host = 0  # finite steps counted on the host, not yet in ``finite``
        self.trace = torch.full((trace_steps, 2), float("nan"), dtype=dt, device=dev)
        self.rows = self.trace.unbind(0)  # views: a step writes one without indexing
        self.trace_steps: list[int] = [0] * trace_steps
        self.last_loss = torch.full((), float("nan"), dtype=dt, device=dev)
        self.observed: dict[str, list[Any]] = {}
        self.observed_names: dict[str, None] = {}

    def count(self, step: Step) -> None:
        """A step the lenses read: its finite flag and its trace row."""
        flag = step.flag
        if flag is None:  # an accelerator: no host read of the flag
            self.finite.add_(step.ok)
        else:
            self._finite_host += flag
        if len(self.trace):
            at = self.updates % len(self.trace)
            torch.stack([self.last_loss, step.grad_sq_total], out=self.rows[at])
            self.trace_steps[at] = step.index
        self.updates += 1

    def finite_steps(self) -> Tensor:
        """``finite`` with the host's count folded in (the live tensor)."""
        if self._finite_host:
            self.finite.add_(self._finite_host)
            self._finite_host = 0
        return self.finite

    def observe(self, name: str, value: Tensor | float) -> None:
        """Add ``value`` (a number, or a 0-d tensor on the tally's device, of any dtype: it is
        added in the tally's) to ``name``'s sum: one in-place op (two for the loss, which the
        trace keeps too; three at a name's first observation)."""
        with torch.no_grad():  # a loss that requires grad adds its value, not its graph
            if name == "loss" and isinstance(value, Tensor):
                self.last_loss.copy_(value)
            elif name == "loss":
                self.last_loss.fill_(value)
            slot = self.observed.get(name)
            if slot is None:
                zero = torch.zeros((), dtype=self.dtype, device=self.finite.device)
                self.observed[name] = [zero.add_(value), 1]
            else:
                slot[0].add_(value)
                slot[1] += 1

    def take_observed(self) -> tuple[list[str], Tensor | None]:
        """The names observed since the last record and their sums and counts (one 1-D
        tensor, to be summed over the ranks: every rank must observe the same names); the
        sums start again."""
        names = sorted(self.observed)
        self.observed, observed = {}, self.observed
        self.observed_names.update(dict.fromkeys(names))
        if not names:
            return names, None
        sums = torch.stack([observed[n][0] for n in names])
        counts = torch.tensor(
            [float(observed[n][1]) for n in names], dtype=sums.dtype, device=sums.device
        )
        return names, torch.cat([sums, counts]).to(self.dtype)

    @staticmethod
    def means(names: list[str], both: Tensor | None) -> dict[str, Tensor]:
        """Means of the observed scalars from :meth:`take_observed`'s sums and counts."""
        if both is None:
            return {}
        return dict(zip(names, (both[: len(names)] / both[len(names) :]).unbind()))

    def trace_lists(self) -> dict[str, Any]:
        """The ring of per-step values, oldest first, as host lists (read at events only).

        Under torch.distributed (every rank has the same events, at the same steps) one
        all-reduce makes them every rank's: the loss is the mean of the ranks' losses, as in
        the records, and under FSDP the squared gradient norm the sum of the shards'.
        """
        size = len(self.trace)
        n = min(size, self.updates)
        if n == 0:
            return {}
        rows = [(self.updates - n + j) % size for j in range(n)]
        index = torch.tensor(rows, dtype=torch.long, device=self.trace.device)
        local = self.trace[index]
        world = _dist.rank_and_size()[1]
        if world > 1:
            total = _dist.all_sum_(local.clone())
            local = torch.stack(
                [total[:, 0] / world, total[:, 1] if self.sharded else local[:, 1]], 1
            )
        values = local.tolist()
        return {
            "trace/step": [self.trace_steps[r] for r in rows],
            "trace/loss": [v[0] for v in values],
            "trace/grad_norm": [v[1] ** 0.5 for v in values],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "finite": self.finite_steps(),
            "observed": {k: [v[0], v[1]] for k, v in self.observed.items()},
            "trace": self.trace,
            "trace_steps": list(self.trace_steps),
            "updates": self.updates,
            "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        """Restore :meth:`state_dict` (``step``: the monitor's; files older than ``updates``
        read every step)."""
        self.finite.copy_(state["finite"])
        self._finite_host = 0
        self.updates = int(state.get("updates", step))
        if state["trace"].shape == self.trace.shape:
            self.trace.copy_(state["trace"])
            steps, n = state.get("trace_steps"), len(self.trace)
            self.trace_steps = (
                [int(t) for t in steps]
                if steps is not None and len(steps) == n
                else [
                    self.updates - (self.updates - 1 - r) % n for r in range(n)
                ]  # older files: row r held step r+1 mod n
            )
        self.last_loss.copy_(state["last_loss"])
        dev = self.finite.device
        self.observed = {
            k: [torch.as_tensor(v[0]).to(dev, self.dtype).clone(), int(v[1])]
            for k, v in state["observed"].items()
        }


def event_record(event: PhaseEvent, trace: Mapping[str, Any]) -> Record:
    """The record of a phase event (or an event logged from outside), with the trace."""
    record: Record = {
        "step": event.step,
        "time": time.time(),
        "event": event.new,
        "layer": event.layer,
        "old": event.old,
    }
    record.update({f"evidence/{k}": v for k, v in event.evidence.items()})
    record.update(trace)
    return record
