"""The one place that touches private torch API, and the grouped tensor-list reductions.

Everything here is sync-free: inputs and outputs stay on their devices.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils import _pytree as pytree  # noqa: F401 - re-exported for the lenses


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2 parameters and gradients), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` split across ranks (some placement is a shard)."""
    return any(p.is_shard() for p in getattr(t, "placements", ()))


# FSDP1 (``FullyShardedDataParallel``): the original parameters, or the ``FlatParameter``s that
# replace them (``use_orig_params=False``), hold this rank's slice of a flat shard. Modules keep
# their names under ``_fsdp_wrapped_module`` (and activation checkpointing's wrapper).
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def fsdp1_flattened(t: Tensor) -> bool:
    """Whether FSDP1 flattened ``t`` into a flat shard (a ``FlatParameter`` or a view of one)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def is_distributed_param(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2, tensor parallel) or was flattened by FSDP1."""
    return hasattr(t, "placements") or fsdp1_flattened(t)


def is_flat_param(t: Tensor) -> bool:
    """Whether ``t`` is an FSDP1 ``FlatParameter`` (``use_orig_params=False``)."""
    return bool(getattr(t, "_is_flat_param", False))


def fsdp1_modules(model: nn.Module) -> list[Any]:
    """The ``FullyShardedDataParallel`` (FSDP1) modules in ``model``, itself included."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def fsdp1_strategies(model: nn.Module) -> set[str]:
    """The ``sharding_strategy`` names of the FSDP1 modules in ``model`` (empty: none)."""
    return {str(m.sharding_strategy.name) for m in fsdp1_modules(model)}


def fsdp1_shapes(model: nn.Module) -> dict[int, torch.Size]:
    """The model-defined shape of every original parameter FSDP1 flattened, by ``id``."""
    shapes: dict[int, torch.Size] = {}
    for m in fsdp1_modules(model):
        flat = getattr(m, "_flat_param", None)
        if flat is not None and flat._params is not None:  # use_orig_params=True
            shapes.update((id(p), s) for p, s in zip(flat._params, flat._shapes))
    return shapes


def clean_name(name: str) -> str:
    """A module name without the parts FSDP1 (and checkpoint wrappers) insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def acc_dtype(device: torch.device) -> torch.dtype:
    """The dtype for accumulated scalars: float64, except where a backend lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@functools.cache  # torch.promote_types is an aten call: once per dtype, not per step
def buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """A buffer dtype at least as wide as float32 for accumulating tensors of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _dense(t: Tensor) -> Tensor:
    """The stored values of a sparse tensor (after coalescing), or ``t`` itself."""
    return t.coalesce().values() if t.is_sparse else t


