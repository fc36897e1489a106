"""Permutation alignment: undo the hidden-unit symmetry before asking whether two nets share a
basin (Git Re-Basin: Ainsworth, Hayase & Srinivasa, ICLR 2023).

Permuting the hidden units of a network (rows of one layer, the matching columns of the next,
and everything in between that is indexed by those units) leaves its function unchanged, yet
moves it far across weight space. :func:`align` returns a copy of ``b`` permuted to lie as
close to ``a`` as it can:

* ``method="weights"`` (weight matching): coordinate descent over the permutation groups;
  each step solves one linear assignment that maximises ``Σ <W_a, P W_b>`` over every tensor
  the group indexes, the other groups held fixed, until no group improves.
* ``method="activations"`` (activation matching): each group's units are matched by the
  correlation of their activations on ``data`` (summed over every traced value that carries
  the group); groups with no observable activation (attention heads) are then weight-matched.

The groups are found by tracing the model with ``torch.fx`` (see :mod:`sgdlens.probes._perm`):
MLPs, CNNs with BatchNorm, residual networks (one permutation shared across each skip), and
transformer blocks (MLP hidden units; attention heads permuted as blocks; LayerNorm). A model
with an operation alignment cannot follow raises ``ValueError`` naming the module.

The assignments are solved by ``scipy.optimize.linear_sum_assignment`` (the ``align`` extra).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from sgdlens.probes._common import as_batches, check_int, check_model, check_unsharded
from sgdlens.probes._perm import Axis, Group, permutation_groups, trace
from sgdlens.probes.restore import preserved

__all__ = ["align"]

_METHODS = ("weights", "activations")
_HINT = 'pip install "sgdlens[align]"'


def _assignment() -> Any:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise ImportError(
            f"align needs scipy (scipy.optimize.linear_sum_assignment), which is not "
            f"installed; run {_HINT}"
        ) from e
    return linear_sum_assignment


def _units(t: Tensor, ax: Axis, size: int) -> Tensor:
    """``t`` with ``ax`` as rows of units: shape ``(size, -1)``."""
    moved = t.movedim(ax.dim, 0)
    rest = moved.shape[1:]
    return moved.reshape(ax.outer, size, ax.block, *rest).transpose(0, 1).reshape(size, -1)


def _permute(t: Tensor, ax: Axis, perm: Tensor) -> Tensor:
    """``t`` with the units of ``ax`` reordered: unit ``i`` of the result is unit ``perm[i]``."""
    size = perm.numel()
    moved = t.movedim(ax.dim, 0)
    rest = moved.shape[1:]
    view = moved.reshape(ax.outer, size, ax.block, *rest)
    out = view.index_select(1, perm.to(t.device)).reshape(moved.shape)
    return out.movedim(0, ax.dim)


def _apply(state: dict[str, Tensor], groups: list[Group], perms: list[Tensor],
           skip: tuple[int, Axis] | None = None) -> dict[str, Tensor]:  # fmt: skip
    out = dict(state)
    for i, (grp, perm) in enumerate(zip(groups, perms)):
        for ax in grp.axes:
            if ax.name in out and (skip is None or (i, ax) != skip):
                out[ax.name] = _permute(out[ax.name], ax, perm)
    return out


def _weight_matching(
    groups: list[Group],
    sa: dict[str, Tensor],
    sb: dict[str, Tensor],
    perms: list[Tensor],
    todo: list[int],
    max_iter: int,
    generator: torch.Generator,
) -> tuple[list[Tensor], int]:
    """Coordinate descent over ``todo`` groups; returns the permutations and sweeps made.

    A first pass visits the groups in the order the forward pass creates them, each matched
    on the tensors whose other axes are already settled (a layer's rows once its inputs are
    matched): for an exact permuted copy of a feed-forward net this alone recovers the
    permutation. Then sweeps in random order until no group improves.
    """
    lsa = _assignment()
    perms = list(perms)
    owners: dict[str, set[int]] = {}
    for g, grp in enumerate(groups):
        for ax in grp.axes:
            owners.setdefault(ax.name, set()).add(g)

    def cost_of(g: int, axes: list[Axis]) -> Tensor:
        grp = groups[g]
        cost = torch.zeros(grp.size, grp.size, dtype=torch.float64)
        for ax in axes:
            # b with every other axis already permuted; this axis left in b's order
            others = _apply({ax.name: sb[ax.name]}, groups, perms, skip=(g, ax))
            wa = _units(sa[ax.name].to(torch.float64), ax, grp.size)
            wb = _units(others[ax.name].to(torch.float64), ax, grp.size)
            cost += (wa @ wb.T).cpu()
        return cost

    settled = {g for g in range(len(groups)) if g not in todo}
    for g in sorted(todo):
        ready = [ax for ax in groups[g].axes if owners[ax.name] <= settled | {g}]
        cost = cost_of(g, ready or groups[g].axes)
        perms[g] = torch.as_tensor(lsa(cost.numpy(), maximize=True)[1], dtype=torch.long)
        settled.add(g)
    sweeps = 0
    while sweeps < max_iter:
        sweeps += 1
        improved = False
        for i in torch.randperm(len(todo), generator=generator).tolist():
            g = todo[i]
            cost = cost_of(g, groups[g].axes)
            new = torch.as_tensor(lsa(cost.numpy(), maximize=True)[1], dtype=torch.long)
            rows = torch.arange(groups[g].size)
            gain = float(cost[rows, new].sum() - cost[rows, perms[g]].sum())
            if gain > 1e-12 * max(float(cost.abs().sum()), 1.0):
                perms[g] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


class _Recorder(fx.Interpreter):
    """Runs a traced model and keeps, per group, the sums needed for correlations."""

    def __init__(self, gm: fx.GraphModule, taps: dict[str, tuple[int, int]]) -> None:
        super().__init__(gm)
        self.taps = taps
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.taps and isinstance(out, Tensor):
            _, dim = self.taps[n.name]
            self.values[n.name] = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim])
        return out


def _inputs(gm: fx.GraphModule, batch: Any) -> list[Any]:
    """The positional inputs of the traced forward for one batch: ``batch[0]`` of a tuple or
    list, the tensor itself, or a dict's entries by argument name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(batch, Mapping):
        return [batch[str(k).lstrip("*")] for k in names if str(k).lstrip("*") in batch]
    if isinstance(batch, (tuple, list)):
        return [batch[0]]
    return [batch]


