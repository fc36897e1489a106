"""The header record that starts every run: what produced the records that follow.

The monitor emits it once, before its first record, to every sink. Its keys:

==================  ==========================================================================
key                 value
==================  ==========================================================================
``header``          the header format version (2; 1 had no ``schema``)
``run``             the run id, e.g. ``"20261201-143423-5f2c9a"`` (UTC start, then random hex)
``step``, ``time``  the optimizer step and Unix time when the header was written
``started``         when the monitor attached, as ISO 8601 UTC text
``optimizer``       the optimizer class, e.g. ``"AdamW"``
``param_groups``    per group: its hyperparameters (``lr``, ``betas``, ``weight_decay``, …)
                    and ``params``, the number of parameter tensors in it
``model``           the model class (``None`` without ``model=``)
``parameters``      the number of parameter entries the optimizer holds (numel summed)
``layers``          the layer (group) names, in record order
``layer_params``    the number of parameter tensors in each layer
``layer_members``   each layer's parameter names (``model.named_parameters()``; without
                    ``model=``, ``group<i>.<j>``): the grouping that ``layers=`` produced
``grouping``        the monitor's ``layers=`` argument, when the monitor keeps it
``log_every``       the monitor's log interval in steps
``lenses``          each lens with its settings (its ``repr``, else its class), e.g.
                    ``["GradSNR(window=None, weights_only=False)", "GradNorm()"]``
``versions``        ``{"sgdlens": ..., "torch": ..., "python": ...}``
``device``          where the parameters live, e.g. ``"cuda:0"``
``world_size``      the number of torch.distributed processes (1 without)
``schema``          per metric the records carry: ``source`` (lens class, ``"monitor"``,
                    ``"probe <name>"``, ``"PhaseDetector"``, ``"observe"``), ``doc``,
                    ``scale``, ``whole`` (the key ``<metric>`` is written) and ``layers`` (the
                    keys ``<metric>/<layer>`` are): see :mod:`sgdlens.schema`
==================  ==========================================================================

Example:
    >>> import torch
    >>> from sgdlens import PhaseMonitor
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with PhaseMonitor(opt, model=model) as monitor:
    ...     h = run_header(monitor)
    >>> h["optimizer"], h["param_groups"][0]["lr"], h["parameters"]
    ('SGD', 0.1, 3)
"""

from __future__ import annotations

import datetime
import math
import numbers
import os
import platform
import secrets
import time
from typing import Any

import torch

from sgdlens import _dist
from sgdlens._checkpoint import lens_id
from sgdlens.records import Record
from sgdlens.schema import run_schema

__all__ = ["header_once", "new_run_id", "run_header", "use_run_id"]

HEADER_VERSION = 2


def new_run_id(now: float | None = None) -> str:
    """A fresh run id: the UTC time to the second, then 6 random hex digits.

    Example:
        >>> new_run_id(0.0)[:16]
        '19700101-000000-'
    """
    t = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    return t.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _plain(v: Any) -> Any:
    """A hyperparameter as JSON: numbers, text, booleans, None and lists of them."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, torch.Tensor):
        return _plain(v.item()) if v.numel() == 1 else f"tensor{tuple(v.shape)}"
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        x = float(v)
        return x if math.isfinite(x) else str(x)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return type(v).__name__


def run_header(monitor: Any, *, run_id: str | None = None) -> Record:
    """The header record of a monitor's run (see the module docstring for the keys).

    Args:
        monitor: a :class:`~sgdlens.PhaseMonitor` (anything with ``optimizer``, ``view``,
            ``model``, ``log_every``, ``lenses`` and ``step``).
        run_id: the id to use (default: the monitor's ``run_id``, else a fresh one).
    """
    from sgdlens import __version__

    opt = monitor.optimizer
    view = monitor.view
    now = time.time()
    started = getattr(monitor, "started", None) or now
    groups = []
    for g in opt.param_groups:
        hyper = {k: _plain(v) for k, v in g.items() if k != "params"}
        groups.append({**hyper, "params": len(g["params"])})
    model = getattr(monitor, "model", None)
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    fallback = [
        f"group{gi}.{pj}" for gi, g in enumerate(opt.param_groups) for pj in range(len(g["params"]))
    ]
    members: dict[str, list[str]] = {layer: [] for layer in view.layers}
    for p, i, other in zip(view.params, view.layer_of, fallback):
        members[view.layers[i]].append(names.get(id(p), other))
    grouping = getattr(monitor, "grouping", getattr(monitor, "layers_arg", None))
    rid = run_id or getattr(monitor, "run_id", None) or new_run_id(started)
    return {
        "header": HEADER_VERSION,
        "run": rid,
        "step": int(monitor.step),
        "time": now,
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "optimizer": type(opt).__name__,
        "param_groups": groups,
        "model": type(model).__name__ if model is not None else None,
        "parameters": sum(int(p.numel()) for p in view.params),
        "layers": list(view.layers),
        "layer_params": [len(m) for m in members.values()],
        "layer_members": members,
        **({"grouping": _plain_grouping(grouping)} if grouping is not None else {}),
        "log_every": int(monitor.log_every),
        "lenses": [lens_id(lens) for lens in monitor.lenses],  # the settings too
        "versions": {
            "sgdlens": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device": str(view.device),
        "world_size": _dist.rank_and_size()[1],
        "pid": os.getpid(),
        "schema": run_schema(monitor),
    }


def _plain_grouping(grouping: Any) -> Any:
    if isinstance(grouping, (str, list, tuple, dict)):
        return _plain(grouping) if not isinstance(grouping, dict) else repr(grouping)
    return getattr(grouping, "__qualname__", repr(grouping))


def header_once(monitor: Any) -> Record | None:
    """The monitor's header the first time it is asked for, ``None`` after that.

    Sets ``monitor.run_id`` (keeping one that is already set, e.g. by a restored checkpoint).
    The monitor calls this before it emits a record and sends a header it gets first.
    """
    if getattr(monitor, "_header_sent", False):
        return None
    monitor._header_sent = True
    header = run_header(monitor)
    monitor.run_id = header["run"]
    return header


def use_run_id(monitor: Any, run_id: str) -> None:
    """Give a monitor's run the id ``run_id`` (before its first record, which carries the
    header); e.g. to name the output file after the run before training starts."""
    if getattr(monitor, "_header_sent", False):
        raise ValueError(
            f"use_run_id(run_id={run_id!r}): the monitor has already written its header "
            f"(run {getattr(monitor, 'run_id', None)!r}); set the id before the first record"
        )
    monitor.run_id = run_id
