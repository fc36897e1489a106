"""Small data sets generated in code (nothing is downloaded).

:func:`tishby12` is the 12-bit task of Shwartz-Ziv & Tishby (2017), rebuilt exactly from the
closed form in docs/science.md: the 12 inputs stand for the vertices of a regular icosahedron
and ``y = [Σx_k + ‖Σ x_k v_k‖ > 7.632]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["tishby12"]

_PHI = (1 + math.sqrt(5)) / 2
# Column k of the authors' data file stands for icosahedron vertex _VERTICES[k].
_VERTICES = (
    (0, -1, -_PHI),
    (-1, -_PHI, 0),
    (0, -1, _PHI),
    (1, -_PHI, 0),
    (-_PHI, 0, 1),
    (0, 1, -_PHI),
    (-1, _PHI, 0),
    (1, _PHI, 0),
    (_PHI, 0, 1),
    (0, 1, _PHI),
    (_PHI, 0, -1),
    (-_PHI, 0, -1),
)
_THRESHOLD = 7.632  # any value in (7.5628, 7.7013) gives the same labels


def tishby12(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 4096 patterns of the 12-bit task and their labels.

    Rows are in binary counting order with the most significant bit in column 0, as in the
    authors' ``var_u.mat``. 2118 of the 4096 labels are 1.

    Args:
        dtype: floating dtype of the inputs.

    Returns:
        ``(x, y)``: ``x`` of shape ``(4096, 12)`` with entries 0/1 in ``dtype``, ``y`` of shape
        ``(4096,)`` with class labels 0/1 (``torch.long``).

    Example:
        >>> x, y = tishby12()
        >>> x.shape, int(y.sum())
        (torch.Size([4096, 12]), 2118)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"tishby12(dtype=...) must be a floating torch.dtype, got {dtype!r}")
    codes = torch.arange(4096)
    shifts = torch.arange(11, -1, -1)
    bits = ((codes[:, None] >> shifts) & 1).to(torch.float64)
    v = torch.tensor(_VERTICES, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    f = bits.sum(1) + (bits @ v).norm(dim=1)
    y = (f > _THRESHOLD).long()
    return bits.to(dtype), y
