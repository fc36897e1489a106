"""``nn.Conv1d``/``2d``/``3d``: per-sample gradients by a grouped convolution backward or unfold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn

from sgdlens.lenses.per_sample._common import Result, Use, cat, gram_cheaper, gram_sq, weight_bias

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}  # fmt: skip


def _conv_padding(m: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> list[int]:
    """The (left, right) padding of each spatial dim, last dim first, as ``F.pad`` takes it."""
    k, dil, pad = m.kernel_size, m.dilation, m.padding
    out: list[int] = []
    for i in reversed(range(len(k))):
        if isinstance(pad, str):  # "valid" or "same" (stride 1; the extra pad on the right)
            total = dil[i] * (k[i] - 1) if pad == "same" else 0
            out += [total // 2, total - total // 2]
        else:
            out += [pad[i], pad[i]]
    return out


def conv(m: nn.Module, uses: list[Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    """Per-sample conv gradients, by the cheaper of (timed on a 2-core CPU):

    * one convolution backward with the batch folded into the groups (``B·groups`` groups);
    * ``groups=1`` 1-d/2-d: a batched matmul over the unfolded input (``F.unfold``), the
      rule of a sequence Linear with positions as the sequence: the Gram trick for norms
      when it is cheaper, else materialised; on the CPU also for 1–3 or over 64 input
      channels, where the grouped backward was up to 3× slower than the unfolded matmul.
    """
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    w = m.weight
    nd, b = w.dim() - 2, uses[0].args[0].shape[0]
    xs, gs = [], []
    for u in uses:
        x, go = u.args[0], u.grads[0]
        assert go is not None
        pad = _conv_padding(m)
        if any(pad):
            x = F.pad(x, pad, "constant" if m.padding_mode == "zeros" else m.padding_mode)
        xs.append(x)
        gs.append(go)
    t = sum(g[0, 0].numel() for g in gs)
    d_in, d_out = w[0].numel(), w.shape[0]
    can_unfold = m.groups == 1 and nd < 3
    gram = can_unfold and gram_cheaper(t, d_in, d_out)
    unfold = can_unfold and xs[0].device.type == "cpu" and not 4 <= w.shape[1] <= 64

    def unfolded() -> tuple[Tensor, Tensor]:  # (B, T, in·k), (B, T, out)
        us = []
        for x in xs:
            k, dil, st = m.kernel_size, m.dilation, m.stride
            if nd == 1:
                x = x[:, :, None]
                k, dil, st = (1, *k), (1, *dil), (1, *st)
            us.append(F.unfold(x, k, dilation=dil, stride=st).transpose(1, 2))
        g = cat([go.reshape(b, d_out, -1).transpose(1, 2) for go in gs], 1)
        return cat(us, 1), g

    def full() -> Tensor:
        if unfold:
            a, g = unfolded()
            return (g.transpose(1, 2) @ a).reshape(b, *w.shape)
        total = None
        for x, go in zip(xs, gs):
            one = _CONV_WEIGHT[nd](
                x.reshape(1, -1, *x.shape[2:]), (b * w.shape[0], *w.shape[1:]),
                go.reshape(1, -1, *go.shape[2:]), m.stride, 0, m.dilation, b * m.groups,
            ).reshape(b, *w.shape)  # fmt: skip
            total = one if total is None else total + one
        assert total is not None
        return total

    def gsum() -> Tensor:
        return sum(go.reshape(b, d_out, -1).sum(2) for go in gs)  # type: ignore[return-value]

    return weight_bias(full, gsum, want, need, (lambda: gram_sq(*unfolded())) if gram else None)
