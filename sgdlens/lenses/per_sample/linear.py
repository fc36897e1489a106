"""``nn.Linear`` and Hugging Face's ``Conv1D``: Goodfellow's trick, the Gram trick, or full."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sgdlens.lenses.per_sample._common import (
    Result,
    Use,
    cat,
    gram_cheaper,
    gram_sq,
    seq,
    weight_bias,
)


def linear(m: nn.Module, uses: list[Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    """``nn.Linear``, and Hugging Face's ``Conv1D`` (a Linear with a transposed ``(in, out)``
    weight: the same norms, the elementwise and full results transposed)."""
    transposed = not isinstance(m, nn.Linear)
    xs: list[Tensor] = [u.args[0] for u in uses]
    gs: list[Tensor] = [u.grads[0] for u in uses]  # type: ignore[misc]
    if len(uses) == 1 and xs[0].dim() == 2 and "full" not in want.values():
        # one position per sample: Goodfellow's trick, ‖g_s a_sᵀ‖ = ‖g_s‖‖a_s‖ (the norms
        # as "root"s: the engine squares every layer's at once, at the step)
        a, g = xs[0], gs[0]
        ng = torch.linalg.vector_norm(g, dim=1)
        out: dict[str, Result] = {}
        if "weight" in want:
            w = torch.linalg.vector_norm(a, dim=1).mul_(ng)
            elem = (
                (a.square().t() @ g.square() if transposed else g.square().t() @ a.square())
                if need
                else None
            )
            out["weight"] = ("root", w, elem)
        if "bias" in want:
            out["bias"] = ("root", ng, g.square().sum(0) if need else None)
        return out
    a = cat([seq(x) if x.dim() > 2 else x[:, None] for x in xs], 1)
    g = cat([seq(y) if y.dim() > 2 else y[:, None] for y in gs], 1)
    gram = gram_cheaper(a.shape[1], a.shape[2], g.shape[2])
    if gram and not need and want == {"weight": "norm", "bias": "norm"}:
        # the bias's ‖Σ_t g_t‖² = Σ_{t,u} g_t·g_u is the sum of the Gram the weight's takes
        gg = g @ g.transpose(1, 2)
        w_sq = (a @ a.transpose(1, 2)).mul_(gg).sum((1, 2))
        return {"weight": ("norm", w_sq, None), "bias": ("norm", gg.sum((1, 2)), None)}
    return weight_bias(
        lambda: a.transpose(1, 2) @ g if transposed else g.transpose(1, 2) @ a,
        lambda: g.sum(1),
        want,
        need,
        (lambda: gram_sq(a, g)) if gram else None,
    )


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), recognised without
    importing transformers: ``y = x @ weight + bias`` with ``weight`` of shape ``(nx, nf)``."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))
    )
