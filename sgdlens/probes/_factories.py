"""The probes the monitor schedules most: sharpness (with the edge-of-stability ratio), the
Hessian trace and the loss barrier from a reference, each built as a :class:`Probe`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sgdlens._optim import unwrap_optimizer
from sgdlens._warn import warn
from sgdlens.probes._common import check_fn, check_int, check_positive, fixed_data, own_generator
from sgdlens.probes._probe import Probe
from sgdlens.probes.eos import eos_ratio, per_group_rates, rate_weighted_ratio
from sgdlens.probes.hvp import Operator
from sgdlens.probes.interpolate import interpolate
from sgdlens.probes.restore import preserved
from sgdlens.probes.sharpness import SharpnessResult, adam_preconditioner, held_params, solve
from sgdlens.probes.trace import hessian_trace
from sgdlens.schema import Key

__all__ = ["barrier_probe", "sharpness_probe", "trace_probe"]


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
            res = solve(
                op,
                1,
                "LA",
                tol,
                None,
                "lanczos",
                _start(last, "v", op.space.names),
                own_generator(None),
                True,
            )
        _keep(last, "v", res)
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
                warn(f"{name}: no eos_ratio in the records: {e}")
            return out
        _keep(last, "v_rates", scaled)
        out["eos_ratio"] = ratio
        out["sharpness_hvps"] += scaled.hvps
        return out

    keys = (
        Key("sharpness", "top Hessian eigenvalue (Adam/AdamW: preconditioned)", per_layer=False),
        Key("sharpness_hvps", "Hessian-vector products it took", per_layer=False, scale="linear"),
        Key("eos_ratio", "sharpness over the edge-of-stability threshold", per_layer=False),
    )
    return Probe(
        fn, name=name, every=every, per_decade=per_decade, on_event=on_event, state=last, keys=keys
    )


def _start(last: Mapping[str, Any], key: str, names: list[str]) -> Any:
    """The previous run's eigenvector as a warm start, if it covers these parameters."""
    v = last.get(key)
    return v if v is not None and all(n in v for n in names) else None


def _keep(last: dict[str, Any], key: str, res: SharpnessResult) -> None:
    """Keep the top eigenvector of ``res`` as the next run's warm start (see :func:`_start`)."""
    last[key] = {k: v.clone() for k, v in res.vector(0).items()}


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
        own = _tensors(model)
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
    return Probe(
        fn,
        name=f"barrier/{name}".replace("/", "-"),
        every=every,
        per_decade=per_decade,
        on_event=on_event,
        state=state,
        keys=keys,
        check=check,
    )


def _snapshot(reference: Any) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict or of a module's parameters and buffers."""
    if isinstance(reference, nn.Module):
        items: Mapping[str, Any] = _tensors(reference)
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


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name (the tensors themselves, not copies)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
