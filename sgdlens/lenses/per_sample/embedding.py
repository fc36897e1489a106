"""``nn.Embedding``: norms by a token-equality Gram, elementwise sums from per-token sums."""

from __future__ import annotations

import torch
from torch import nn

from sgdlens.lenses.per_sample._common import Result, Use, cat, seq


def embedding_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and not m.scale_grad_by_freq and m.max_norm is None


def embedding(m: nn.Module, uses: list[Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    assert isinstance(m, nn.Embedding)
    tok = cat([u.args[0].reshape(u.args[0].shape[0], -1) for u in uses], 1)
    g = cat([seq(u.grads[0]) for u in uses], 1)  # type: ignore[arg-type]
    if m.padding_idx is not None:
        g = g * (tok != m.padding_idx).unsqueeze(-1).to(g.dtype)
    if want.get("weight") == "norm" and not need:
        same = (tok[:, :, None] == tok[:, None, :]).to(g.dtype)
        return {"weight": ("norm", (same * (g @ g.transpose(1, 2))).sum((1, 2)), None)}
    b, v = tok.shape[0], m.num_embeddings
    rows = (tok + v * torch.arange(b, device=tok.device)[:, None]).reshape(-1)  # (sample, token)
    g = g.reshape(-1, g.shape[-1])
    if want["weight"] == "norm":
        # Sum g over each (sample, token) pair that occurs: sorted, with fixed-size buffers
        # (no data-dependent shape, so no host sync), never the (B, V, d) per-sample gradients.
        keys, order = rows.sort()
        seg = torch.cat([keys.new_zeros(1), (keys[1:] != keys[:-1]).cumsum(0)])
        pair = g.new_zeros(g.shape).index_add_(0, seg, g[order])  # unused rows stay 0
        key = keys.new_zeros(keys.shape).scatter_(0, seg, keys)
        sq = pair.square()
        per_sample = g.new_zeros(b).index_add_(0, key // v, sq.sum(1))
        elem = g.new_zeros(v, g.shape[1]).index_add_(0, key % v, sq) if need else None
        return {"weight": ("norm", per_sample, elem)}
    full = g.new_zeros(b * v, g.shape[-1]).index_add_(0, rows, g).reshape(b, v, -1)
    return {"weight": ("full", full, None)}
