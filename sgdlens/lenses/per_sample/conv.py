"""``nn.Conv1d``/``2d``/``3d``: per-sample gradients by a grouped convolution backward or unfold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn

from sgdlens.lenses.per_sample._common import Result, Use, cat, gram_cheaper, gram_sq, weight_bias

_CONV_WEIGHT = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


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
    """Per-sample conv gradients, by the cheaper of (timed on a 2-core CPU, batch 32–64):

    * one convolution backward with the batch folded into the groups (``B·groups`` groups):
      the default, and on the CPU the faster for 5–64 input channels;
    * ``groups=1`` 1-d/2-d: a batched matmul over the unfolded input, the rule of a
      sequence Linear with positions as the sequence: the Gram trick for norms when it is
      cheaper, else materialised; on the CPU also for 1–4 or over 64 input channels, where
      it was 1.5–4× faster than the grouped backward (0.26 vs 0.98 ms for 1->16 channels at
      28x28). The input is unfolded by one strided copy of its padded windows (2–3× faster
      than ``F.unfold`` on the CPU). 3-d convolutions, not timed, keep the grouped backward.

    Norms alone are taken from the method's own layout.
    """
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    w = m.weight
    nd, b = w.dim() - 2, uses[0].args[0].shape[0]
    pads = _conv_padding(m)
    gs: list[Tensor] = [u.grads[0] for u in uses]  # type: ignore[misc]
    t = sum(g[0, 0].numel() for g in gs)
    d_in, d_out, c_in = w[0].numel(), w.shape[0], w.shape[1]
    cpu = gs[0].device.type == "cpu"
    flat = m.groups == 1 and nd < 3  # (3-d convolutions were not timed: grouped backward)
    gram = flat and gram_cheaper(t, d_in, d_out)
    unfold = flat and cpu and not 5 <= c_in <= 64
    # zero padding the same on both sides goes into the grouped backward (no padded copy)
    inside = m.padding_mode == "zeros" and pads[0::2] == pads[1::2] and not (gram or unfold)
    xs = []
    for u in uses:
        x = u.args[0]
        if any(pads) and not inside:
            x = F.pad(x, pads, "constant" if m.padding_mode == "zeros" else m.padding_mode)
        xs.append(x)
    padding = tuple(reversed(pads[0::2])) if inside else (0,) * nd

    def unfolded() -> tuple[Tensor, Tensor]:  # (B, T, in·k), (B, T, out)
        us = []
        for x, go in zip(xs, gs):
            st, sp = x.stride(), range(2, 2 + nd)
            win = x.as_strided(  # [s, i, *k, *out] = x[s, i, *(out·stride + k·dilation)]
                (b, c_in, *m.kernel_size, *go.shape[2:]),
                (
                    st[0],
                    st[1],
                    *(st[j] * m.dilation[j - 2] for j in sp),
                    *(st[j] * m.stride[j - 2] for j in sp),
                ),
            )
            us.append(win.reshape(b, d_in, -1).transpose(1, 2))
        g = cat([go.reshape(b, d_out, -1).transpose(1, 2) for go in gs], 1)
        return cat(us, 1), g

    def full() -> Tensor:
        if unfold:
            a, g = unfolded()
            return (g.transpose(1, 2) @ a).reshape(b, *w.shape)
        total = None
        for x, go in zip(xs, gs):
            one = _CONV_WEIGHT[nd](
                x.reshape(1, -1, *x.shape[2:]),
                (b * w.shape[0], *w.shape[1:]),
                go.reshape(1, -1, *go.shape[2:]),
                m.stride,
                padding,
                m.dilation,
                b * m.groups,
            ).reshape(b, *w.shape)
            total = one if total is None else total + one
        assert total is not None
        return total

    def norms() -> Tensor:  # as roots (the engine squares them)
        if unfold and d_out <= 16:  # (B, in·k, out): for few outputs MKL's batched matmul
            a, g = unfolded()  # took 1.5-1.7x less time in this order (1->16, 4->16 convs)
            return torch.linalg.vector_norm((a.transpose(1, 2) @ g).reshape(b, -1), dim=1)
        return torch.linalg.vector_norm(full().reshape(b, -1), dim=1)

    def gsum() -> Tensor:
        return sum(go.reshape(b, d_out, -1).sum(2) for go in gs)  # type: ignore[return-value]

    gram_norms = (lambda: gram_sq(*unfolded())) if gram else None
    return weight_bias(full, gsum, want, need, gram_norms, None if gram else norms)