def norms(tensors: Sequence[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-tensor L2 norms as one 1-D tensor on ``device`` in ``dtype``, in input order.

    Tensors are grouped by (device, dtype), one ``torch._foreach_norm`` per group, as
    ``torch.nn.utils.clip_grad_norm_`` does. Sparse tensors contribute the norm of their values.
    """
    if not tensors:
        return torch.zeros(0, device=device, dtype=dtype)
    first = tensors[0]
    if all(
        t.dtype == first.dtype and t.device == first.device and not t.is_sparse for t in tensors
    ):  # the common case, without the grouping below
        return torch.stack(_foreach_norm(list(tensors))).to(device=device, dtype=dtype)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    dense = [_dense(t) for t in tensors]
    for i, t in enumerate(dense):
        groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1:
        return torch.stack(_foreach_norm(dense)).to(device=device, dtype=dtype)
    out = torch.empty(len(tensors), device=device, dtype=dtype)
    for idx in groups.values():
        vals = torch.stack(_foreach_norm([dense[i] for i in idx]))
        out[torch.tensor(idx, device=device)] = vals.to(device=device, dtype=dtype)
    return out


#: On the CPU torch's float32 norm kernel sums a whole tensor's squares in a few running
#: float32 sums: it loses 1.5e-6 of ‖g‖² on a 262k-element tensor, 2e-4 on a 4M-element one
#: and 5e-3 on a 38M-element one (GPT-2's embedding), which differences of squared norms
#: (tr Var = E‖g‖² − ‖E g‖²) magnify. A CPU tensor above ``_CPU_BIG`` elements is normed by
#: rows of ``_ROW`` elements instead, the rows' norms combined in float64 (about 1e-8 at any
#: size, and faster there; below it the extra operations cost more than they save). Other
#: devices' kernels reduce in trees and keep one ``_foreach_norm`` for every tensor.
_CPU_BIG, _ROW = 1 << 18, 4096


def cpu_big(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    """The indices of the CPU tensors above ``_CPU_BIG`` elements."""
    return tuple(
        i for i, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > _CPU_BIG
    )


def _foreach_norm(tensors: list[Tensor], big: tuple[int, ...] | None = None) -> list[Tensor]:
    """``torch._foreach_norm`` of same-dtype tensors, returned in at least float32 (a bfloat16
    norm keeps 3 significant digits, too few for differences of squared norms); on the CPU the
    norms of large tensors are taken by rows, in float64 (see ``_CPU_BIG``). ``big``:
    :func:`cpu_big` of ``tensors`` where the caller knows it (the per-step path)."""
    acc = buffer_dtype(tensors[0].dtype)
    if big is None:
        big = cpu_big(tensors)
    if big:
        found = {i: _cpu_norm(tensors[i], acc) for i in big}
        small = [i for i in range(len(tensors)) if i not in found]
        if small:
            found.update(zip(small, _foreach_norm([tensors[i] for i in small], ())))
        return [found[i] for i in range(len(tensors))]
    if acc == tensors[0].dtype:
        return list(torch._foreach_norm(tensors))
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=acc))
    except TypeError:  # torch < 2.3: no dtype argument
        return list(torch._foreach_norm([t.to(acc) for t in tensors]))


def _cpu_norm(t: Tensor, acc: torch.dtype) -> Tensor:
    """‖t‖ (0-d float64) from the norms of its ``_ROW``-element rows (see ``_CPU_BIG``)."""
    flat = t.reshape(-1)
    cut = flat.numel() - flat.numel() % _ROW
    head = flat if cut == flat.numel() else flat[:cut]
    rows = torch.linalg.vector_norm(head.view(-1, _ROW), dim=1, dtype=acc)
    if cut < flat.numel():
        tail = torch.linalg.vector_norm(flat[cut:], dtype=acc)
        rows = torch.cat([rows, tail.reshape(1)])
    return torch.linalg.vector_norm(rows, dtype=torch.float64)


def distances(
    a: Sequence[Tensor], b: Sequence[Tensor], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[‖a_i − b_i‖]`` as one 1-D tensor, one tensor-sized temporary at a time (formed in
    at least float32)."""
    if not a:
        return torch.zeros(0, device=device, dtype=dtype)
    out = []
    for x, y in zip(a, b):
        acc = buffer_dtype(x.dtype)  # a bfloat16 difference of nearby weights is rounded
        diff = x - y.to(x.dtype) if acc == x.dtype else x.to(acc) - y.to(acc)
        norm = _foreach_norm([diff])[0]  # by rows on the CPU (see _CPU_BIG)
        out.append(norm.to(device=device, dtype=dtype))
    return torch.stack(out)


# Devices where reading a 0-d tensor costs no host-device synchronisation. On these the
# running statistics read the finite flag in Python and skip a non-finite step exactly;
# elsewhere they update unconditionally with fused foreach ops and find a non-finite step in
# their sums at the next log point. Tests empty this set to cover both paths.
FREE_HOST_READ = {"cpu"}


def window_add_(bufs: Sequence[Tensor], tensors: Sequence[Tensor], plain: bool = False) -> None:
    """``buf += t`` for every pair, for a window sum that is zeroed when the window closes.

    One fused ``_foreach_add_`` whatever the number of tensors, with no host synchronisation,
    no copy of the gradients and no per-tensor operation. The caller skips a non-finite step
    where it can read the flag for free (the CPU, :attr:`Step.flag`); elsewhere the step is
    added, the buffers become non-finite, the window that holds it reports non-finite
    statistics, and the next window starts clean. (NaN·0 is NaN: no multiplicative mask can
    drop the step; an exact skip needs a ``torch.where`` per tensor or a copy of every
    gradient, which the per-step path cannot afford.)

    ``plain``: the caller knows every ``t`` is dense and of its buffer's dtype (the per-step
    path, :attr:`Step.fused`): the lists go to the fused op as they are, with no Python work per
    tensor.
    """
    if plain:
        torch._foreach_add_(list(bufs), list(tensors))
        return
    dense = [(b, t) for b, t in zip(bufs, tensors) if not t.is_sparse]
    if dense:
        torch._foreach_add_(
            [b for b, _ in dense], [t if t.dtype == b.dtype else t.to(b.dtype) for b, t in dense]
        )
    for buf, t in zip(bufs, tensors):
        if t.is_sparse:
            buf.add_(t.coalesce().to(buf.dtype))


def lerp_(
    bufs: Sequence[Tensor], tensors: Sequence[Tensor], weight: float, plain: bool = False
) -> None:
    """``buf ← buf + weight·(t − buf)`` for every pair, in one fused op (sparse ``t`` densified;
    ``plain`` as in :func:`window_add_`)."""
    if plain:
        torch._foreach_lerp_(list(bufs), list(tensors), weight)
    elif bufs:
        dense = [t.to_dense() if t.is_sparse else t for t in tensors]
        torch._foreach_lerp_(list(bufs), [t.to(b.dtype) for b, t in zip(bufs, dense)], weight)


def zero_(tensors: Sequence[Tensor]) -> None:
    if tensors:
        torch._foreach_zero_(list(tensors))


def scale_(tensors: Sequence[Tensor], factor: float) -> None:
    """``t *= factor`` for every tensor, in one fused op."""
    if tensors:
        torch._foreach_mul_(list(tensors), factor)


def check_grad_scaler(owner: str, scaler: Any) -> None:
    """``scaler`` must be ``None`` or a ``torch.amp.GradScaler`` (anything with ``scale`` and
    ``unscale_``)."""
    if scaler is not None and not (
        callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "unscale_", None))
    ):
        raise TypeError(
            f"{owner}(grad_scaler={scaler!r}) must be the torch.amp.GradScaler whose scaled "
            f"loss the backward passes see, e.g. grad_scaler=scaler, or None"
        )


def inverse_scale_sq(scaler: Any, like: Tensor) -> Tensor:
    """``1/S²`` for the current scale ``S`` of a ``torch.amp.GradScaler`` (1 when ``scaler`` is
    ``None``, disabled or unused), as a tensor like ``like``, read without a host sync."""
    scale = None if scaler is None else getattr(scaler, "_scale", None)
    if scale is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return scale.to(device=like.device, dtype=like.dtype).reciprocal().square()


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """An FSDP model's unsharded state dict, for rank 0; every rank must call it (it gathers).

    On accelerators the full tensors go to rank 0's CPU only (other ranks get an empty dict);
    on the CPU every rank receives them (FSDP1's CPU offload of CPU tensors crashed the
    process in torch 2.13).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_cpu = next(model.parameters()).device.type == "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
    return get_model_state_dict(model, options=options)
