"""The two-batch maths of ``NoiseScale``, as plain functions: McCandlish's unbiased estimates
of ``|G|²`` and ``tr Σ`` from two gradient norms, and their bias-corrected moving averages."""

from __future__ import annotations

import torch
from torch import Tensor

from sgdlens.lenses.base import State

__all__ = ["bias_corrected", "coefficients", "fold", "fold_finite", "two_batch_estimates"]


def two_batch_estimates(
    small_sq: Tensor, big_sq: Tensor, b_small: float, b_big: float
) -> tuple[Tensor, Tensor]:
    """Unbiased ``(|G|², tr Σ)`` from ``|G_small|²`` and ``|G_big|²`` (McCandlish App. A.1).

    Args:
        small_sq: ``|G_small|²`` (or its mean over several small batches), any shape.
        big_sq: ``|G_big|²``, the same shape.
        b_small: the small batch size.
        b_big: the big batch size (``> b_small``).

    Example:
        >>> g2, tr = two_batch_estimates(torch.tensor(3.0), torch.tensor(1.5), 1, 4)
        >>> float(g2), float(tr)
        (1.0, 2.0)
    """
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    tr = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


def coefficients(
    n: int, b_big: int, reduction: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``M`` with ``M @ [Σ_s ‖c_s‖²; ‖.grad‖²] = [|G|²; tr Σ]``: the two-batch estimates of
    ``n`` per-sample gradient contributions ``c_s`` (``B_small = 1``, ``B_big = b_big``)."""
    # mean: |G_small|² = n Σ_s ‖c_s‖², |G_big|² = ‖.grad‖²; sum: Σ_s ‖c_s‖² / n and
    # ‖.grad‖² / n². The estimates are linear in both: their columns are the
    # estimates of each alone.
    small, big = (float(n), 1.0) if reduction == "mean" else (1.0 / n, 1.0 / n**2)
    basis = torch.tensor([[small, 0.0], [0.0, big]], dtype=dtype, device=device)
    return torch.stack(two_batch_estimates(basis[0], basis[1], 1, b_big))


def fold(state: State, g2: Tensor, tr: Tensor, ok: Tensor, decay: float) -> None:
    """Fold per-layer estimates into ``state``'s moving averages of ``|G|²`` (``"g2"``) and
    ``tr Σ`` (``"tr"``) with factor ``decay``, where the 0-d bool ``ok`` and every estimate's
    finiteness allow, without leaving the device; ``"n"`` counts the steps folded in."""
    ok = ok & torch.isfinite(g2).all() & torch.isfinite(tr).all()
    w = 1.0 - decay
    state["g2"].copy_(torch.where(ok, state["g2"].lerp(g2.to(state["g2"].dtype), w), state["g2"]))
    state["tr"].copy_(torch.where(ok, state["tr"].lerp(tr.to(state["tr"].dtype), w), state["tr"]))
    state["n"].add_(ok)


def fold_finite(state: State, est: Tensor, ok: bool, decay: float) -> None:
    """:func:`fold` given ``est = [|G|²; tr Σ]`` and ``ok`` as a Python bool (the CPU): a
    finite step updates the averages in place, any other leaves them."""
    # est * 0 sums to 0 exactly when every entry is finite (NaN otherwise)
    if ok and float((est * 0).sum()) == 0.0:
        w = 1.0 - decay
        state["g2"].lerp_(est[0].to(state["g2"].dtype), w)
        state["tr"].lerp_(est[1].to(state["tr"].dtype), w)
        state["n"].add_(1)


def bias_corrected(state: State, decay: float) -> dict[str, Tensor]:
    """The moving averages divided by ``1 − decay^n`` over the ``n`` steps folded in."""
    n = state["n"]
    corr = 1.0 - torch.pow(torch.as_tensor(decay, dtype=n.dtype, device=n.device), n)
    return {"g2": state["g2"] / corr, "tr": state["tr"] / corr}
