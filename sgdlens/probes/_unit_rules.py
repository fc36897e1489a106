"""How each ``torch.nn`` module that alignment supports carries or creates permutation groups:
one rule per module type, called by the graph walk of :mod:`sgdlens.probes._perm`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.nn.functional as F
from torch import fx, nn

from sgdlens.probes._units import (
    ELEMENTWISE_MODULES,
    FIXED,
    LAST,
    NORMS,
    Group,
    Unsupported,
    Val,
)


class Walker(Protocol):
    """What a module rule needs from the graph walk (:class:`sgdlens.probes._perm._Walk`)."""

    groups: dict[int, Group]

    def find(self, g: int) -> int: ...
    def new(self, size: int, origin: str) -> int: ...
    def join(self, a: int, b: int, where: str) -> int: ...
    def axis(
        self, g: int, module: str, tensor: str, dim: int, outer: int = 1, block: int = 1
    ) -> None: ...
    def where(self, node: fx.Node) -> str: ...
    def unsupported(self, node: fx.Node, why: str) -> Unsupported: ...


def _linear(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    assert isinstance(mod, nn.Linear)
    free = w.find(x.group) != FIXED
    if free and x.dim != LAST:
        raise w.unsupported(node, "reads a conv feature map without a flatten")
    n_in = w.groups[w.find(x.group)].size
    block = x.block
    if free:
        if block is None:
            if mod.in_features % n_in:
                raise w.unsupported(node, f"reads {mod.in_features} features from {n_in} units")
            block = mod.in_features // n_in
        w.axis(x.group, path, "weight", 1, block=block)
    g = w.new(mod.out_features, f"{path!r} (Linear)")
    w.axis(g, path, "weight", 0)
    if mod.bias is not None:
        w.axis(g, path, "bias", 0)
    return Val(g, LAST, 1, x.ndim)


def _conv(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    k = len(mod.kernel_size)
    if w.find(x.group) != FIXED and (x.dim != -(k + 1) or x.block != 1):
        raise w.unsupported(node, f"reads an input whose channels are not at dim {-(k + 1)}")
    if mod.groups == 1:
        w.axis(x.group, path, "weight", 1)
        g = w.new(mod.out_channels, f"{path!r} ({type(mod).__name__})")
    elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise: one filter per unit
        g = x.group
    else:
        raise w.unsupported(node, f"is a grouped convolution (groups={mod.groups})")
    w.axis(g, path, "weight", 0)
    if mod.bias is not None:
        w.axis(g, path, "bias", 0)
    return Val(g, -(k + 1), 1, k + 2)


def _channelwise(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    """BatchNorm, InstanceNorm, LayerNorm (1-D shape), GroupNorm (1 group or 1 per channel),
    PReLU: one parameter (and running statistic) per unit."""
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
        raise w.unsupported(node, f"normalises over {tuple(mod.normalized_shape)}, not one axis")
    if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
        raise w.unsupported(node, f"normalises {mod.num_groups} groups of channels")
    if w.find(x.group) == FIXED:
        return x
    for name, t in list(mod.named_parameters(recurse=False)) + list(
        mod.named_buffers(recurse=False)
    ):
        if t is not None and t.dim() == 1 and t.numel() > 1:
            w.axis(x.group, path, name, 0)
    return x


def _passthrough(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    return x


def _flatten(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    assert isinstance(mod, nn.Flatten)
    if w.find(x.group) == FIXED:
        return x
    if mod.start_dim == 1 and mod.end_dim == -1 and (x.ndim is None or x.ndim + x.dim == 1):
        return Val(x.group, LAST, None if x.dim != LAST else x.block, 2)
    raise w.unsupported(node, f"flattens dims {mod.start_dim}..{mod.end_dim}")


def _embedding(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Val:
    assert isinstance(mod, nn.Embedding)
    g = w.new(mod.embedding_dim, f"{path!r} (Embedding)")
    w.axis(g, path, "weight", 1)
    return Val(g, LAST, 1)


def _attention(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Any:
    """Self- or cross-attention: the input/output features share the stream's group; heads are
    permuted as blocks of ``head_dim`` rows of q, k and v and columns of the output projection."""
    assert isinstance(mod, nn.MultiheadAttention)
    if not mod._qkv_same_embed_dim or mod.bias_k is not None:
        raise w.unsupported(node, "has separate k/v dims or bias_k/bias_v")
    g = x.group
    for v in ins[1:3]:
        g = w.join(g, v.group, w.where(node))
    if w.find(g) != FIXED:
        w.axis(g, path, "in_proj_weight", 1)
        w.axis(g, path + ".out_proj", "weight", 0)
        if mod.out_proj.bias is not None:
            w.axis(g, path + ".out_proj", "bias", 0)
    h, hd = mod.num_heads, mod.head_dim
    heads = w.new(h, f"{path!r} (attention heads)")
    w.axis(heads, path, "in_proj_weight", 0, outer=3, block=hd)
    if mod.in_proj_bias is not None:
        w.axis(heads, path, "in_proj_bias", 0, outer=3, block=hd)
    w.axis(heads, path + ".out_proj", "weight", 1, block=hd)
    return ("tuple", (Val(g, LAST, 1, x.ndim), None))


def _encoder_layer(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Any:
    assert isinstance(mod, nn.TransformerEncoderLayer)
    act = mod.activation
    if not (act in (F.relu, F.gelu) or isinstance(act, ELEMENTWISE_MODULES)):
        raise w.unsupported(node, f"uses the activation {act!r}")
    _attention(w, node, path + ".self_attn", mod.self_attn, x, [x])
    g = x.group
    for norm in ("norm1", "norm2"):
        _channelwise(w, node, f"{path}.{norm}", getattr(mod, norm), x, [x])
    if w.find(g) != FIXED:
        w.axis(g, path + ".linear1", "weight", 1)
    hidden = _linear(w, node, path + ".linear1", mod.linear1, Val(FIXED), [])
    w.axis(hidden.group, path + ".linear2", "weight", 1)
    if w.find(g) != FIXED:
        w.axis(g, path + ".linear2", "weight", 0)
        if mod.linear2.bias is not None:
            w.axis(g, path + ".linear2", "bias", 0)
    return Val(g, LAST, 1, x.ndim)


def _encoder(w: Walker, node: fx.Node, path: str, mod: nn.Module, x: Val, ins: Any) -> Any:
    assert isinstance(mod, nn.TransformerEncoder)
    for i, layer in enumerate(mod.layers):
        x = _encoder_layer(w, node, f"{path}.layers.{i}", layer, x, [x])
    if mod.norm is not None:
        x = _channelwise(w, node, path + ".norm", mod.norm, x, [x])
    return x


Rule = Callable[[Any, fx.Node, str, Any, Val, Any], Any]
MODULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.LayerNorm: _channelwise,
    nn.GroupNorm: _channelwise,
    nn.PReLU: _channelwise,
    nn.Flatten: _flatten,
    nn.Embedding: _embedding,
    nn.MultiheadAttention: _attention,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    **dict.fromkeys(NORMS, _channelwise),
    **dict.fromkeys(ELEMENTWISE_MODULES, _passthrough),
    nn.Softmax: _passthrough,
    nn.LogSoftmax: _passthrough,
}
