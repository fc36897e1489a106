"""The argument checks of ``NoiseScale``: its settings, and what each estimator needs from the
monitor it attaches to."""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from sgdlens.lenses.per_sample import MODES

__all__ = ["ESTIMATORS", "check_attach", "check_settings"]

ESTIMATORS = ("auto", "accumulation", "per_sample", "ranks")


def _check_int(name: str, value: Any, low: int, example: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"NoiseScale({name}=...) must be an int, got {value!r}; e.g. {example}")
    if value < low:
        raise ValueError(f"NoiseScale({name}={value}) must be >= {low}; e.g. {example}")


def check_settings(
    estimator: str, batch_size: int | None, decay: float, reduction: str, per_sample: str, ddp: Any
) -> None:
    """Raise on a ``NoiseScale(...)`` setting it cannot use, naming the setting."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(
            f"NoiseScale(estimator={estimator!r}) must be one of {ESTIMATORS}; e.g. "
            f"estimator='auto'"
        )
    if estimator == "ranks" and not callable(getattr(ddp, "register_comm_hook", None)):
        raise TypeError(
            f"NoiseScale(estimator='ranks', ddp={ddp!r}) needs the DistributedDataParallel "
            f"module, to read each rank's gradient before the all-reduce: "
            f"NoiseScale('ranks', ddp=ddp_model)"
        )
    if estimator != "ranks" and ddp is not None:
        raise ValueError(
            f"NoiseScale(ddp=...) is only read by estimator='ranks', not {estimator!r}"
        )
    _check_int("batch_size", batch_size, 1, "batch_size=32")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"NoiseScale(decay=...) must be a float, got {decay!r}; e.g. 0.99")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"NoiseScale(decay={decay}) must lie in [0, 1); e.g. decay=0.99")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"NoiseScale(reduction={reduction!r}) must be 'mean' or 'sum': how .grad "
            f"relates to per-example gradients; e.g. reduction='mean'"
        )
    if per_sample not in MODES:
        raise ValueError(
            f"NoiseScale(per_sample={per_sample!r}) must be one of {MODES}; e.g. 'auto'"
        )


def check_attach(estimator: str, model: nn.Module | None, batch_size: int | None) -> None:
    """Raise, before any hook is registered, if the estimator has nothing to read: the
    per-sample hooks need the model, and a batch size not given is read from its inputs."""
    if model is not None:
        return
    if estimator == "per_sample":
        raise ValueError(
            "NoiseScale(estimator='per_sample') needs the model for its module hooks: "
            "pass PhaseMonitor(opt, model=model, lenses=[...])"
        )
    if batch_size is not None:
        return
    if estimator == "ranks":
        raise ValueError(
            "NoiseScale(estimator='ranks', batch_size=None) reads the local batch size "
            "from the model's inputs: pass PhaseMonitor(model=model) or batch_size="
        )
    if estimator == "accumulation":
        raise ValueError(
            "NoiseScale(estimator='accumulation', batch_size=None) reads the "
            "micro-batch size from the model's inputs, but the monitor has no "
            "model: pass PhaseMonitor(model=model) or NoiseScale(batch_size=...)"
        )
    raise ValueError(
        "NoiseScale(estimator='auto') has nothing to read without a model or a "
        "batch_size: pass PhaseMonitor(model=model) or NoiseScale(batch_size=...)"
    )
