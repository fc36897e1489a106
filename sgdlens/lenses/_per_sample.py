"""Per-sample gradient statistics from module hooks, shared by NoiseScale and BatchSNR.

A forward hook on each covered module keeps references to its inputs and registers a tensor
hook on its outputs for the gradient flowing back into them; a hook on each parameter
(``Tensor.register_hook`` on a leaf runs once per backward, with the summed incoming
gradient, just before it is accumulated into ``.grad``) then turns activations and output
gradients into per-sample statistics of that parameter's gradient contribution ``c_s``:

* ``sq``: Σ_s ‖c_s‖² (and, with ``keep_last``, the per-sample vector of the last backward);
* ``elem`` (with ``need_elem``): Σ_s c_s² elementwise, shaped like the parameter.

Rules (all exact up to rounding; "materialise" means per-sample gradients of that one
parameter, shape ``(B, *p.shape)``, exist for a moment):

* ``nn.Linear`` on ``(B, in)``: ‖c_s‖² = ‖g_s‖²‖a_s‖² (Goodfellow's trick); elementwise
  Σ_s c_s² = (g²)ᵀ(a²). Nothing per-sample is materialised.
* ``nn.Linear`` on sequences ``(B, …, in)``: c_s = Σ_t g_st a_stᵀ. Norms by the Gram trick
  ‖c_s‖² = Σ_{t,u} (a_t·a_u)(g_t·g_u) when ``T(in+out) ≤ in·out``, else materialised;
  elementwise sums materialise.
* ``nn.Conv1d``/``2d``/``3d`` (any groups, stride, dilation, padding and padding mode):
  per-sample gradients materialised by one convolution backward with the batch folded into
  the groups (``B·groups`` groups) or, for ``groups=1`` 1-d/2-d layers, as a sequence Linear
  over the unfolded input (``F.unfold``, positions as the sequence), whose Gram trick gives
  the norms without materialising when there are few positions and many channels.
* ``nn.Embedding``: ‖c_s‖² = Σ_{t,u} [x_t = x_u] g_t·g_u (Gram with a token-equality mask);
  elementwise sums from the per-(sample, token) sums of g over the pairs that occur (sorted,
  ``(B·T, d)`` buffers), never ``(B, V, d)`` (except for a weight shared with another module,
  whose per-sample gradients are materialised and summed). ``padding_idx`` rows get no
  gradient, as in torch. ``scale_grad_by_freq`` and ``max_norm`` go to the fallback.
* Hugging Face's ``Conv1D`` (GPT-2; ``y = x W + b`` with ``W`` of shape ``(in, out)``): the
  ``nn.Linear`` rules with the weight transposed.
* ``nn.LayerNorm``, ``nn.RMSNorm``: c_s(weight) = Σ_t g_t ⊙ x̂_t, c_s(bias) = Σ_t g_t,
  materialised (small).
* ``nn.MultiheadAttention`` (packed in-projection, no ``bias_k``/``bias_v`` or
  ``add_zero_attn``, no attention dropout while training; any masks, ``is_causal``,
  ``batch_first`` either way; mode ``"auto"`` only, since it re-runs the attention): the
  attention recomputed once for the batch from the recorded inputs gives the gradients of the
  projected queries, keys and values; the in- and out-projections are then sequence Linears.
  It costs about one more forward and backward of the attention block (vs. ``vmap`` of it).
* any other module owning parameters (and other ``nn.MultiheadAttention`` forms, as a whole,
  since it reads ``out_proj``'s weights without calling it): ``torch.func`` fallback, ``vmap`` over
  ``vjp`` of the module re-run on each sample with its recorded output gradient. Exact for
  modules that treat samples independently and draw no random numbers (dropout ``p=0`` or
  eval); tensor arguments whose first dimension is the batch size are split per sample.

A module called several times between two backward passes (weight sharing, recurrence)
has its uses joined along the sequence axis, which is exact: the per-sample gradient is the
sum over uses. A parameter shared by several modules (tied embeddings) has its per-sample
gradients materialised by each module and summed. Batch norm makes per-sample gradients
undefined and is not supported. The batch is dimension 0 of every activation (the attention
rule also reads ``batch_first=False``; the ``torch.func`` fallback needs dimension 0 and leaves a
sequence-first attention out, with a warning).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.grad
from torch import Tensor, nn

from sgdlens._quiet import probing_now
from sgdlens._torch import pytree

__all__ = ["MODES", "PerSampleEngine", "index_sums"]

MODES = ("auto", "hooks", "func")

# A rule's answer for one parameter: ("norm", sq (B,), elem or None) or ("full", (B, *shape)).
Result = tuple[str, Tensor, Tensor | None]


class _Use:
    """One forward call of a module: its inputs, its outputs' shapes and their gradients.

    The outputs themselves are not kept: a hook on an output lives on its ``grad_fn``, so a
    reference from the hook back to the output would be a cycle through the autograd graph,
    which Python's garbage collector cannot see (every step's graph would leak).
    """

    __slots__ = ("args", "got", "grads", "kwargs", "output")

    def __init__(self, args: Any, kwargs: Any, output: list[Tensor]) -> None:
        self.args, self.kwargs = args, kwargs
        self.output = [_Like(t) for t in output]
        self.grads: list[Tensor | None] = [None] * len(output)
        self.got: list[bool] = []  # which outputs received a gradient (set before processing)


class _Like:
    """The shape, dtype and device of a tensor, without the tensor."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, t: Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def dim(self) -> int:
        return len(self.shape)

    def zeros(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def _tensors(output: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]


def _seq(t: Tensor) -> Tensor:
    """``(B, …, d)`` as ``(B, T, d)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _from_full(full: Tensor, need_elem: bool) -> Result:
    sq = full.reshape(full.shape[0], -1).square().sum(1)
    return ("norm", sq, full.square().sum(0) if need_elem else None)


# -- rules: (module, uses, want) -> {param name: Result}; want[name] is "norm" or "full" -----


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat``, except that one tensor is returned as it is (no copy of a strided view)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _gram_cheaper(t: int, d_in: int, d_out: int) -> bool:
    """Whether norms by the Gram trick (``T²(in+out)`` per sample) beat materialising
    (``T·in·out``)."""
    return t * (d_in + d_out) <= d_in * d_out


def _gram_sq(a: Tensor, g: Tensor) -> Tensor:
    """‖Σ_t g_t a_tᵀ‖² per sample from a (B,T,in), g (B,T,out): Σ_{t,u} (a_t·a_u)(g_t·g_u)."""
    return (a @ a.transpose(1, 2)).mul_(g @ g.transpose(1, 2)).sum((1, 2))


def _weight_bias(
    w: Callable[[], Tensor], gsum: Callable[[], Tensor], want: dict[str, str], need: bool,
    w_sq: Callable[[], Tensor] | None = None,
) -> dict[str, Result]:  # fmt: skip
    """Results for ``weight`` (full per-sample gradients ``w()``, or their squared norms
    ``w_sq()`` when cheaper and enough) and ``bias`` (per-sample gradients ``gsum()``)."""
    out: dict[str, Result] = {}
    if "weight" in want:
        if w_sq is not None and want["weight"] == "norm" and not need:
            out["weight"] = ("norm", w_sq(), None)
        else:
            full = w()
            out["weight"] = (
                ("full", full, None) if want["weight"] == "full" else _from_full(full, need)
            )
    if "bias" in want:
        b = gsum()
        out["bias"] = ("full", b, None) if want["bias"] == "full" else _from_full(b, need)
    return out


def _linear(m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    """``nn.Linear``, and Hugging Face's ``Conv1D`` (a Linear with a transposed ``(in, out)``
    weight: the same norms, the elementwise and full results transposed)."""
    transposed = not isinstance(m, nn.Linear)
    xs: list[Tensor] = [u.args[0] for u in uses]
    gs: list[Tensor] = [u.grads[0] for u in uses]  # type: ignore[misc]
    if len(uses) == 1 and xs[0].dim() == 2 and "full" not in want.values():
        # one position per sample: Goodfellow's trick, ‖g_s a_sᵀ‖ = ‖g_s‖‖a_s‖
        a, g = xs[0], gs[0]
        ng = torch.linalg.vector_norm(g, dim=1)
        out: dict[str, Result] = {}
        if "weight" in want:
            w_sq = torch.linalg.vector_norm(a, dim=1).mul_(ng).square_()
            elem = (a.square().t() @ g.square() if transposed else g.square().t() @ a.square()
                    ) if need else None  # fmt: skip
            out["weight"] = ("norm", w_sq, elem)
        if "bias" in want:
            out["bias"] = ("norm", ng.square(), g.square().sum(0) if need else None)
        return out
    a = _cat([_seq(x) if x.dim() > 2 else x[:, None] for x in xs], 1)
    g = _cat([_seq(y) if y.dim() > 2 else y[:, None] for y in gs], 1)
    gram = _gram_cheaper(a.shape[1], a.shape[2], g.shape[2])
    return _weight_bias(lambda: a.transpose(1, 2) @ g if transposed else g.transpose(1, 2) @ a,
                        lambda: g.sum(1), want, need,
                        (lambda: _gram_sq(a, g)) if gram else None)  # fmt: skip


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), recognised without
    importing transformers: ``y = x @ weight + bias`` with ``weight`` of shape ``(nx, nf)``."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))
    )


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


def _conv(m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool) -> dict[str, Result]:
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
    gram = can_unfold and _gram_cheaper(t, d_in, d_out)
    unfold = can_unfold and xs[0].device.type == "cpu" and not 4 <= w.shape[1] <= 64

    def unfolded() -> tuple[Tensor, Tensor]:  # (B, T, in·k), (B, T, out)
        us = []
        for x in xs:
            k, dil, st = m.kernel_size, m.dilation, m.stride
            if nd == 1:
                x = x[:, :, None]
                k, dil, st = (1, *k), (1, *dil), (1, *st)
            us.append(F.unfold(x, k, dilation=dil, stride=st).transpose(1, 2))
        g = _cat([go.reshape(b, d_out, -1).transpose(1, 2) for go in gs], 1)
        return _cat(us, 1), g

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

    return _weight_bias(full, gsum, want, need, (lambda: _gram_sq(*unfolded())) if gram else None)


def _embedding_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and not m.scale_grad_by_freq and m.max_norm is None


def _embedding(
    m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool
) -> dict[str, Result]:
    assert isinstance(m, nn.Embedding)
    tok = _cat([u.args[0].reshape(u.args[0].shape[0], -1) for u in uses], 1)
    g = _cat([_seq(u.grads[0]) for u in uses], 1)  # type: ignore[arg-type]
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


def _norm_layer(
    m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool
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
    xhat, g = _cat(xs, 1), _cat(gs, 1)
    fulls = {"weight": lambda: (g * xhat).sum(1), "bias": lambda: g.sum(1)}
    return {
        n: ("full", fulls[n](), None) if w == "full" else _from_full(fulls[n](), need)
        for n, w in want.items()
    }


def _mha_ok(m: nn.Module) -> bool:
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


def _mha(m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool) -> dict[str, Result]:
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
        seqs = [_wide(args[n]) for n in ("query", "key", "value")]
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
        bias = None if b_in is None else _wide(b_in)
        if same:  # one packed projection
            proj = list(F.linear(seqs[0], _wide(w_in), bias).chunk(3, -1))
        else:
            ws, bs = _wide(w_in).chunk(3), (None,) * 3 if bias is None else bias.chunk(3)
            proj = [F.linear(x, w, c) for x, w, c in zip(seqs, ws, bs)]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in proj]
            heads = [t.view(b, -1, h, e // h).transpose(1, 2) for t in leaves]
            o = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], attn_mask=mask)
            o = o.transpose(1, 2).reshape(b, lq, e)
            grads = torch.autograd.grad(o, leaves, go @ _wide(w_out))
        for j in range(3):
            xs[j].append(seqs[j])
            gs[j].append(grads[j])
        os_.append(o.detach())
        gos.append(go)
    a3 = [_cat(x, 1) for x in xs]
    g3 = [_cat(g, 1) for g in gs]
    a_o, g_o = _cat(os_, 1), _cat(gos, 1)
    gram = all(_gram_cheaper(a.shape[1], e, e) for a in a3)
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
    for n, r in _weight_bias(
        lambda: torch.cat([g.transpose(1, 2) @ a for a, g in zip(a3, g3)], 1),
        lambda: torch.cat([g.sum(1) for g in g3], 1), inner, need, in_sq if gram else None,
    ).items():  # fmt: skip
        out[f"in_proj_{n}"] = r
    inner = {n[len("out_proj.") :]: w for n, w in want.items() if n.startswith("out_proj.")}
    for n, r in _weight_bias(
        lambda: g_o.transpose(1, 2) @ a_o, lambda: g_o.sum(1), inner, need,
        (lambda: _gram_sq(a_o, g_o)) if _gram_cheaper(a_o.shape[1], e, e) else None,
    ).items():  # fmt: skip
        out[f"out_proj.{n}"] = r
    return out


Rule = Callable[[nn.Module, list[_Use], dict[str, str], bool], dict[str, Result]]
RULES: dict[type, tuple[Rule, Callable[[nn.Module], bool]]] = {
    nn.Linear: (_linear, lambda m: True),
    nn.Conv1d: (_conv, lambda m: True),
    nn.Conv2d: (_conv, lambda m: True),
    nn.Conv3d: (_conv, lambda m: True),
    nn.Embedding: (_embedding, _embedding_ok),
    nn.LayerNorm: (_norm_layer, lambda m: True),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    RULES[nn.RMSNorm] = (_norm_layer, lambda m: True)


def _func_rule(
    m: nn.Module, uses: list[_Use], want: dict[str, str], need: bool
) -> dict[str, Result]:
    """The torch.func fallback: vmap over the vjp of the module re-run on one sample."""
    from torch.func import functional_call, vjp, vmap

    names = list(want)
    own = dict(m.named_parameters())
    params = {n: own[n].detach() for n in names}
    totals: dict[str, Tensor] = {}
    for use in uses:
        leaves, spec = pytree.tree_flatten((use.args, use.kwargs))
        tens = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        batch = leaves[tens[0]].shape[0]
        dims = tuple(0 if leaves[i].dim() > 0 and leaves[i].shape[0] == batch else None
                     for i in tens)  # fmt: skip
        cot_dims = tuple(0 if o.dim() > 0 and o.shape[0] == batch else None for o in use.output)
        for j, (d, got) in enumerate(zip(cot_dims, use.got)):
            if d is None and got:
                raise ValueError(
                    f"its output {j} (shape {tuple(use.output[j].shape)}) has no batch dimension "
                    f"and gets a gradient (a loss computed inside the module, say)"
                )
        cots = tuple(o.zeros() if gr is None else gr for o, gr in zip(use.output, use.grads))
        buffers = {n: b.clone() for n, b in m.named_buffers()}

        def one(cot: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> dict[str, Tensor]:
            filled = list(leaves)  # noqa: B023 - used at once by vmap below
            for i, x, d in zip(tens, xs, dims):  # noqa: B023
                filled[i] = x.unsqueeze(0) if d == 0 else x
            args, kwargs = pytree.tree_unflatten(filled, spec)  # noqa: B023

            def f(ps: dict[str, Tensor]) -> tuple[Tensor, ...]:
                out = functional_call(m, ({**ps, **buffers}), tuple(args), kwargs)  # noqa: B023
                return tuple(_tensors(out))

            pull = vjp(f, params)[1]
            return pull(tuple(c.unsqueeze(0) if d == 0 else c
                              for c, d in zip(cot, cot_dims)))[0]  # fmt: skip  # noqa: B023

        grads = vmap(one, in_dims=(cot_dims, dims), randomness="different")(
            cots, tuple(leaves[i] for i in tens)
        )
        for n in names:
            totals[n] = grads[n] if n not in totals else totals[n] + grads[n]
    return {
        n: ("full", totals[n], None) if w == "full" else _from_full(totals[n], need)
        for n, w in want.items()
    }


def index_sums(
    parts: list[list[Tensor]], dtype: torch.dtype, device: torch.device,
    cache: dict[tuple[tuple[int, int], ...], Tensor], square: bool = False,
) -> Tensor:  # fmt: skip
    """``out[i]`` = the sum of every entry of ``parts[i]`` (0-d or 1-D tensors; of their
    squares with ``square``) in ``dtype`` on ``device``: one concatenation and one
    ``index_add_``, the index tensor of each layout kept in ``cache``."""
    flat = [t.reshape(-1).to(device) for ts in parts for t in ts]
    out = torch.zeros(len(parts), dtype=dtype, device=device)
    if not flat:
        return out
    layout = tuple((i, t.numel()) for i, ts in enumerate(parts) for t in ts)
    if layout not in cache:
        cache[layout] = torch.tensor(
            [i for i, n in layout for _ in range(n)], dtype=torch.long, device=device
        )
    values = torch.cat(flat).to(dtype)
    return out.index_add_(0, cache[layout], values.square() if square else values)


class _Unit:
    """A module whose forward calls give the per-sample gradients of ``names``."""

    def __init__(self, module: nn.Module, rule: Rule, names: dict[str, int]) -> None:
        self.module, self.rule, self.names = module, rule, names  # names: param name -> index
        self.uses: list[_Use] = []
        self.result: dict[str, Result] | None = None
        self.want: dict[str, str] = {}
        self.excluded = False  # its output does not carry the batch (see _exclude)


class PerSampleEngine:
    """Hooks computing per-sample gradient statistics of ``params`` inside ``model``.

    Args:
        model: the module whose forward and backward produce the gradients.
        params: the parameters to cover (others are left alone).
        mode: ``"auto"`` (rules where they exist, ``torch.func`` elsewhere), ``"hooks"``
            (rules only; other parameters uncovered) or ``"func"`` (``torch.func`` for all).
        need_elem: also accumulate Σ_s c_s² elementwise.
        keep_last: keep the per-sample squared norms of the last backward in ``last_sq``.
        dtype: dtype of the accumulated ``sq`` scalars.

    Attributes:
        covered: per parameter, whether some hook computes its per-sample statistics (set to
            ``False``, with a warning, for a module whose output turns out not to carry the
            model's batch along its batch dimension).
        elem, count: per parameter, Σ_s c_s² and the number of samples since the last
            :meth:`reset` (``None``/0 before any backward); :meth:`sums` gives Σ_s ‖c_s‖².
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        *,
        mode: str = "auto",
        need_elem: bool = False,
        keep_last: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.model, self.params, self.mode = model, list(params), mode
        self.batch: int | None = None
        self.need_elem, self.keep_last, self.dtype = need_elem, keep_last, dtype
        self._busy = False
        index = {id(p): i for i, p in enumerate(self.params)}
        self.units: list[_Unit] = []
        self._visit(model, index)
        self.units_of: list[list[tuple[_Unit, str]]] = [[] for _ in self.params]
        for u in self.units:
            for name, i in u.names.items():
                self.units_of[i].append((u, name))
        for u in self.units:  # a parameter in several units is materialised by each
            u.want = {n: "full" if len(self.units_of[i]) > 1 else "norm"
                      for n, i in u.names.items()}  # fmt: skip
        # a frozen parameter (requires_grad=False) gets no gradient and takes no hook
        self.covered = [bool(us) and p.requires_grad for us, p in zip(self.units_of, self.params)]
        n = len(self.params)
        self._parts: list[list[Tensor]] = [[] for _ in range(n)]  # per-sample ‖c_s‖² vectors
        self._index: dict[tuple[tuple[int, int], ...], Tensor] = {}
        self.elem: list[Tensor | None] = [None] * n
        self.count = [0] * n
        self.last_sq: list[Tensor | None] = [None] * n

    def _visit(self, module: nn.Module, index: dict[int, int]) -> None:
        rule = RULES.get(type(module), (_linear, _is_hf_conv1d))
        if self.mode != "func" and rule[1](module):
            names = {n: index[id(p)] for n, p in module.named_parameters(recurse=False)
                     if id(p) in index}  # fmt: skip
            if names:
                self.units.append(_Unit(module, rule[0], names))
            return
        if isinstance(module, nn.MultiheadAttention):  # reads out_proj's weights directly
            # it re-runs the attention, so, like torch.func, not in "hooks" (hooks only)
            if self.mode != "hooks":
                names = {n: index[id(p)] for n, p in module.named_parameters() if id(p) in index}
                how = _mha if self.mode == "auto" and _mha_ok(module) else _func_rule
                if names:
                    self.units.append(_Unit(module, how, names))
            return
        for child in module.children():
            self._visit(child, index)
        if self.mode != "hooks":
            names = {n: index[id(p)] for n, p in module.named_parameters(recurse=False)
                     if id(p) in index}  # fmt: skip
            if names:
                self.units.append(_Unit(module, _func_rule, names))

    def attach(self) -> list[Any]:
        """Register the hooks; returns their handles."""
        handles = [self.model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        try:
            for u in self.units:
                handles.append(
                    u.module.register_forward_hook(partial(self._on_forward, u), with_kwargs=True)
                )
            for i, p in enumerate(self.params):
                if self.covered[i] and p.requires_grad:
                    handles.append(p.register_hook(partial(self._on_param, i)))
        except BaseException:  # never leave half the hooks behind
            for h in handles:
                h.remove()
            raise
        return handles

    def _on_model(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The batch size: dimension 0 of the model's first tensor input."""
        if not self._busy and torch.is_grad_enabled() and not _transformed() and not probing_now():
            leaf = next((t for t in pytree.tree_leaves((args, kwargs))
                         if isinstance(t, Tensor) and t.dim() > 0), None)  # fmt: skip
            self.batch = None if leaf is None else int(leaf.shape[0])

    def _exclude(self, unit: _Unit, why: str) -> None:
        """Leave a unit out of the per-sample statistics, with a warning saying why."""
        unit.uses, unit.result, unit.excluded = [], {}, True
        for i in unit.names.values():
            self.covered[i] = False
        warnings.warn(
            f"per-sample gradients of {type(unit.module).__name__} parameters "
            f"{sorted(unit.names)} cannot be read from module hooks: {why}; they are left out "
            f"of the per-sample statistics",
            stacklevel=3,
        )

    def reset(self) -> None:
        """Forget the statistics and any pending forward calls (after an optimizer step)."""
        n = len(self.params)
        self._parts, self.elem, self.count = [[] for _ in range(n)], [None] * n, [0] * n
        for u in self.units:
            u.uses, u.result = [], None

    # -- hooks ---------------------------------------------------------------------------

    def _on_forward(self, unit: _Unit, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if self._busy or not torch.is_grad_enabled() or _transformed() or probing_now():
            return
        if unit.excluded:
            return
        if unit.result is not None:  # the previous backward is over
            unit.uses, unit.result = [], None
        outs = _tensors(out)
        seq_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first
        if seq_first and unit.rule is _func_rule:
            self._exclude(
                unit,
                "the torch.func rule splits dimension 0, and this attention "
                "is sequence-first (batch_first=False)",
            )
            return
        first = next((t for t in outs if t.dim() > 0), None)  # a loss may come first
        if first is not None and self.batch is not None:
            size = first.shape[1 if seq_first and first.dim() > 1 else 0]
            if size != self.batch:
                self._exclude(
                    unit,
                    f"its output has {size} along the batch dimension where the "
                    f"model's input has {self.batch} (an output shared by the whole "
                    f"batch, such as position embeddings, or a flattened batch)",
                )
                return
        use = _Use(args, kwargs, outs)
        for j, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(partial(_store, use, j))
        unit.uses.append(use)

    def _on_param(self, i: int, grad: Tensor) -> None:
        if self._busy or not self.covered[i] or probing_now():
            return
        p = self.params[i]
        if p.grad is None:  # a new accumulation cycle (zero_grad(set_to_none=True))
            self._parts[i], self.elem[i], self.count[i] = [], None, 0
        results = []
        for u, name in self.units_of[i]:
            if u.result is None:
                self._busy = True
                try:
                    u.result = self._process(u)
                except Exception as err:  # a statistic must never stop training
                    self._exclude(u, repr(err))
                finally:
                    self._busy = False
            if u.result is not None and name in u.result:
                results.append(u.result[name])
        if not results or not self.covered[i]:  # a unit of a shared parameter was dropped
            return
        if len(results) == 1 and results[0][0] == "norm":
            _, sq, elem = results[0]
        else:
            full = results[0][1]
            for r in results[1:]:
                full = full + r[1]
            _, sq, elem = _from_full(full, self.need_elem)
        self._parts[i].append(sq)
        if self.need_elem and elem is not None:
            e = elem.to(torch.promote_types(p.dtype, torch.float32))
            self.elem[i] = e if self.elem[i] is None else self.elem[i] + e  # type: ignore[operator]
        self.count[i] += int(sq.shape[0])
        if self.keep_last:
            self.last_sq[i] = sq.detach()

    def sums(self, device: torch.device) -> Tensor:
        """Σ_s ‖c_s‖² per parameter since the last :meth:`reset` (0 where none), in ``dtype``.

        The hooks keep each backward's per-sample vector; one concatenation and one
        ``index_add_`` per step sum them.
        """
        return index_sums(self._parts, self.dtype, device, self._index)

    def _process(self, unit: _Unit) -> dict[str, Result]:
        uses = [u for u in unit.uses if any(g is not None for g in u.grads)]
        if not uses:
            return {}
        rule = unit.rule
        if rule is _mha and any(g is not None for u in uses for g in u.grads[1:]):
            rule = _func_rule  # the attention weights reach the loss: the rule ignores them
        with torch.no_grad():
            for u in uses:  # outputs that got no gradient contribute zero
                u.got = [g is not None for g in u.grads]
                u.grads = [o.zeros() if g is None else g
                           for o, g in zip(u.output, u.grads)]  # fmt: skip
                if rule is not _func_rule:  # half-precision products and squares lose
                    # the small differences the estimators take: the rules work in float32
                    u.args = tuple(_wide(a) for a in u.args)
                    u.grads = [_wide(g) for g in u.grads]
            res = rule(unit.module, uses, unit.want, self.need_elem)
        for u in uses:
            u.args = u.kwargs = None
            u.grads = []
        return res


def _wide(t: Any) -> Any:
    """A floating tensor narrower than float32 as float32 (anything else as it is)."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.element_size() < 4:
        return t.float()
    return t


def _store(use: _Use, j: int, grad: Tensor) -> None:
    use.grads[j] = grad


def _transformed() -> bool:
    """Whether a ``torch.func`` transform is running (its forward passes are not training)."""
    return torch._C._functorch.peek_interpreter_stack() is not None
