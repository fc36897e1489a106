"""Per-layer squared gradient norms over the parameters ``NoiseScale`` covers (a module without
per-sample hooks leaves its parameters out): ‖.grad‖², and the per-sample estimator's CPU fast
path, ``[|G|²; tr Σ]`` from the engine's sums and ``.grad`` in one buffer and one matrix
product. The mask, index and coefficient tensors are copied to the device once."""

from __future__ import annotations

import torch
from torch import Tensor

from sgdlens.lenses._two_batch import coefficients
from sgdlens.lenses.base import ParamView, Step
from sgdlens.lenses.per_sample import PerSampleEngine

__all__ = ["CoveredSums"]


class CoveredSums:
    """Per-layer sums over the covered parameters, their device tensors cached between steps."""

    def __init__(self, view: ParamView, reduction: str) -> None:
        self.view, self.reduction = view, reduction
        self._mask: tuple[tuple[bool, ...], Tensor] | None = None
        self._slots: tuple[tuple[bool, ...], list[int], Tensor] | None = None
        self._coef: tuple[tuple[int, int], Tensor] | None = None

    def grad_sq(self, step: Step, covered: list[bool]) -> Tensor:
        """‖.grad‖² per layer over the covered parameters."""
        view = step.view
        sq = step.grad_sq
        if not all(covered):  # the mask is copied to the device once, not every step
            key = tuple(covered)
            if self._mask is None or self._mask[0] != key:
                self._mask = (key, torch.tensor(key, dtype=sq.dtype, device=sq.device))
            sq = sq * self._mask[1]
        return view.per_layer(sq, range(len(view.params)))

    def estimates(
        self, engine: PerSampleEngine, step: Step, covered: list[bool], n: int, b_big: int
    ) -> Tensor:
        """``(2, layers)`` two-batch estimates ``[|G|²; tr Σ]`` of one step (``B_small = 1``)."""
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
