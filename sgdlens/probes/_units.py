"""The vocabulary of permutation alignment: tensor axes, groups of units, and the operations that
carry a permuted feature axis through unchanged (elementwise functions, pooling) or join two
(residual additions, gates)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class Unsupported(ValueError):
    """The model holds an operation whose hidden units cannot be permuted safely."""


@dataclass(frozen=True)
class Axis:
    """Axis ``dim`` of tensor ``name``, of length ``outer * size * block``, viewed as
    ``(outer, size, block)``; the permutation acts on the middle (e.g. ``outer=3`` for the
    stacked q, k, v projections, ``block=head_dim`` for attention heads)."""

    name: str
    dim: int
    outer: int = 1
    block: int = 1


@dataclass
class Group:
    """One permutation: its size, the axes it acts on, and the values that carry it.

    ``taps`` are ``(node name, feature dim)`` of traced values whose feature axis is this group
    (for activation matching); ``origin`` names the module that created the group.
    """

    size: int
    origin: str
    axes: list[Axis] = field(default_factory=list)
    taps: list[tuple[str, int]] = field(default_factory=list)


FIXED = 0  # the group of the inputs and outputs
LAST = -1


@dataclass(frozen=True)
class Val:
    """The feature axis of a traced value: its group, its dim counted from the end (``-1``
    for a ``Linear``'s features, ``-3`` for a 2-D conv's channels), the number of dims when
    known, and the unit block size (``None`` after a flatten, until a ``Linear`` reveals it)."""

    group: int
    dim: int = LAST
    block: int | None = 1
    ndim: int | None = None

    def at(self, pos: int) -> int | None:
        """A dim given as ``pos`` (negative from the end or positive), from the end; ``None``
        where a positive dim cannot be placed without the number of dims."""
        if pos < 0:
            return pos
        return None if self.ndim is None else pos - self.ndim


ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.mish,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.hardswish,
    F.hardtanh,
    F.hardsigmoid,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.abs,
    torch.square,
    torch.clone,
    operator.neg,
}
ELEMENTWISE_METHODS = {
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "abs",
    "square",
    "clone",
    "contiguous",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "detach",
    "neg",
}
JOINING = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
}
JOINING_METHODS = {"add", "add_", "sub", "mul", "mul_"}
NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
