"""Where a network's hidden units can be permuted: found by tracing it with ``torch.fx``.

A *group* is one permutation of ``size`` units applied to every tensor axis that indexes those
units: the output rows of a ``Linear``/conv and its bias, the input columns of the layers that
read them, the γ/β and running statistics of a norm layer in between. Walking the traced graph,
each value carries the group of its feature axis; a residual ``x + f(x)`` (or a gate ``a * b``)
joins the groups of its two sides, so one permutation is shared across the skip; the model's
inputs and outputs belong to the fixed group, which is never permuted. An operation that would
mix units in a way no permutation of them commutes with (a reshape of the feature axis, a
concatenation, a grouped convolution, an unknown module) stops the walk with an error naming it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sgdlens.probes._unit_rules import MODULES
from sgdlens.probes._units import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    FIXED,
    JOINING,
    JOINING_METHODS,
    LAST,
    Axis,
    Group,
    Unsupported,
    Val,
)

__all__ = ["Axis", "Group", "Unsupported", "permutation_groups", "trace"]


class _Tracer(fx.Tracer):
    """Modules of ``torch.nn`` are leaves (handled as a whole); user modules are traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("torch.nn") and not isinstance(
            m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        )


def trace(model: nn.Module) -> fx.GraphModule:
    """The model traced by ``torch.fx``, or :class:`Unsupported` saying why not."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        raise Unsupported(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); alignment "
            "needs a forward without data-dependent Python control flow"
        ) from e
    return fx.GraphModule(model, graph)


class _Walk:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.model = model
        # canonical (deduplicated) names of tensors, by identity
        self.names: dict[int, str] = {}
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            self.names.setdefault(id(t), n)
        self.parent = [FIXED]
        self.groups: dict[int, Group] = {FIXED: Group(0, "inputs and outputs")}
        self.memo: dict[str, tuple[Any, ...]] = {}  # module path -> (input group, output value)
        self.owner: dict[tuple[str, int], tuple[int, Axis]] = {}  # (tensor, dim) -> its group
        self.env: dict[str, Any] = {}

    # --- union-find over groups; FIXED absorbs whatever joins it
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def new(self, size: int, origin: str) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.groups[g] = Group(size, origin)
        return g

    def join(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra != FIXED and rb != FIXED and self.groups[ra].size != self.groups[rb].size:
            raise Unsupported(
                f"{where} joins {self.groups[ra].size} units of {self.groups[ra].origin} with "
                f"{self.groups[rb].size} of {self.groups[rb].origin}"
            )
        keep, drop = (ra, rb) if rb != FIXED else (rb, ra)
        self.parent[drop] = keep
        self.groups[keep].axes += self.groups[drop].axes
        self.groups[keep].taps += self.groups[drop].taps
        del self.groups[drop]
        return keep

    def axis(
        self, g: int, module: str, tensor: str, dim: int, outer: int = 1, block: int = 1
    ) -> None:
        t = getattr(self.model.get_submodule(module), tensor)
        if id(t) not in self.names:
            raise Unsupported(
                f"cannot align: {module}.{tensor} is computed, not stored (a parametrization "
                "such as weight_norm?); remove the parametrization before aligning"
            )
        ax = Axis(self.names[id(t)], dim, outer, block)
        seen = self.owner.get((ax.name, dim))
        if seen is not None:  # a tied tensor: its axis is one set of units, wherever it is used
            if seen[1] != ax:
                raise Unsupported(
                    f"cannot align: the tied tensor {ax.name!r} is used with two different "
                    f"unit layouts along dim {dim} (in {module!r})"
                )
            g = self.join(seen[0], g, f"the tied tensor {ax.name!r}")
        self.owner[(ax.name, dim)] = (g, ax)
        root = self.find(g)
        if ax not in self.groups[root].axes:
            self.groups[root].axes.append(ax)

    # --- the walk
    def run(self) -> list[Group]:
        for node in self.gm.graph.nodes:
            v = self.visit(node)
            meta = node.meta.get("tensor_meta")
            if isinstance(v, Val) and hasattr(meta, "shape"):
                v = Val(v.group, v.dim, v.block, len(meta.shape))
            self.env[node.name] = v
            if isinstance(v, Val) and node.op != "placeholder" and v.block == 1:
                self.groups[self.find(v.group)].taps.append((node.name, v.dim))
        out = []
        for g, grp in self.groups.items():
            if g != FIXED and self.find(g) == g and grp.size > 1 and grp.axes:
                out.append(grp)
        return out

    def val(self, arg: Any) -> Any:
        return self.env.get(arg.name) if isinstance(arg, fx.Node) else None

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return Val(FIXED)
        if node.op == "get_attr":
            return ("attr", str(node.target))
        if node.op == "output":
            for v in _flat_vals([self.val(a) for a in _flat_args(node.args)]):
                self.join(v.group, FIXED, "the model's output")
            return None
        if node.op == "call_module":
            path = str(node.target)
            return self.module(node, path, self.gm.get_submodule(path))
        return self.function(node)

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return f"module {str(node.target)!r} ({type(mod).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"operation {target!r} (traced node {node.name!r})"

    def unsupported(self, node: fx.Node, why: str) -> Unsupported:
        return Unsupported(
            f"cannot align: {self.where(node)} {why}; supported are Linear, Conv (groups=1 or "
            "depthwise), BatchNorm, LayerNorm, elementwise activations, pooling, flatten, "
            "residual additions, Embedding, MultiheadAttention and TransformerEncoderLayer"
        )

    def inputs(self, node: fx.Node) -> list[Val]:
        return _flat_vals([self.val(a) for a in _flat_args(node.args, node.kwargs)])

    def module(self, node: fx.Node, path: str, mod: nn.Module) -> Any:
        ins = self.inputs(node)
        x = ins[0] if ins else Val(FIXED)
        handler = MODULES.get(type(mod))
        if handler is None:
            handler = next((h for t, h in MODULES.items() if isinstance(mod, t)), None)
        if handler is None:
            if not any(True for _ in mod.parameters()) and all(
                self.find(v.group) == FIXED for v in ins
            ):
                return Val(FIXED)  # a parameter-free module on unpermuted values
            raise self.unsupported(node, "is not one whose units sgdlens knows how to permute")
        if path in self.memo:  # a module called again: same units in, same units out
            g_in, out = self.memo[path]
            if g_in is not None:
                self.join(g_in, x.group, f"second call of {self.where(node)}")
            return out
        out = handler(self, node, path, mod, x, ins)
        self.memo[path] = (x.group if _has_input_axis(mod) else None, out)
        return out

    def function(self, node: fx.Node) -> Any:
        t, args = node.target, node.args
        ins = self.inputs(node)
        name = t if isinstance(t, str) else None
        if t is operator.getitem:
            base = self.val(args[0])
            if isinstance(base, tuple) and base and base[0] == "tuple":
                return base[1][args[1]] if isinstance(args[1], int) else None
            return self.index(node, base, args[1]) if isinstance(base, Val) else None
        if name == "size" or t in (getattr, len):
            return None
        if not ins and not any(isinstance(self.val(a), tuple) for a in _flat_args(args)):
            return None  # shapes, constants
        x = ins[0]
        free = self.find(x.group) != FIXED
        if t in ELEMENTWISE_FUNCTIONS or name in ELEMENTWISE_METHODS:
            return x
        if t in (F.softmax, torch.softmax, F.log_softmax) or name in ("softmax", "log_softmax"):
            return x  # equivariant whichever dim it normalises
        if t in JOINING or name in JOINING_METHODS:
            return self.joining(node)
        if not free and all(self.find(v.group) == FIXED for v in ins):
            return Val(FIXED)
        if t is torch.flatten or name in ("flatten", "view", "reshape"):
            return self.flatten(node, x)
        if t in (torch.mean, torch.sum, torch.amax) or name in ("mean", "sum", "amax"):
            return self.reduce(node, x)
        if t is torch.transpose or name == "transpose":
            pair = [x.at(d) for d in args[1:3] if isinstance(d, int)]
            if len(pair) == 2 and None not in pair and x.dim not in pair:
                return x
            return self._stop(node, _shape_hint(x, "may move the feature axis"))
        return self._stop(node, "acts on permuted units in a way alignment cannot follow")

    def _stop(self, node: fx.Node, why: str) -> Any:
        raise self.unsupported(node, why)

    def index(self, node: fx.Node, x: Val, index: Any) -> Val:
        """``x[...]`` with ints, full slices and an ellipsis, away from the feature axis."""
        if self.find(x.group) == FIXED:
            return Val(FIXED)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not (isinstance(i, int) or i == slice(None) or i is Ellipsis) for i in items):
            return self._stop(node, "slices or gathers along an axis of permuted units")
        if Ellipsis in items:  # items after the ellipsis count from the end
            tail = items[items.index(Ellipsis) + 1 :]
            lead = items[: items.index(Ellipsis)]
            touched = [-(len(tail) - k) for k, i in enumerate(tail) if isinstance(i, int)]
            if x.dim >= -len(tail) and isinstance(tail[x.dim + len(tail)], int):
                return self._stop(node, "indexes the feature axis")
            dropped_after = sum(1 for d in touched if d > x.dim)
            lead_ints = sum(isinstance(i, int) for i in lead)
            ndim = None if x.ndim is None else x.ndim - lead_ints - len(touched)
            return Val(x.group, x.dim + dropped_after, x.block, ndim)
        if x.ndim is None:
            return self._stop(node, _shape_hint(x, "indexes a value whose dims are unknown"))
        pos = x.ndim + x.dim
        if pos < len(items) and isinstance(items[pos], int):
            return self._stop(node, "indexes the feature axis")
        n_ints = sum(isinstance(i, int) for i in items)
        return Val(x.group, x.dim, x.block, x.ndim - n_ints)

    def joining(self, node: fx.Node) -> Any:
        vals, attrs = [], []
        for a in list(node.args) + list(node.kwargs.values()):
            v = self.val(a)
            if isinstance(v, Val):
                vals.append(v)
            elif isinstance(v, tuple) and v and v[0] == "attr":
                attrs.append(v[1])
        if not vals:
            return None
        g = vals[0].group
        for v in vals[1:]:
            if self.find(v.group) != FIXED and v.dim != vals[0].dim:
                raise self.unsupported(node, "combines values whose feature axes differ")
            g = self.join(g, v.group, self.where(node))
        for attr in attrs:  # a learned tensor along the feature axis (positions, scales)
            owner, _, tname = attr.rpartition(".")
            t = getattr(self.model.get_submodule(owner), tname)
            root = self.find(g)
            if root == FIXED or t.numel() == 1:
                continue
            if vals[0].dim == LAST and t.dim() >= 1 and t.shape[-1] == self.groups[root].size:
                self.axis(g, owner, tname, t.dim() - 1)
            else:
                raise self.unsupported(node, f"combines the units with the tensor {attr!r}")
        ndim = max((v.ndim for v in vals if v.ndim is not None), default=None)
        return Val(g, vals[0].dim, vals[0].block, ndim)

    def flatten(self, node: fx.Node, x: Val) -> Val:
        """``flatten(x, 1)``, ``x.view(n, -1)``: the units become blocks of the features (the
        feature axis taken to be the first after the batch)."""
        args = list(node.args[1:])
        if node.target in ("view", "reshape"):
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            ok = len(shape) == 2 and shape[-1] == -1
        else:
            start = node.kwargs.get("start_dim", args[0] if args else 0)
            end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
            ok = start == 1 and end == -1
        if not ok:
            return self._stop(node, "reshapes the feature axis (use torch.flatten(x, 1))")
        if x.ndim is not None and x.ndim + x.dim != 1:
            return self._stop(node, "flattens a feature axis that is not dim 1")
        return Val(x.group, LAST, None if x.dim != LAST else x.block, 2)

    def reduce(self, node: fx.Node, x: Val) -> Val:
        dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        if dims is None:
            return Val(FIXED)  # a sum, mean or max over all units does not depend on their order
        at = [x.at(d) for d in ([dims] if isinstance(dims, int) else dims)]
        if None in at:
            return self._stop(node, _shape_hint(x, "reduces dims it cannot place"))
        if x.dim in at:
            return Val(FIXED)  # over the units themselves: the order no longer matters
        if keep:
            return x
        shift = sum(1 for d in at if d is not None and d > x.dim)
        ndim = None if x.ndim is None else x.ndim - len(at)
        return Val(x.group, x.dim + shift, x.block, ndim)


def _shape_hint(x: Val, why: str) -> str:
    if x.ndim is None:
        return f"{why}; pass data= (a batch) so the shapes can be read"
    return why


def _flat_args(args: Any, kwargs: Any = None) -> list[Any]:
    out: list[Any] = []
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (tuple, list)):
            out += _flat_args(a)
        else:
            out.append(a)
    return out


def _flat_vals(vals: list[Any]) -> list[Val]:
    out: list[Val] = []
    for v in vals:
        if isinstance(v, Val):
            out.append(v)
        elif isinstance(v, tuple) and v and v[0] == "tuple":
            out += _flat_vals(list(v[1]))
    return out


def _has_input_axis(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.Embedding)


def permutation_groups(
    model: nn.Module, gm: fx.GraphModule | None = None
) -> tuple[list[Group], fx.GraphModule]:
    """The model's permutation groups (each of more than one unit) and its traced graph
    (``gm``, when given, is that graph, with shapes recorded by ``ShapeProp``)."""
    gm = trace(model) if gm is None else gm
    return _Walk(model, gm).run(), gm
