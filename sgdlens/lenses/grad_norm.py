"""Gradient norms at log steps: ``grad_norm/<l>`` = ‖g_l‖ and ``grad_norm`` = ‖g‖."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from sgdlens.lenses.base import Key, Lens, ParamView, State, Step, per_layer_keys

__all__ = ["GradNorm"]


class GradNorm(Lens):
    """The norm of the gradient the optimizer used at each log step, per layer and in total.

    It reuses the squared norms the monitor computes every step for its finite-gradient check,
    so it costs nothing between log points. A non-finite gradient is reported as it is
    (``inf``/``nan``), which is how a log shows where a run broke.

    Logged keys: ``grad_norm/<l>`` for every layer and ``grad_norm``.

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor, lenses
        >>> opt = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, lenses=[lenses.GradNorm()])
    """

    name = "grad_norm"
    keys = (Key("grad_norm", "norm of the gradient the optimizer used at the log step"),)
    metrics = ("grad_norm",)

    def __repr__(self) -> str:
        return "GradNorm()"

    def init(self, view: ParamView) -> State:
        return {}

    reductions: ClassVar[Mapping[str, str]] = {"sq": "shards"}

    def local(self, state: State, step: Step) -> dict[str, Tensor]:
        view = step.view
        return {"sq": view.per_layer(step.grad_sq, range(len(view.params)))}

    def finish(self, state: State, step: Step, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        sq = sums["sq"]
        return {
            **per_layer_keys("grad_norm", step.view.layers, sq.sqrt()),
            "grad_norm": sq.sum().sqrt(),
        }
