"""Slow float64 references, written independently of sgdlens: per-tensor Python loops."""

from __future__ import annotations

import math

import torch


def layer_vectors(tensors, layer_of, n_layers):
    """Concatenate per-parameter tensors (float64, flattened) into one vector per layer."""
    out = [[] for _ in range(n_layers)]
    for t, layer in zip(tensors, layer_of):
        out[layer].append(t.detach().to(torch.float64).to_dense().reshape(-1))
    return [torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for v in out]


def window_snr(grads_per_step):
    """grads_per_step: list over steps of a 1-D float64 vector. Population statistics."""
    k = len(grads_per_step)
    mean = [sum(g[i] for g in grads_per_step) / k for i in range(len(grads_per_step[0]))]
    mean_norm = math.sqrt(sum(float(m) ** 2 for m in mean))
    var = 0.0
    for i in range(len(mean)):
        var += sum((float(g[i]) - float(mean[i])) ** 2 for g in grads_per_step) / k
    std = math.sqrt(var)
    return mean_norm, std, (mean_norm / std if std > 0 else math.inf)


def window_snr_fast(grads_per_step):
    """The same statistic with float64 tensor maths (for long vectors)."""
    g = torch.stack(grads_per_step)
    mean = g.mean(0)
    var = ((g - mean) ** 2).mean(0).sum()
    m, s = float(mean.norm()), float(var.sqrt())
    return m, s, (m / s if s > 0 else math.inf)


def ema_snr(grads_per_step, beta):
    m = torch.zeros_like(grads_per_step[0])
    s = 0.0
    t = 0
    for t, g in enumerate(grads_per_step, 1):  # noqa: B007 - t is used after the loop
        m = beta * m + (1 - beta) * g
        s = beta * s + (1 - beta) * float(g @ g)
    corr = 1 - beta**t
    mean_sq = float(m @ m) / corr**2
    second = s / corr
    var = max(second - mean_sq, 0.0)
    return math.sqrt(mean_sq), math.sqrt(var), math.sqrt(mean_sq) / math.sqrt(var)
