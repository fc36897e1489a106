"""``nn.MultiheadAttention``: the attention re-run once for the batch, then sequence Linears."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sgdlens.lenses.per_sample._common import (
    Result,
    Use,
    cat,
    gram_cheaper,
    gram_sq,
    weight_bias,
    wide,
)


def attention_ok(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` in its common form: packed in-projection, no ``bias_k``/
    ``bias_v``, no zero-attention row, no attention dropout while training (a backward in
    which the returned attention weights got a gradient goes to ``torch.func`` instead)."""
    return (
        isinstance(m, nn.MultiheadAttention)
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and not m.add_zero_attn
        and (m.dropout == 0.0 or not m.training)
    )


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.forward`` without ``self`` (read once per class)."""
    if cls not in _SIGNATURES:
        sig = inspect.signature(cls.forward)  # type: ignore[attr-defined]
        _SIGNATURES[cls] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return _SIGNATURES[cls]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An attention mask as ``nn.MultiheadAttention`` reads it (bool: True = masked out) as an
    additive float mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


def attention(m: nn.Module, uses: list[Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    """``nn.MultiheadAttention``: the attention is recomputed once for the batch, from the
    recorded inputs, to get the gradients of the projected queries, keys and values; the
    in- and out-projections are then Linear layers over the sequence (Gram trick or
    materialised), the in-projection's three blocks stacked."""
    assert isinstance(m, nn.MultiheadAttention)
    e, h = m.embed_dim, m.num_heads
    w_in, b_in = m.in_proj_weight, m.in_proj_bias
    w_out = m.out_proj.weight
    sig = _signature(type(m))
    xs: list[list[Tensor]] = [[], [], []]  # inputs of the q, k, v projections
    gs: list[list[Tensor]] = [[], [], []]  # gradients of the projections' outputs
    os_, gos = [], []  # the out-projection's input and output gradient
    for u in uses:
        args = sig.bind(*u.args, **u.kwargs).arguments
        go = u.grads[0]
        assert go is not None
        seqs = [wide(args[n]) for n in ("query", "key", "value")]
        same = args["query"] is args["key"] is args["value"]  # self-attention
        if not m.batch_first:  # (L, B, E) -> (B, L, E)
            seqs, go = [x.transpose(0, 1) for x in seqs], go.transpose(0, 1)
        if same:
            seqs = [seqs[0]] * 3
        b, lq, ls = seqs[0].shape[0], seqs[0].shape[1], seqs[1].shape[1]
        dtype = seqs[0].dtype
        mask = _additive(args.get("attn_mask"), dtype)
        if mask is not None and mask.dim() == 3:  # (B·H, L, S)
            mask = mask.view(b, h, lq, ls)
        if mask is None and args.get("is_causal", False):
            mask = _additive(torch.ones(lq, ls, dtype=torch.bool, device=go.device).triu(1), dtype)
        pad = _additive(args.get("key_padding_mask"), dtype)
        if pad is not None:
            pad = pad.view(b, 1, 1, ls)
            mask = pad if mask is None else mask + pad
        bias = None if b_in is None else wide(b_in)
        if same:  # one packed projection
            proj = list(F.linear(seqs[0], wide(w_in), bias).chunk(3, -1))
        else:
            ws, bs = wide(w_in).chunk(3), (None,) * 3 if bias is None else bias.chunk(3)
            proj = [F.linear(x, w, c) for x, w, c in zip(seqs, ws, bs)]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in proj]
            heads = [t.view(b, -1, h, e // h).transpose(1, 2) for t in leaves]
            o = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], attn_mask=mask)
            o = o.transpose(1, 2).reshape(b, lq, e)
            grads = torch.autograd.grad(o, leaves, go @ wide(w_out))
        for j in range(3):
            xs[j].append(seqs[j])
            gs[j].append(grads[j])
        os_.append(o.detach())
        gos.append(go)
    a3 = [cat(x, 1) for x in xs]
    g3 = [cat(g, 1) for g in gs]
    a_o, g_o = cat(os_, 1), cat(gos, 1)
    gram = all(gram_cheaper(a.shape[1], e, e) for a in a3)
    out: dict[str, Result] = {}

    def in_sq() -> Tensor:  # Σ over q, k, v of Σ_{t,u} (a_t·a_u)(g_t·g_u); one Gram of a shared a
        grams: dict[int, Tensor] = {}
        total = None
        for a, g in zip(a3, g3):
            if id(a) not in grams:
                grams[id(a)] = a @ a.transpose(1, 2)
            sq = (grams[id(a)] * (g @ g.transpose(1, 2))).sum((1, 2))
            total = sq if total is None else total + sq
        assert total is not None
        return total

    inner = {n[len("in_proj_") :]: w for n, w in want.items() if n.startswith("in_proj_")}
    for n, r in weight_bias(
        lambda: torch.cat([g.transpose(1, 2) @ a for a, g in zip(a3, g3)], 1),
        lambda: torch.cat([g.sum(1) for g in g3], 1),
        inner,
        need,
        in_sq if gram else None,
    ).items():
        out[f"in_proj_{n}"] = r
    inner = {n[len("out_proj.") :]: w for n, w in want.items() if n.startswith("out_proj.")}
    for n, r in weight_bias(
        lambda: g_o.transpose(1, 2) @ a_o,
        lambda: g_o.sum(1),
        inner,
        need,
        (lambda: gram_sq(a_o, g_o)) if gram_cheaper(a_o.shape[1], e, e) else None,
    ).items():
        out[f"out_proj.{n}"] = r
    return out
