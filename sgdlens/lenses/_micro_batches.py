"""The gradient accumulation hooks of ``NoiseScale("accumulation")``: per parameter, the norm
of each backward pass's gradient within one optimizer step."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from sgdlens import _torch
from sgdlens._quiet import probing_now
from sgdlens.lenses.per_sample import index_sums

__all__ = ["AT_ONCE", "PENDING", "MicroBatches"]


# Gradient elements whose norms the accumulation hooks batch into one launch (32 MB of float32
# kept alive at most), and the devices where each norm is taken at once instead (tests empty
# the set to cover the batched path on the CPU).
PENDING = 1 << 23
AT_ONCE = {"cpu"}


class MicroBatches:
    """Per-parameter ‖Δ_j‖ over the backward passes of one step, Δ_j each one's gradient.

    The first backward's gradient becomes ``.grad`` and is then added to in place, so its norm
    is taken at once; on accelerators later gradients are only added into ``.grad``, so the
    hooks keep them (up to ``PENDING`` elements) and take their norms together, one fused
    launch per bucket instead of one per parameter. On the CPU, where a launch is cheap,
    every norm is taken at once, while the gradient is still in cache. Squaring, summing and
    the float64 conversion happen once per step in :meth:`sums`.
    """

    def __init__(self, params: list[Tensor], dtype: torch.dtype, device: torch.device) -> None:
        self.params, self.dtype, self.device = params, dtype, device
        n = len(params)
        self.norms: list[list[Tensor]] = [[] for _ in range(n)]
        self.fires = [0] * n
        self._step = [0] * n  # a parameter's step count, to drop gradients of abandoned steps
        self._pending: list[tuple[int, int, Tensor]] = []
        self._pending_n = 0
        self._index: dict[tuple[tuple[int, int], ...], Tensor] = {}

    def attach(self) -> list[Any]:
        return [
            p.register_hook(partial(self._on, i))
            for i, p in enumerate(self.params)
            if p.requires_grad
        ]

    def _on(self, i: int, grad: Tensor) -> None:
        if probing_now():
            return
        if self.params[i].grad is None:  # zero_grad(set_to_none=True): a new step began
            self.norms[i], self.fires[i] = [], 0
            self._step[i] += 1
        self.fires[i] += 1
        if self.fires[i] == 1 or grad.is_sparse or grad.device.type in AT_ONCE:
            g = grad.coalesce().values() if grad.is_sparse else grad
            self.norms[i].append(torch.linalg.vector_norm(g, dtype=_torch.buffer_dtype(g.dtype)))
            return
        self._pending.append((i, self._step[i], grad))
        self._pending_n += grad.numel()
        if self._pending_n >= PENDING:
            self._flush()

    def _flush(self) -> None:
        live = [(i, g) for i, step, g in self._pending if step == self._step[i]]
        self._pending, self._pending_n = [], 0
        if live:
            values = _torch.norms([g for _, g in live], self.device, self.dtype)
            for (i, _), v in zip(live, values.unbind()):
                self.norms[i].append(v)

    def sums(self, device: torch.device) -> Tensor:
        """Σ_j ‖Δ_j‖² per parameter, in ``dtype`` on ``device``."""
        self._flush()
        return index_sums(self.norms, self.dtype, device, self._index, square=True)

    def reset(self) -> None:
        self.norms = [[] for _ in self.params]
        self.fires = [0] * len(self.params)
        self._pending, self._pending_n = [], 0