def _activation_matching(
    groups: list[Group],
    gms: tuple[fx.GraphModule, fx.GraphModule],
    batches: list[Any],
) -> tuple[list[Tensor], list[int]]:
    """Per group, units matched by the correlation of their activations; the groups that no
    traced value carries are returned as still to do."""
    lsa = _assignment()
    taps = {name: (g, dim) for g, grp in enumerate(groups) for name, dim in grp.taps}
    sums: list[list[Tensor]] = [[] for _ in groups]
    stats: dict[tuple[int, str], list[Tensor]] = {}
    for batch in batches:
        outs = []
        for gm in gms:
            rec = _Recorder(gm, taps)
            with torch.no_grad():
                rec.run(*_inputs(gm, batch))
            outs.append(rec.values)
        for name, (g, _) in taps.items():
            if name not in outs[0]:
                continue
            xa, xb = (o[name].to(torch.float64) for o in outs)
            n = torch.tensor(float(xa.shape[0]))
            new = [xa.sum(0), xb.sum(0), xa.T @ xb, xa.square().sum(0), xb.square().sum(0), n]
            old = stats.get((g, name))
            stats[(g, name)] = [v.cpu() if old is None else o + v.cpu() for o, v in
                                zip(old or new, new)]  # fmt: skip
    for (g, _), (sa, sb, sab, saa, sbb, n) in stats.items():
        ma, mb = sa / n, sb / n
        cov = sab / n - torch.outer(ma, mb)
        sd_a = (saa / n - ma * ma).clamp_min(0).sqrt() + 1e-12
        sd_b = (sbb / n - mb * mb).clamp_min(0).sqrt() + 1e-12
        sums[g].append(cov / torch.outer(sd_a, sd_b))
    perms, todo = [], []
    for g, grp in enumerate(groups):
        if sums[g]:
            _, cols = lsa(torch.stack(sums[g]).sum(0).numpy(), maximize=True)
            perms.append(torch.as_tensor(cols, dtype=torch.long))
        else:
            perms.append(torch.arange(grp.size))
            todo.append(g)
    return perms, todo


def _check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    if type(a) is not type(b):
        raise ValueError(
            f"align needs two models of one architecture, got {type(a).__name__} and "
            f"{type(b).__name__}"
        )
    ta = {n: t.shape for n, t in list(a.named_parameters()) + list(a.named_buffers())}
    tb = {n: t.shape for n, t in list(b.named_parameters()) + list(b.named_buffers())}
    for n in sorted(set(ta) | set(tb)):
        if ta.get(n) != tb.get(n):
            sa = tuple(ta[n]) if n in ta else "absent"
            sb = tuple(tb[n]) if n in tb else "absent"
            raise ValueError(
                f"align needs two models of one architecture: {n!r} is {sa} in a and {sb} in "
                "b; align models built by the same code with the same sizes"
            )


