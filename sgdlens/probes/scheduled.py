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
import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sgdlens import _dist, _torch
from sgdlens._optim import unwrap_optimizer
from sgdlens.probes._common import check_fn, check_int, check_positive, fixed_data, own_generator
from sgdlens.probes.eos import eos_ratio, per_group_rates, rate_weighted_ratio
from sgdlens.probes.hvp import Operator
from sgdlens.probes.interpolate import interpolate
from sgdlens.probes.restore import preserved
from sgdlens.probes.sharpness import adam_preconditioner, held_params, solve
from sgdlens.probes.trace import hessian_trace
from sgdlens.schema import Key

__all__ = ["Probe", "ProbeScheduler", "barrier_probe", "sharpness_probe", "trace_probe"]

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
                    warnings.warn(
                        f"probe {probe.name!r} cannot run on this model and is dropped from the "
                        f"schedule: {e}",
                        stacklevel=4,
                    )
            if here and not self.refused[i]:
                try:
                    with torch.enable_grad(), preserved(target, opt):
                        values = dict(probe.fn(target, opt))
                except Exception as e:  # a failed probe must not stop training
                    warnings.warn(
                        f"probe {probe.name!r} failed at step {step}: {e!r}", stacklevel=4
                    )
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


def sharpness_probe(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Any,
    *,
    every: int | None = None,
    per_decade: int | None = 4,
    on_event: bool = True,
    tol: float = 1e-3,
    name: str = "sharpness",
) -> Probe:
    """λ_max of the Hessian on ``data`` and the edge-of-stability ratio for the optimizer.

    Keys: ``sharpness``, ``eos_ratio`` (sharpness over the threshold of
    :func:`~sgdlens.probes.eos_threshold` at the current learning rate, for the optimizers that
    have one) and ``sharpness_hvps``. For ``Adam``/``AdamW`` (once they have state)
    ``sharpness`` is the preconditioned sharpness λ_max(P^{-1/2} H P^{-1/2}) that Cohen et al.
    2022 compare with the threshold; for every other optimizer it is the plain λ_max(H),
    with ``eos_ratio`` for SGD (see :func:`~sgdlens.probes.eos_threshold`) and without it
    for those that have no threshold here (NAdam, RAdam, Adamax, Adagrad, RMSprop, ...). The
    Hessian is taken over the parameters the optimizer holds (a frozen body, or one another
    optimizer trains, is held fixed): those are the ones whose
    steps the threshold is about, and only they have Adam state to precondition with.

    With per-group learning rates (or, for SGD, per-group weight decays) no one group's
    threshold is the edge: gradient descent with a rate ``η_i`` per parameter is stable while
    ``λ_max(η^{1/2} (H + diag w) η^{1/2}) < 2``, and the top eigenvector mixes the groups. So
    ``eos_ratio`` is then exact for that: ``λ_max(r^{1/2} (H + diag w) r^{1/2})`` with
    ``r = η/η_max`` (Adam: ``r^{1/2} P^{-1/2} H P^{-1/2} r^{1/2}``) over the threshold at
    ``η_max``, from a second Lanczos run (twice the cost; ``sharpness`` stays as above).
    Groups that differ in momentum or betas have no one threshold: ``eos_ratio`` is left out,
    with one warning. Each run warm-starts Lanczos from the previous top eigenvector, which the
    monitor's checkpoint carries.

    Cost: one Hessian-vector product (1 forward + 2 backward per batch of ``data``) per Lanczos
    iteration, typically 5-20.

    Raises:
        TypeError, ValueError: at construction, for a ``loss_fn`` that is not callable, empty
            or unreadable ``data``, ``tol <= 0``, or a bad schedule.

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor, probes
        >>> model = torch.nn.Linear(3, 1)
        >>> batch = (torch.randn(16, 3), torch.randn(16, 1))
        >>> def loss_fn(m, b):
        ...     return torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, model=model, log_every=10,
        ...                        probes=[probes.sharpness_probe(loss_fn, batch, every=100)])
    """
    check_fn(loss_fn)
    data = fixed_data(data)
    tol = check_positive(tol, "tol", "; the relative residual at which Lanczos stops, e.g. 1e-3")
    last: dict[str, Any] = {}
    warned: list[bool] = []

    def fn(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
        real = unwrap_optimizer(opt)
        adam = isinstance(real, (torch.optim.Adam, torch.optim.AdamW)) and bool(real.state)
        held = held_params(model, real)
        if adam:  # a parameter Adam holds but has never moved (no gradient yet) is held fixed
            held = [p for p in held if "exp_avg_sq" in real.state.get(p, {})] or held
        with preserved(model):  # over the parameters the optimizer holds
            op = Operator(model, loss_fn, data, "eval", params=held)
            if adam:
                pre = adam_preconditioner(model, real, op.space.names)
                op.scale = op.space.flatten([pre[n] for n in op.space.names]).rsqrt()
            res = solve(op, 1, "LA", tol, None, "lanczos", _start(last, "v", op.space.names),
                        own_generator(None), True)  # fmt: skip
        last["v"] = {k: v.clone() for k, v in res.vector(0).items()}
        out = {"sharpness": float(res.value), "sharpness_hvps": float(res.hvps)}
        if not (adam or isinstance(real, torch.optim.SGD)):
            return out  # no threshold for this optimizer (or Adam before its first step)
        try:
            if not per_group_rates(real):
                out["eos_ratio"] = eos_ratio(res, real)
                return out
            v0 = _start(last, "v_rates", op.space.names)
            ratio, scaled = rate_weighted_ratio(model, loss_fn, data, real, held, adam, tol, v0)
        except ValueError as e:  # groups differ in momentum or betas, or lr = 0
            if not warned:
                warned.append(True)
                warnings.warn(f"{name}: no eos_ratio in the records: {e}", stacklevel=2)
            return out
        last["v_rates"] = {k: v.clone() for k, v in scaled.vector(0).items()}
        out["eos_ratio"] = ratio
        out["sharpness_hvps"] += scaled.hvps
        return out

    keys = (
        Key("sharpness", "top Hessian eigenvalue (Adam/AdamW: preconditioned)", per_layer=False),
        Key("sharpness_hvps", "Hessian-vector products it took", per_layer=False, scale="linear"),
        Key("eos_ratio", "sharpness over the edge-of-stability threshold", per_layer=False),
    )
    return Probe(fn, name=name, every=every, per_decade=per_decade, on_event=on_event, state=last,
                 keys=keys)  # fmt: skip


def _start(last: Mapping[str, Any], key: str, names: list[str]) -> Any:
    """The previous run's eigenvector as a warm start, if it covers these parameters."""
    v = last.get(key)
    return v if v is not None and all(n in v for n in names) else None


def trace_probe(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Any,
    *,
    samples: int = 20,
    every: int | None = None,
    per_decade: int | None = 2,
    on_event: bool = False,
    name: str = "hessian_trace",
) -> Probe:
    """Hutch++ estimate of tr H on ``data``. Keys: ``hessian_trace``, ``hessian_trace_stderr``.

    Cost: ``samples`` Hessian-vector products (at least 3: a third sketches the top of the
    spectrum, a third measures it, a third estimates the rest).

    Raises:
        TypeError, ValueError: at construction, for a ``loss_fn`` that is not callable, empty
            or unreadable ``data``, ``samples < 3``, or a bad schedule.

    Example:
        >>> import torch
        >>> batch = (torch.randn(16, 3), torch.randn(16, 1))
        >>> probe = trace_probe(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch, samples=10)
    """
    check_fn(loss_fn)
    data = fixed_data(data)
    check_int(samples, "samples", 3, "; Hutch++ splits its HVP budget in three, e.g. samples=20")

    def fn(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
        res = hessian_trace(model, loss_fn, data, method="hutch++", samples=samples)
        return {"hessian_trace": float(res.trace), "hessian_trace_stderr": float(res.stderr)}

    keys = (
        Key("hessian_trace", "Hutch++ estimate of tr H", per_layer=False, scale="linear"),
        Key("hessian_trace_stderr", "its standard error", per_layer=False),
    )
    return Probe(fn, name=name, every=every, per_decade=per_decade, on_event=on_event, keys=keys)


def barrier_probe(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Any,
    reference: Mapping[str, torch.Tensor],
    *,
    name: str = "init",
    steps: int = 11,
    every: int | None = None,
    per_decade: int | None = 2,
    on_event: bool = True,
) -> Probe:
    """The loss barrier on the straight line from ``reference`` to the model.

    ``reference`` is a state dict (``model.state_dict()``) or a module; either is copied at
    construction, so later changes to it do not move the reference. The monitor's checkpoint
    carries the copy: a probe rebuilt on resume (say from the resumed model's weights) keeps
    measuring from the reference the run started with.

    Keys: ``barrier/<name>`` (Entezari: the largest excess of the loss over the chord; ≤ 0
    within a convex basin) and ``error_barrier/<name>`` (Frankle: the loss's supremum minus
    the mean of the ends). Cost: ``steps`` forward passes per batch of ``data``.

    Raises:
        TypeError, ValueError: at construction, for a ``reference`` that is neither a state
            dict of tensors nor a module, a ``loss_fn`` that is not callable, empty or
            unreadable ``data``, ``steps < 2``, an empty ``name``, or a bad schedule.
        ValueError: a ``reference`` whose names or shapes are not the model's (another
            architecture), once: when the scheduler is built with the model, or else at the
            first log point, where the probe is dropped from the schedule with one warning
            naming the first mismatch.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> batch = (torch.randn(16, 3), torch.randn(16, 1))
        >>> probe = barrier_probe(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch,
        ...                       reference=model.state_dict(), name="init")
    """
    check_fn(loss_fn)
    data = fixed_data(data)
    check_int(steps, "steps", 2, "; the number of points on the line, e.g. 11")
    if not isinstance(name, str) or not name:
        raise ValueError(f"barrier_probe(name={name!r}) must be a non-empty string, e.g. 'init'")
    state = {"reference": _snapshot(reference)}

    def check(model: nn.Module) -> None:
        ref = state["reference"]
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        bad = [k for k, t in own.items() if k not in ref or ref[k].shape != t.shape]
        if bad:
            k = bad[0]
            theirs = tuple(ref[k].shape) if k in ref else "absent"
            raise ValueError(
                f"barrier_probe(reference=...) is not a state of the model's architecture: "
                f"{k!r} is {theirs} in the reference and {tuple(own[k].shape)} in the model "
                f"({len(bad)} of {len(own)} entries differ); pass a state dict of this model, "
                "e.g. copy.deepcopy(model.state_dict()) saved at initialisation"
            )

    def fn(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
        res = interpolate(state["reference"], model, loss_fn, data, steps=steps, model=model)
        return {
            f"barrier/{name}": float(res.barrier),
            f"error_barrier/{name}": float(res.error_barrier),
        }

    keys = (
        Key(f"barrier/{name}", "loss above the chord (Entezari)", False, scale="linear"),
        Key(f"error_barrier/{name}", "loss above the ends (Frankle)", False, scale="linear"),
    )
    return Probe(fn, name=f"barrier/{name}".replace("/", "-"), every=every, per_decade=per_decade,
                 on_event=on_event, state=state, keys=keys, check=check)  # fmt: skip


def _snapshot(reference: Any) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict or of a module's parameters and buffers."""
    if isinstance(reference, nn.Module):
        items: Mapping[str, Any] = {**dict(reference.named_parameters()),
                                    **dict(reference.named_buffers())}  # fmt: skip
    elif isinstance(reference, Mapping):
        items = reference
    else:
        raise TypeError(
            f"barrier_probe(reference=...) must be a state dict or a module, got "
            f"{type(reference).__name__}; pass e.g. model.state_dict() saved at initialisation"
        )
    bad = [k for k, v in items.items() if not isinstance(v, torch.Tensor)]
    if bad or not items:
        raise TypeError(
            f"barrier_probe(reference=...) must map names to tensors (model.state_dict()); "
            f"got {'no entries' if not items else f'non-tensors at {bad[:3]}'}"
        )
    return {k: v.detach().clone() for k, v in items.items()}
