"""Probes the monitor runs on a schedule, within a time budget.

A :class:`Probe` wraps ``fn(model, optimizer) -> {key: number}`` with *when* to run it: every
``every`` steps, at log-spaced steps, and/or as soon as the phase detector raises an event
(a phase change or a loss spike), so a transition is characterised at once. The monitor checks
probes at its log points only, runs each inside :func:`~sgdlens.probes.preserved`, and puts
their numbers into that step's record. ``sharpness_probe``, ``trace_probe`` and
``barrier_probe`` build the common ones.

The time budget (``PhaseMonitor(probe_budget=0.05)``): probe time may be at most that fraction
of the wall time since the monitor attached. A due probe whose expected cost (its last
measured duration) would exceed the budget is postponed to a later log point, which stretches
the schedule; every record carries ``probe_time_fraction``, the fraction spent so far.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sgdlens import _dist, _torch
from sgdlens._warn import warn
from sgdlens.probes._factories import barrier_probe, sharpness_probe, trace_probe
from sgdlens.probes._probe import Probe
from sgdlens.probes.restore import preserved

__all__ = ["Probe", "ProbeScheduler", "barrier_probe", "sharpness_probe", "trace_probe"]


class ProbeScheduler:
    """Runs a monitor's probes at log points, within a wall-time budget (used by the monitor)."""

    def __init__(
        self,
        probes: Sequence[Probe],
        budget: float,
        replica: nn.Module | None = None,
        model: nn.Module | None = None,
    ) -> None:
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"PhaseMonitor(probes=...) names must be unique, got {names}")
        self.probes = list(probes)
        self.budget = budget
        self.replica = replica  # under FSDP: the unsharded copy the probes run on, on rank 0
        self.start = time.perf_counter()
        self.spent = 0.0
        self.due = [p.next_after(0) for p in self.probes]
        self.cost = [0.0] * len(self.probes)
        self.checked = [p.check is None for p in self.probes]
        self.refused = [False] * len(self.probes)
        target = replica if replica is not None else model
        if target is not None:  # refuse a probe that cannot measure this model now
            for p in self.probes:
                if p.check is not None:
                    p.check(target)
            self.checked = [True] * len(self.probes)

    def run(
        self, step: int, events: bool, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        elapsed = time.perf_counter() - self.start
        wanted = [
            not self.refused[i]
            and (step >= self.due[i] or (events and p.on_event))
            # postponed while over budget: the schedule stretches until the budget allows it
            and self.spent + self.cost[i] <= self.budget * (elapsed + self.cost[i])
            for i, p in enumerate(self.probes)
        ]
        # under torch.distributed every rank follows rank 0's decisions (timings differ)
        device = next(model.parameters()).device
        flags = _dist.broadcast_(torch.tensor(wanted, dtype=torch.float32, device=device))
        here, target, opt = True, model, optimizer
        if self.replica is not None and bool(flags.any()):
            # FSDP: every rank gathers the weights, rank 0 probes its unsharded copy with them
            # and sends the numbers to the others
            full = _torch.full_state_dict(model)
            here = _dist.rank_and_size()[0] == 0
            target = self.replica
            if here:
                target.load_state_dict(full)
                opt = _stand_in(optimizer, target)
        for i, probe in enumerate(self.probes):
            if not flags[i]:
                continue
            t0 = time.perf_counter()
            values = {}
            if here and not self.checked[i] and probe.check is not None:
                self.checked[i] = True
                try:
                    probe.check(target)
                except (TypeError, ValueError) as e:
                    self.refused[i] = True
                    warn(
                        f"probe {probe.name!r} cannot run on this model and is dropped from the "
                        f"schedule: {e}",
                    )
            if here and not self.refused[i]:
                try:
                    with torch.enable_grad(), preserved(target, opt):
                        values = dict(probe.fn(target, opt))
                except Exception as e:  # a failed probe must not stop training
                    warn(f"probe {probe.name!r} failed at step {step}: {e!r}")
            if self.replica is not None:
                values = _dist.broadcast_object({k: float(v) for k, v in values.items()})
            self.cost[i] = time.perf_counter() - t0
            self.spent += self.cost[i]
            self.due[i] = probe.next_after(step)
            out.update({k: float(v) for k, v in values.items()})
        out["probe_time_fraction"] = self.spent / max(time.perf_counter() - self.start, 1e-9)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "spent": self.spent,
            "due": list(self.due),
            "cost": list(self.cost),
            "elapsed": time.perf_counter() - self.start,
            "probe_state": {p.name: copy.deepcopy(p.state) for p in self.probes},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["due"]) != len(self.probes):
            raise ValueError("load_state_dict: the checkpoint's probes differ from this monitor's")
        kept = state.get("probe_state", {})  # absent in checkpoints written before 0.1
        unknown = sorted(set(kept) - {p.name for p in self.probes})
        if unknown:
            raise ValueError(
                f"load_state_dict: the checkpoint holds state of probes {unknown} that this "
                f"monitor does not have ({[p.name for p in self.probes]}); build the monitor "
                "with the probes the checkpoint was written with"
            )
        self.spent, self.due, self.cost = (
            float(state["spent"]),
            list(state["due"]),
            list(state["cost"]),
        )
        self.start = time.perf_counter() - float(state["elapsed"])
        for p in self.probes:
            if p.name in kept:
                p.state.clear()
                p.state.update(copy.deepcopy(kept[p.name]))


def _stand_in(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of the same class over ``model``'s parameters, with the first param group's
    hyper-parameters and no state (for the learning rate the probes read; an Adam stand-in has
    no second moments, so its sharpness is the plain one)."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return type(optimizer)([{"params": list(model.parameters()), **group}])  # type: ignore[call-arg]
