"""``nn.LayerNorm`` and ``nn.RMSNorm``: per-sample gradients materialised (they are small)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sgdlens.lenses.per_sample._common import Result, Use, cat, from_full


def norm_layer(
    m: nn.Module, uses: list[Use], want: dict[str, str], need: bool
) -> dict[str, Result]:
    """``nn.LayerNorm`` / ``nn.RMSNorm``: c_s(weight) = Σ_t g_t ⊙ x̂_t, c_s(bias) = Σ_t g_t."""
    shape = tuple(m.normalized_shape)  # type: ignore[arg-type]
    xs, gs = [], []
    for u in uses:
        x, go = u.args[0], u.grads[0]
        assert go is not None
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(x, shape, eps=m.eps)
        else:
            xhat = F.rms_norm(x, shape, eps=m.eps)  # type: ignore[arg-type]
        xs.append(xhat.reshape(x.shape[0], -1, *shape))
        gs.append(go.reshape(go.shape[0], -1, *shape))
    xhat, g = cat(xs, 1), cat(gs, 1)
    fulls = {"weight": lambda: (g * xhat).sum(1), "bias": lambda: g.sum(1)}
    return {
        n: ("full", fulls[n](), None) if w == "full" else from_full(fulls[n](), need)
        for n, w in want.items()
    }