def _shapes(gm: fx.GraphModule, batch: Any) -> None:
    """Record every traced value's shape (``node.meta['tensor_meta']``) from one batch."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*_inputs(gm, batch))


def align(
    a: nn.Module,
    b: nn.Module,
    *,
    method: str = "weights",
    data: Any = None,
    max_iter: int = 100,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``b`` with its hidden units permuted to match ``a``'s (Git Re-Basin).

    The copy computes the same function as ``b`` (outputs equal up to float rounding, the
    BatchNorm running statistics permuted with the weights); ``a`` and ``b`` are left
    bit-for-bit unchanged. Which units can be permuted is found by tracing ``b`` with
    ``torch.fx``: MLPs, CNNs (with BatchNorm, pooling, flatten), residual networks (one
    permutation shared by everything a skip connection adds together) and transformer blocks
    (``nn.TransformerEncoderLayer``, or ``nn.MultiheadAttention`` with ``Linear`` MLPs and
    ``LayerNorm`` in your own blocks: MLP units, and attention heads as blocks). Inputs and
    outputs keep their order.

    Cost: ``method="weights"``: a few sweeps (``max_iter`` at most) of one linear assignment
    per group, on ``n x n`` matrices built from the weights (no forward pass); for a
    64-64-64-10 MLP a few milliseconds. ``method="activations"``: one forward pass of each
    model per batch of ``data``, then one assignment per group.

    Args:
        a: the reference model.
        b: the model to align to ``a``, of the same architecture.
        method: ``"weights"`` (weight matching) or ``"activations"`` (activation matching on
            ``data``).
        data: one batch or an iterable of batches; ``method="activations"`` runs the models on
            them (``model(batch[0])`` for a tuple or list, ``model(batch)`` for a tensor,
            keyword inputs for a dict). Either method also reads the traced values' shapes
            from the first batch when given, which resolves indexing and reductions that
            cannot be placed otherwise.
        max_iter: the most sweeps of weight matching.
        seed: the order in which weight matching visits the groups.

    Returns:
        An aligned copy of ``b`` (``copy.deepcopy(b)`` with permuted parameters and buffers).

    Raises:
        ImportError: scipy is missing (``pip install "sgdlens[align]"``).
        ValueError: models of different architectures, an unknown ``method``, no ``data`` for
            activation matching, or an operation that stops alignment (the message names the
            module).

    Example:
        >>> import torch
        >>> from sgdlens import probes
        >>> torch.manual_seed(0) and None
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> c = probes.align(a, b)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(c(x), b(x), atol=1e-6)
        True
    """
    check_model(a, "a")
    check_model(b, "b")
    check_unsharded(a, "a")
    check_unsharded(b, "b")
    if method not in _METHODS:
        raise ValueError(
            f"method must be 'weights' (weight matching) or 'activations' (activation "
            f"matching on data=), got {method!r}"
        )
    check_int(max_iter, "max_iter", 1, "; the most sweeps of weight matching")
    check_int(seed, "seed", 0)
    batches = None if data is None else as_batches(data)
    if method == "activations" and batches is None:
        raise ValueError("method='activations' needs data=: batches to run both models on")
    _check_same_architecture(a, b)
    _assignment()  # fail early without scipy
    with preserved(a), preserved(b):
        a.eval()
        b.eval()
        gm_b = trace(b)
        if batches is not None:
            _shapes(gm_b, batches[0])
        groups, _ = permutation_groups(b, gm_b)
        sa = {n: t.detach() for n, t in _tensors(a).items()}
        sb = {n: t.detach() for n, t in _tensors(b).items()}
        perms = [torch.arange(g.size) for g in groups]
        todo = list(range(len(groups)))
        if method == "activations":
            assert batches is not None
            perms, todo = _activation_matching(groups, (trace(a), gm_b), batches)
        gen = torch.Generator().manual_seed(seed)
        if todo:
            perms, _ = _weight_matching(groups, sa, sb, perms, todo, max_iter, gen)
        aligned = _apply(sb, groups, perms)
    out = copy.deepcopy(b)
    with torch.no_grad():
        for name, t in _tensors(out).items():
            if name in aligned and aligned[name] is not sb[name]:
                t.copy_(aligned[name])
    return out


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by their first (deduplicated) name."""
    out: dict[str, Tensor] = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        out.setdefault(n, t)
    return out


def check_align(value: Any) -> str | None:
    """The ``align=`` argument of the path probes: ``False``, ``True`` (weight matching),
    ``"weights"`` or ``"activations"``; returns the method or ``None``."""
    if value is False or value is None:
        return None
    if value is True:
        return "weights"
    if value in _METHODS:
        return str(value)
    raise ValueError(
        f"align must be False, True (weight matching), 'weights' or 'activations', got {value!r}"
    )


def aligned_to(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    template: nn.Module,
    method: str,
    data: Any,
) -> nn.Module:
    """``b`` aligned to ``a`` as a module; state dicts are loaded into copies of ``template``."""

    def module(x: nn.Module | Mapping[str, Tensor], name: str) -> nn.Module:
        if isinstance(x, nn.Module):
            return x
        m = copy.deepcopy(template)
        try:
            m.load_state_dict(x)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{name} does not fit the model's architecture: {e}") from e
        return m

    return align(module(a, "a"), module(b, "b"), method=method, data=data)
