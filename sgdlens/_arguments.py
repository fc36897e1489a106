"""The checks of ``PhaseMonitor``'s arguments: every refusal at construction, naming the
argument, the value and the fix."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from sgdlens import _torch
from sgdlens._optim import unwrap_optimizer
from sgdlens.layers import LayersArg, check_layers
from sgdlens.lenses import default as default_lenses
from sgdlens.lenses.base import Lens, ParamView, check_reductions
from sgdlens.phase import PhaseDetector
from sgdlens.probes._common import FSDP_REASON
from sgdlens.probes.scheduled import Probe
from sgdlens.records import Record
from sgdlens.schema import Key, declared
from sgdlens.sinks import check_sinks

__all__ = ["MAX_TRACE", "check_arguments", "check_lenses", "check_probe_model"]

MAX_TRACE = 1 << 16  # trace_steps: two float64 per step on the device (1 MiB)


def check_arguments(
    optimizer: Any,
    model: nn.Module | None,
    lenses: Iterable[Lens] | None,
    sinks: Iterable[Callable[[Record], Any]],
    log_every: int,
    layers: LayersArg,
    detector: PhaseDetector | bool,
    trace_steps: int | None,
    probes: Sequence[Probe],
    probe_budget: float,
) -> tuple[Any, PhaseDetector | None, int, list[Probe], list[Lens], list[Any]]:
    """The optimizer, detector, trace length, probes, lenses and sinks a monitor runs with."""
    opt = unwrap_optimizer(optimizer, "PhaseMonitor(optimizer=...)")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"PhaseMonitor(model=...) must be a torch.nn.Module or None, got "
            f"{type(model).__name__} {model!r}; pass the module whose parameters it trains"
        )
    if isinstance(log_every, bool) or not isinstance(log_every, numbers.Integral):
        raise TypeError(f"PhaseMonitor(log_every=...) must be an int, got {log_every!r}")
    if log_every < 1:
        raise ValueError(f"PhaseMonitor(log_every={log_every}) must be >= 1; e.g. 50")
    if detector is True:
        detector = PhaseDetector()
    elif detector is not False and not isinstance(detector, PhaseDetector):
        raise TypeError(
            f"PhaseMonitor(detector=...) must be a PhaseDetector, True or False, got "
            f"{detector!r}; e.g. detector=PhaseDetector(enter_diffusion=0.7)"
        )
    trace = min(log_every, 1024) if trace_steps is None else trace_steps
    if (
        isinstance(trace, bool)
        or not isinstance(trace, numbers.Integral)
        or not 0 <= trace <= MAX_TRACE
    ):
        raise ValueError(
            f"PhaseMonitor(trace_steps={trace_steps!r}) must be an int in [0, {MAX_TRACE}] "
            f"(steps kept on the device before each event; 0: no trace)"
        )
    probe_list = list(probes) if isinstance(probes, Iterable) else probes
    if not isinstance(probe_list, list) or not all(isinstance(p, Probe) for p in probe_list):
        raise TypeError(
            f"PhaseMonitor(probes=...) must be a list of sgdlens.probes.Probe, got {probes!r}; "
            f"e.g. probes=[probes.sharpness_probe(loss_fn, batch)]"
        )
    if probe_list and model is None:
        raise ValueError(
            "PhaseMonitor(probes=...) needs model=: probes evaluate the model's loss surface"
        )
    if (
        isinstance(probe_budget, bool)
        or not isinstance(probe_budget, numbers.Real)
        or not (0 < probe_budget <= 1)
    ):
        raise ValueError(
            f"PhaseMonitor(probe_budget={probe_budget!r}) must be a fraction in (0, 1]; "
            f"e.g. 0.05 for at most 5 % of the wall time"
        )
    check_layers(layers)
    lens_list = check_lenses(lenses)
    sink_list = check_sinks(sinks, "PhaseMonitor")
    return opt, detector or None, int(trace), probe_list, lens_list, sink_list


def check_probe_model(
    probe_list: list[Probe], probe_model: nn.Module | None, view: ParamView
) -> None:
    """``probes=`` under FSDP need ``probe_model=``; elsewhere it is refused."""
    fsdp = any(_torch.is_distributed_param(p) for p in view.params)
    if probe_list and fsdp and probe_model is None:
        raise ValueError(
            f"PhaseMonitor(probes={[p.name for p in probe_list]}) cannot run under FSDP "
            f"(the optimizer holds sharded parameters): {FSDP_REASON}; or pass "
            f"probe_model=<a plain instance of the model's class>, which the monitor loads "
            f"with the gathered weights on rank 0 for each probe run"
        )
    if probe_model is not None:
        if not isinstance(probe_model, nn.Module) or any(
            _torch.is_distributed_param(p) for p in probe_model.parameters()
        ):
            raise TypeError(
                f"PhaseMonitor(probe_model=...) must be a plain, unsharded torch.nn.Module "
                f"of the model's architecture, got {type(probe_model).__name__}"
            )
        if not fsdp or not probe_list:
            raise ValueError(
                "PhaseMonitor(probe_model=...) is for probes= under FSDP (where the "
                "probes cannot run on the sharded model); elsewhere they run on model= "
                "itself: drop probe_model="
            )


def check_lenses(lenses: Iterable[Lens] | None) -> list[Lens]:
    if lenses is None:
        return default_lenses()
    if isinstance(lenses, (str, bytes)) or not isinstance(lenses, Iterable):
        raise TypeError(
            f"PhaseMonitor(lenses=...) must be a list of lenses or None, got {lenses!r}; "
            f"e.g. lenses=[lenses.GradSNR(window=100), lenses.GradNorm()]"
        )
    out, names = [], set()
    for i, lens in enumerate(lenses):
        if isinstance(lens, type):
            raise TypeError(
                f"PhaseMonitor(lenses=...)[{i}] is the class {lens.__name__}, not a lens; "
                f"pass an instance, e.g. lenses=[{lens.__name__}()]"
            )
        if not all(callable(getattr(lens, m, None)) for m in ("init", "update", "compute")):
            raise TypeError(
                f"PhaseMonitor(lenses=...)[{i}] is {type(lens).__name__} ({lens!r}), not a "
                f"lens (init/update/compute); use one from sgdlens.lenses, e.g. GradSNR()"
            )
        name = getattr(lens, "name", type(lens).__name__)
        if name in names:
            raise ValueError(
                f"PhaseMonitor(lenses=...) holds two {name!r} lenses ({lens!r}); their keys "
                f"would collide: keep one"
            )
        names.add(name)
        keys = getattr(lens, "keys", ())
        if isinstance(keys, (str, Key)) or not all(isinstance(k, Key) for k in keys):
            raise TypeError(
                f"PhaseMonitor(lenses=...)[{i}] {type(lens).__name__}.keys must be a tuple of "
                f"sgdlens.lenses.Key, got {keys!r}; e.g. keys = (Key('my_metric', '...'),)"
            )
        metrics = getattr(lens, "metrics", ())
        if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
            example = repr(metrics) if isinstance(metrics, str) else "'my_metric'"
            raise TypeError(
                f"PhaseMonitor(lenses=...)[{i}] {type(lens).__name__}.metrics must be a tuple "
                f"of str, got {metrics!r}; e.g. metrics = ({example},)"
            )
        check_reductions(lens, f"PhaseMonitor(lenses=...)[{i}]")
        try:  # the run header's schema reads them at the first record, inside optimizer.step()
            declared(lens)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"PhaseMonitor(lenses=...)[{i}] {type(lens).__name__}: its metrics are not "
                f"valid: {e}; declare metrics as a tuple of non-empty str"
            ) from None
        out.append(copy.copy(lens))
    return out
