"""``nn.Conv1d``/``2d``/``3d``: per-sample gradients by a grouped convolution backward or unfold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn

from sgdlens.lenses.per_sample._common import Result, Use, cat, gram_cheaper, gram_sq, weight_bias

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}  # fmt: skip
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
    """Per-sample conv gradients, by the cheapest of (timed on a 2-core CPU, batch 64):

    * one convolution backward with the batch folded into the groups (``B·groups`` groups):
      the default, and the fastest for 4–64 input channels;
    * ``groups=1`` on the CPU with 1–3 input channels: one forward convolution of the input
      with the batch as channels (``B`` groups) by the output gradients as kernels (stride
      and dilation swapped), 1.3–1.6× faster than the unfolded matmul below there;
    * ``groups=1`` 1-d/2-d: a batched matmul over the unfolded input (``F.unfold``), the
      rule of a sequence Linear with positions as the sequence: the Gram trick for norms
      when it is cheaper, else materialised; on the CPU also for over 64 input channels,
      where the grouped backward was up to 3× slower.

    Norms alone are summed from whichever layout the method gives, without reordering it.
    """
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    w = m.weight
    nd, b = w.dim() - 2, uses[0].args[0].shape[0]
    pads = _conv_padding(m)
    # zero padding the same on both sides goes to the convolution itself (no padded copy)
    inside = m.padding_mode == "zeros" and pads[0::2] == pads[1::2]
    xs, gs = [], []
    for u in uses:
        x, go = u.args[0], u.grads[0]
        assert go is not None
        if any(pads) and not inside:
            x = F.pad(x, pads, "constant" if m.padding_mode == "zeros" else m.padding_mode)
        xs.append(x)
        gs.append(go)
    padding = tuple(reversed(pads[0::2])) if inside else (0,) * nd
    t = sum(g[0, 0].numel() for g in gs)
    d_in, d_out, c_in = w[0].numel(), w.shape[0], w.shape[1]
    cpu = xs[0].device.type == "cpu"
    can_unfold = m.groups == 1 and nd < 3
    gram = can_unfold and gram_cheaper(t, d_in, d_out)
    swap = m.groups == 1 and cpu and c_in <= 3
    unfold = can_unfold and cpu and c_in > 64

    def unfolded() -> tuple[Tensor, Tensor]:  # (B, T, in·k), (B, T, out)
        us = []
        for x in xs:
            k, dil, st, pad = m.kernel_size, m.dilation, m.stride, padding
            if nd == 1:
                x = x[:, :, None]
                k, dil, st, pad = (1, *k), (1, *dil), (1, *st), (0, *pad)
            us.append(F.unfold(x, k, dilation=dil, stride=st, padding=pad).transpose(1, 2))
        g = cat([go.reshape(b, d_out, -1).transpose(1, 2) for go in gs], 1)
        return cat(us, 1), g

    def raw() -> Tensor:
        """The per-sample gradients summed over the uses: ``(in, B, out, *k)`` when
        ``swap``, else ``(B, out, in, *k)``."""
        if unfold:
            a, g = unfolded()
            return (g.transpose(1, 2) @ a).reshape(b, *w.shape)
        total = None
        for x, go in zip(xs, gs):
            if swap:  # c[s,o,i,k] = Σ_p g[s,o,p] x[s,i,p·stride + k·dilation]
                one = _CONV[nd](
                    x.transpose(0, 1), go.reshape(b * d_out, 1, *go.shape[2:]),
                    stride=m.dilation, padding=padding, dilation=m.stride, groups=b,
                )  # fmt: skip
                for d, k in enumerate(m.kernel_size):  # past the kernel: leftover rows
                    one = one.narrow(2 + d, 0, k)
            else:
                one = _CONV_WEIGHT[nd](
                    x.reshape(1, -1, *x.shape[2:]), (b * w.shape[0], *w.shape[1:]),
                    go.reshape(1, -1, *go.shape[2:]), m.stride, padding, m.dilation,
                    b * m.groups,
                )  # fmt: skip
            total = one if total is None else total + one
        assert total is not None
        return total

    def full() -> Tensor:
        r = raw()
        if swap:
            return r.reshape(c_in, b, d_out, -1).permute(1, 2, 0, 3).reshape(b, *w.shape)
        return r.reshape(b, *w.shape)

    def norms() -> Tensor:  # as roots (the engine squares them)
        r = raw()
        if swap:
            return torch.linalg.vector_norm(r.reshape(c_in, b, -1), dim=(0, 2))
        return torch.linalg.vector_norm(r.reshape(b, -1), dim=1)

    def gsum() -> Tensor:
        return sum(go.reshape(b, d_out, -1).sum(2) for go in gs)  # type: ignore[return-value]

    gram_norms = (lambda: gram_sq(*unfolded())) if gram else None
    return weight_bias(full, gsum, want, need, gram_norms, None if gram else norms)
