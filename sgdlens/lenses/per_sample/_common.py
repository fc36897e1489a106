"""What the per-sample rules share: a module use, result shapes and small tensor helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens._torch import pytree

MODES = ("auto", "hooks", "func")

# A rule's answer for one parameter: ("norm", sq (B,), elem or None), ("root", ‖c_s‖ (B,),
# elem or None: the engine squares them with the others at the step) or ("full", (B, *shape)).
Result = tuple[str, Tensor, Tensor | None]


class Use:
    """One forward call of a module: its inputs, its outputs' shapes and their gradients.

    The outputs themselves are not kept: a hook on an output lives on its ``grad_fn``, so a
    reference from the hook back to the output would be a cycle through the autograd graph,
    which Python's garbage collector cannot see (every step's graph would leak).
    """

    __slots__ = ("args", "got", "grads", "kwargs", "output")

    def __init__(self, args: Any, kwargs: Any, output: list[Tensor]) -> None:
        self.args, self.kwargs = args, kwargs
        self.output = [Like(t) for t in output]
        self.grads: list[Tensor | None] = [None] * len(output)
        self.got: list[bool] = []  # which outputs received a gradient (set before processing)


class Like:
    """The shape, dtype and device of a tensor, without the tensor."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, t: Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def dim(self) -> int:
        return len(self.shape)

    def zeros(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def tensors(output: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]


def seq(t: Tensor) -> Tensor:
    """``(B, …, d)`` as ``(B, T, d)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def from_full(full: Tensor, need_elem: bool) -> Result:
    """The result for per-sample gradients ``full`` (B, …): with ``need_elem`` their squared
    norms and Σ_s c_s², else their norms as a "root" (one pass, no squared copy; the engine
    squares every root at once at the step)."""
    if need_elem:
        sq = full.square()
        return ("norm", sq.reshape(sq.shape[0], -1).sum(1), sq.sum(0))
    return ("root", torch.linalg.vector_norm(full.reshape(full.shape[0], -1), dim=1), None)


# -- rules: (module, uses, want) -> {param name: Result}; want[name] is "norm" or "full" -----


def cat(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat``, except that one tensor is returned as it is (no copy of a strided view)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def gram_cheaper(t: int, d_in: int, d_out: int) -> bool:
    """Whether norms by the Gram trick (``T²(in+out)`` per sample) beat materialising
    (``T·in·out``)."""
    return t * (d_in + d_out) <= d_in * d_out


def gram_sq(a: Tensor, g: Tensor) -> Tensor:
    """‖Σ_t g_t a_tᵀ‖² per sample from a (B,T,in), g (B,T,out): Σ_{t,u} (a_t·a_u)(g_t·g_u)."""
    return (a @ a.transpose(1, 2)).mul_(g @ g.transpose(1, 2)).sum((1, 2))


def weight_bias(
    w: Callable[[], Tensor],
    gsum: Callable[[], Tensor],
    want: dict[str, str],
    need: bool,
    w_sq: Callable[[], Tensor] | None = None,
    w_root: Callable[[], Tensor] | None = None,
) -> dict[str, Result]:
    """Results for ``weight`` (full per-sample gradients ``w()``, or, when cheaper and
    enough, their squared norms ``w_sq()`` or norms ``w_root()``) and ``bias`` (per-sample
    gradients ``gsum()``)."""
    out: dict[str, Result] = {}
    if "weight" in want:
        if w_sq is not None and want["weight"] == "norm" and not need:
            out["weight"] = ("norm", w_sq(), None)
        elif w_root is not None and want["weight"] == "norm" and not need:
            out["weight"] = ("root", w_root(), None)
        else:
            full = w()
            out["weight"] = (
                ("full", full, None) if want["weight"] == "full" else from_full(full, need)
            )
    if "bias" in want:
        b = gsum()
        out["bias"] = ("full", b, None) if want["bias"] == "full" else from_full(b, need)
    return out


Rule = Callable[[nn.Module, list[Use], dict[str, str], bool], dict[str, Result]]


#: the floating dtypes narrower than float32 (float16, bfloat16, the float8 kinds)
NARROW = frozenset(
    d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype)
    and d.is_floating_point
    and torch.empty((), dtype=d).element_size() < 4
)


def wide(t: Any) -> Any:
    """A floating tensor narrower than float32 as float32 (anything else as it is)."""
    return t.float() if isinstance(t, Tensor) and t.dtype in NARROW else t


def narrow(*groups: Any) -> bool:
    """Whether some tensor in ``groups`` (sequences of arguments) has a :data:`NARROW` dtype."""
    return any(isinstance(t, Tensor) and t.dtype in NARROW for ts in groups for t in ts)


def index_sums(
    parts: list[list[Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    cache: dict[tuple[tuple[int, int], ...], Tensor],
    square: bool = False,
    slots: Sequence[int] | None = None,
    size: int | None = None,
    roots: list[list[Tensor]] | None = None,
) -> Tensor:
    """``out[slots[i]]`` = the sum of every entry of ``parts[i]`` (0-d or 1-D tensors; of
    their squares with ``square``) and of the squares of every entry of ``roots[i]``, in
    ``dtype`` on ``device``, ``size`` entries (by default ``slots[i] = i`` and
    ``size = len(parts)``; several may share a slot): one concatenation (and one square of
    all the roots) and one ``index_add_``, the index tensor of each layout kept in ``cache``."""
    # no op per part where none is needed (the parts are 1-D on the device): the per-step
    # path must not launch more as the parameters grow
    flat = [
        t if t.dim() == 1 and t.device == device else t.reshape(-1).to(device)
        for ts in parts
        for t in ts
    ]
    rflat = [
        t if t.dim() == 1 and t.device == device else t.reshape(-1).to(device)
        for ts in roots or ()
        for t in ts
    ]
    out = torch.zeros(len(parts) if size is None else size, dtype=dtype, device=device)
    if not flat and not rflat:
        return out
    at = range(len(parts)) if slots is None else slots
    layout = tuple((at[i], t.numel()) for i, ts in enumerate(parts) for t in ts)
    if rflat:
        layout += tuple((at[i], t.numel()) for i, ts in enumerate(roots or ()) for t in ts)
    if layout not in cache:
        cache[layout] = torch.tensor(
            [i for i, n in layout for _ in range(n)], dtype=torch.long, device=device
        )
    values = torch.cat(flat).to(dtype) if flat else None
    if values is not None and square:
        values = values.square()
    if rflat:  # squared in their own dtype, as a rule squaring them would
        more = torch.cat(rflat).square().to(dtype)
        values = more if values is None else torch.cat([values, more])
    assert values is not None
    return out.index_add_(0, cache[layout], values)
