"""The CPU fast path of ``NoiseScale("per_sample")``: ``[|G|²; tr Σ]`` per layer from the
per-sample engine's sums and ``.grad`` in the fewest ops (one buffer, one matrix product)."""

from __future__ import annotations

import torch
from torch import Tensor

from sgdlens.lenses._two_batch import coefficients
from sgdlens.lenses.base import ParamView, Step
from sgdlens.lenses.per_sample import PerSampleEngine

__all__ = ["CpuEstimates"]


class CpuEstimates:
    """``(2, layers)`` two-batch estimates ``[|G|²; tr Σ]`` of one step (``B_small = 1``),
    with the index of its buffer and its coefficient matrix cached between steps."""

    def __init__(self, view: ParamView, reduction: str) -> None:
        self.view, self.reduction = view, reduction
        self._slots: tuple[tuple[bool, ...], list[int], Tensor] | None = None
        self._coef: tuple[tuple[int, int], Tensor] | None = None

    def __call__(
        self, engine: PerSampleEngine, step: Step, covered: list[bool], n: int, b_big: int
    ) -> Tensor:
        return self._coefficients(n, b_big) @ self._sums_and_grad_sq(engine, step, covered)

    def _sums_and_grad_sq(self, engine: PerSampleEngine, step: Step, covered: list[bool]) -> Tensor:
        """``(2, layers)``: per layer, Σ_s ‖c_s‖² and ‖.grad‖² over the covered parameters
        (one ``index_add_`` each into one buffer; an uncovered parameter's go to a spare
        last entry)."""
        view = step.view
        layers = len(view.layers)
        key = tuple(covered)
        if self._slots is None or self._slots[0] != key:  # copied to the device once
            at = [view.layer_of[i] if c else 2 * layers for i, c in enumerate(key)]
            big = [a + layers if a < 2 * layers else a for a in at]
            self._slots = (key, at, torch.tensor(big, dtype=torch.long, device=view.device))
        _, at, index = self._slots
        both = engine.sums(view.device, at, 2 * layers + 1)
        both.index_add_(0, index, step.grad_sq.to(both.dtype))
        return both[: 2 * layers].view(2, layers)

    def _coefficients(self, n: int, b_big: int) -> Tensor:
        """``M`` with ``M @ [Σ_s ‖c_s‖²; ‖.grad‖²] = [|G|²; tr Σ]`` (the two-batch estimates
        with ``B_small = 1``, ``B_big = b_big``; cached per ``(n, b_big)``)."""
        key = (n, b_big)
        if self._coef is None or self._coef[0] != key:
            view = self.view
            self._coef = (key, coefficients(n, b_big, self.reduction, view.dtype, view.device))
        return self._coef[1]
