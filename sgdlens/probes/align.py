"""Permutation alignment: undo the hidden-unit symmetry before asking whether two nets share a
basin (Git Re-Basin: Ainsworth, Hayase & Srinivasa, ICLR 2023).

Permuting the hidden units of a network (rows of one layer, the matching columns of the next,
and everything in between that is indexed by those units) leaves its function unchanged, yet
moves it far across weight space. :func:`align` returns a copy of ``b`` permuted to lie as
close to ``a`` as it can:

* ``method="weights"`` (weight matching): coordinate descent over the permutation groups;
  each step solves one linear assignment that maximises ``Σ <W_a, P W_b>`` over the parameters
  the group indexes, the other groups held fixed, until no group improves; a step is kept only
  if that sum rises, so the aligned copy is never farther from ``a`` than ``b`` was.
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
from torch import Tensor, nn

from sgdlens.probes._common import as_batches, check_int, check_model, check_unsharded
from sgdlens.probes._matching import (
    activation_matching,
    apply_perms,
    assignment_solver,
    record_shapes,
    weight_matching,
)
from sgdlens.probes._perm import permutation_groups, trace
from sgdlens.probes.restore import preserved

__all__ = ["align"]

_METHODS = ("weights", "activations")


def _check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    if type(a) is not type(b):
        raise ValueError(
            f"align needs two models of one architecture, got {type(a).__name__} and "
            f"{type(b).__name__}"
        )
    devices = {t.device for m in (a, b) for t in list(m.parameters()) + list(m.buffers())}
    if len(devices) > 1:
        raise ValueError(
            f"align needs both models on one device, got tensors on {sorted(map(str, devices))}; "
            "move them with .to(device) first"
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
    assignment_solver()  # fail early without scipy
    with preserved(a), preserved(b):
        a.eval()
        b.eval()
        gm_b = trace(b)
        if batches is not None:
            record_shapes(gm_b, batches[0])
        groups, _ = permutation_groups(b, gm_b)
        sa = {n: t.detach() for n, t in _tensors(a).items()}
        sb = {n: t.detach() for n, t in _tensors(b).items()}
        perms = [torch.arange(g.size) for g in groups]
        todo = list(range(len(groups)))
        if method == "activations":
            assert batches is not None
            perms, todo = activation_matching(groups, (trace(a), gm_b), batches)
        gen = torch.Generator().manual_seed(seed)
        if todo:
            weights = {n for n, _ in b.named_parameters()}
            perms, _ = weight_matching(groups, sa, sb, perms, todo, max_iter, gen, weights)
        aligned = apply_perms(sb, groups, perms)
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
