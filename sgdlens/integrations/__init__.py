"""Framework integrations, each in its own module and imported only when asked for.

* :mod:`sgdlens.integrations.lightning` – ``PhaseMonitorCallback`` for Lightning's ``Trainer``
  (``lightning`` or ``pytorch_lightning``; extra ``sgdlens[lightning]``);
* :mod:`sgdlens.integrations.transformers` – ``PhaseMonitorCallback`` and ``attach(trainer)`` for
  the Hugging Face ``Trainer`` (extra ``sgdlens[transformers]``).

accelerate needs no adapter: ``PhaseMonitor(accelerated_optimizer, model=model)`` unwraps the
``AcceleratedOptimizer`` to the real optimizer (see ``docs/integrations.md``).

Importing this package imports no framework; the helpers below are shared by the adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sgdlens.monitor import PhaseMonitor
from sgdlens.phase import PhaseDetector
from sgdlens.records import Record, Value
from sgdlens.sinks import check_sinks

__all__: list[str] = []

_SKIP = ("step", "time")


def check_callback_args(
    owner: str, prefix: object, print_events: object, monitor_kwargs: dict[str, Any]
) -> list[Callable[[Record], Any]]:
    """Validate a callback's arguments eagerly (at construction, not at the first step).

    The monitor's own arguments are checked by building a throwaway monitor on a one-parameter
    model, so the callback accepts exactly what :class:`~sgdlens.PhaseMonitor` accepts. Returns
    the sinks as a list.
    """
    if not isinstance(prefix, str):
        raise TypeError(
            f"{owner}(prefix=...) must be a str, got {prefix!r}; e.g. prefix='sgdlens/'"
        )
    if not isinstance(print_events, bool):
        raise TypeError(f"{owner}(print_events=...) must be a bool, got {print_events!r}")
    for taken in ("optimizer", "model"):
        if taken in monitor_kwargs:
            raise TypeError(
                f"{owner}({taken}=...) is not an argument: the callback attaches to the "
                f"Trainer's {taken} itself; drop {taken}=..."
            )
    sink_list = check_sinks(monitor_kwargs.pop("sinks", ()), owner)
    if monitor_kwargs.get("log_every", 1) is None:
        monitor_kwargs.pop("log_every")
    probe = nn.Module()  # no nn.Linear: its init would draw from the global RNG
    probe.register_parameter("weight", nn.Parameter(torch.zeros(1)))
    # AdamW: the optimizer-reading lenses (GradSNR(decay='optimizer'), BatchSNR(source=
    # 'optimizer')) accept it; they check the Trainer's own optimizer when the callback attaches
    opt = torch.optim.AdamW(probe.parameters(), lr=0.0)
    try:
        PhaseMonitor(opt, model=probe, **monitor_kwargs).close()
    except TypeError as e:
        msg = str(e).replace("PhaseMonitor(", f"{owner}(")
        if "unexpected keyword" in msg:
            msg = (
                f"{owner}() got an unexpected keyword argument: {e}; it takes log_every, lenses, "
                f"detector, trace_steps, sinks, prefix and print_events"
            )
        raise TypeError(msg) from None
    except ValueError as e:
        raise ValueError(str(e).replace("PhaseMonitor(", f"{owner}(")) from None
    return sink_list


def monitor_kwargs_for(kwargs: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The monitor arguments for the ``index``-th optimizer: a detector instance is copied for
    every optimizer after the first, so that no two monitors share one state machine."""
    out = dict(kwargs)
    if index > 0 and isinstance(out.get("detector"), PhaseDetector):
        out["detector"] = copy.deepcopy(out["detector"])
    return out


def numeric_metrics(record: Mapping[str, Value], prefix: str) -> dict[str, float]:
    """A record's numeric keys as floats under ``prefix`` (``step``, ``time``, strings dropped)."""
    return {
        prefix + k: float(v)
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def describe_event(record: Mapping[str, Value], who: str = "") -> str:
    """One line for an event record: ``sgdlens: step 120: fc2 drift -> diffusion``."""
    where = f"{who}: " if who else ""
    layer = record.get("layer") or "model"
    if record.get("event") == "spike":
        what = f"loss spike ({layer})"
    else:
        what = f"{layer} {record.get('old')} -> {record.get('event')}"
    return f"sgdlens: {where}step {record.get('step')}: {what}"


def share_grad_scaler(monitor: PhaseMonitor, scaler: Any) -> None:
    """Give a float16 run's ``GradScaler`` to every lens of ``monitor`` that takes
    ``grad_scaler=`` (its hooks see scaled gradients) and was given none."""
    if scaler is None:
        return
    for lens in monitor.lenses:
        if hasattr(lens, "grad_scaler") and lens.grad_scaler is None:
            lens.grad_scaler = scaler
