"""The two matchings behind :func:`~sgdlens.probes.align`: weight matching by coordinate
descent over linear assignments, and activation matching by correlation; and applying the
permutations found to a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx

from sgdlens.probes._units import Axis, Group

__all__ = [
    "activation_matching",
    "apply_perms",
    "assignment_solver",
    "model_inputs",
    "record_shapes",
    "weight_matching",
]

_HINT = 'pip install "sgdlens[align]"'


def assignment_solver() -> Any:
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


def apply_perms(
    state: dict[str, Tensor],
    groups: list[Group],
    perms: list[Tensor],
    skip: tuple[int, Axis] | None = None,
) -> dict[str, Tensor]:
    out = dict(state)
    for i, (grp, perm) in enumerate(zip(groups, perms)):
        for ax in grp.axes:
            if ax.name in out and (skip is None or (i, ax) != skip):
                out[ax.name] = _permute(out[ax.name], ax, perm)
    return out


def weight_matching(
    groups: list[Group],
    sa: dict[str, Tensor],
    sb: dict[str, Tensor],
    perms: list[Tensor],
    todo: list[int],
    max_iter: int,
    generator: torch.Generator,
    weights: set[str],
) -> tuple[list[Tensor], int]:
    """Coordinate descent over ``todo`` groups; returns the permutations and sweeps made.

    A first pass visits the groups in the order the forward pass creates them, each matched
    on the tensors whose other axes are already settled (a layer's rows once its inputs are
    matched): for an exact permuted copy of a feed-forward net this alone recovers the
    permutation. Then sweeps in random order until no group improves.
    """
    lsa = assignment_solver()
    perms = list(perms)
    owners: dict[str, set[int]] = {}
    for g, grp in enumerate(groups):
        for ax in grp.axes:
            owners.setdefault(ax.name, set()).add(g)

    def cost_of(g: int, axes: list[Axis]) -> Tensor:
        grp = groups[g]
        cost = torch.zeros(grp.size, grp.size, dtype=torch.float64)
        for ax in axes:
            if ax.name not in weights:
                continue  # buffers (running statistics) follow the weights, unweighed
            # b with every other axis already permuted; this axis left in b's order
            others = apply_perms({ax.name: sb[ax.name]}, groups, perms, skip=(g, ax))
            wa = _units(sa[ax.name].to(torch.float64), ax, grp.size)
            wb = _units(others[ax.name].to(torch.float64), ax, grp.size)
            cost += (wa @ wb.T).cpu()
        return cost

    def score(g: int, trial: list[Tensor]) -> float:
        """``Σ <W_a, P W_b>`` over the tensors group ``g`` touches (the distance's part that
        depends on the permutations; a tensor whose two axes share the group makes it
        quadratic, so a step is kept only if this rises)."""
        names = {ax.name for ax in groups[g].axes} & weights
        moved = apply_perms({n: sb[n] for n in names}, groups, trial)
        return sum(float((sa[n].double() * moved[n].double()).sum()) for n in names)

    identity = list(perms)
    settled = {g for g in range(len(groups)) if g not in todo}
    for g in sorted(todo):
        ready = [ax for ax in groups[g].axes if owners[ax.name] <= settled | {g}]
        cost = cost_of(g, ready or groups[g].axes)
        perms[g] = torch.as_tensor(lsa(cost.numpy(), maximize=True)[1], dtype=torch.long)
        settled.add(g)
    every = {ax.name for g in todo for ax in groups[g].axes} & weights

    def total(trial: list[Tensor]) -> float:
        moved = apply_perms({n: sb[n] for n in every}, groups, trial)
        return sum(float((sa[n].double() * moved[n].double()).sum()) for n in every)

    if total(perms) < total(identity):  # the first pass can lose where a group is quadratic
        perms = list(identity)
    sweeps = 0
    while sweeps < max_iter:
        sweeps += 1
        improved = False
        for i in torch.randperm(len(todo), generator=generator).tolist():
            g = todo[i]
            cost = cost_of(g, groups[g].axes)
            trial = list(perms)
            trial[g] = torch.as_tensor(lsa(cost.numpy(), maximize=True)[1], dtype=torch.long)
            if torch.equal(trial[g], perms[g]):
                continue
            before, after = score(g, perms), score(g, trial)
            if after > before + 1e-12 * max(abs(before), 1.0):
                perms = trial
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


def model_inputs(gm: fx.GraphModule, batch: Any) -> list[Any]:
    """The positional inputs of the traced forward for one batch: ``batch[0]`` of a tuple or
    list, the tensor itself, or a dict's entries by argument name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(batch, Mapping):
        return [batch[str(k).lstrip("*")] for k in names if str(k).lstrip("*") in batch]
    if isinstance(batch, (tuple, list)):
        return [batch[0]]
    return [batch]


def activation_matching(
    groups: list[Group],
    gms: tuple[fx.GraphModule, fx.GraphModule],
    batches: list[Any],
) -> tuple[list[Tensor], list[int]]:
    """Per group, units matched by the correlation of their activations; the groups that no
    traced value carries are returned as still to do."""
    lsa = assignment_solver()
    taps = {name: (g, dim) for g, grp in enumerate(groups) for name, dim in grp.taps}
    sums: list[list[Tensor]] = [[] for _ in groups]
    stats: dict[tuple[int, str], list[Tensor]] = {}
    for batch in batches:
        outs = []
        for gm in gms:
            rec = _Recorder(gm, taps)
            with torch.no_grad():
                rec.run(*model_inputs(gm, batch))
            outs.append(rec.values)
        for name, (g, _) in taps.items():
            if name not in outs[0]:
                continue
            xa, xb = (o[name].to(torch.float64) for o in outs)
            n = torch.tensor(float(xa.shape[0]))
            new = [xa.sum(0), xb.sum(0), xa.T @ xb, xa.square().sum(0), xb.square().sum(0), n]
            old = stats.get((g, name))
            stats[(g, name)] = [
                v.cpu() if old is None else o + v.cpu() for o, v in zip(old or new, new)
            ]
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


def record_shapes(gm: fx.GraphModule, batch: Any) -> None:
    """Record every traced value's shape (``node.meta['tensor_meta']``) from one batch."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*model_inputs(gm, batch))
