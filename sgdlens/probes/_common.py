"""Shared machinery of the probes: data handling, functional evaluation, flat parameter spaces.

Nothing here mutates a user module: losses at other weights are evaluated with
``torch.func.functional_call`` on a small wrapper module that calls the user's ``loss_fn``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens import _torch

LossFn = Callable[[nn.Module, Any], Tensor]

MODES = ("eval", "train")

_PLOT_HINT = 'pip install "sgdlens[plot]"'


class Batches:
    """Mark an iterable explicitly as *several* batches.

    Probes accept ``data`` as one batch or as an iterable of batches. A tensor, a tuple, a dict,
    or a list of tensors (``[x, y]`` as a ``DataLoader`` yields it) is one batch; a list of
    tuples/lists/dicts, a ``DataLoader`` or any other iterable is several. Wrap in ``Batches``
    where that guess would be wrong, e.g. a list of input-only tensor batches.

    Example:
        >>> import torch
        >>> from sgdlens.probes import Batches
        >>> data = Batches([torch.randn(4, 3), torch.randn(4, 3)])
        >>> len(data.batches)
        2
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise TypeError(
                f"Batches(batches=...) needs an iterable of batches, got "
                f"{type(batches).__name__}; pass e.g. a list of (x, y) tuples"
            )
        self.batches = list(batches)

    def __repr__(self) -> str:
        return f"Batches(<{len(self.batches)} batches>)"


def as_batches(data: Any, name: str = "data") -> list[Any]:
    """The list of batches that ``data`` stands for (see :class:`Batches`)."""
    if isinstance(data, Batches):
        out = data.batches
    elif data is None or isinstance(data, (Tensor, tuple, Mapping)):
        out = [data]
    elif isinstance(data, list):
        if not data or all(isinstance(b, (tuple, list, Mapping)) for b in data):
            out = data
        else:
            out = [data]
    elif isinstance(data, (str, bytes)):
        raise TypeError(
            f"{name} must be one batch or an iterable of batches, got a {type(data).__name__} "
            f"{data!r:.40}; pass tensors, e.g. (x, y)"
        )
    elif isinstance(data, Iterable):
        out = list(data)
    else:
        out = [data]
    if not out:
        raise ValueError(
            f"{name} holds no batches (got an empty {type(data).__name__}); pass at least one batch"
        )
    return out


def check_model(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself (state dicts are accepted only where documented)"
        )
    return model


# Why probes refuse FSDP models, and what to do instead (also in docs/distributed.md).
FSDP_REASON = (
    "probes evaluate the loss at other weights and differentiate it twice through "
    "torch.func.functional_call, and FSDP's forward gathers its own copies of the parameters "
    "outside autograd, so the numbers would be wrong; run the probe on an unsharded copy (load "
    "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) into a plain "
    "model), or train with DDP"
)


def check_unsharded(model: nn.Module, name: str = "model") -> None:
    """Refuse a model whose parameters FSDP (DTensors, FSDP1 flat shards) manages."""
    for pname, p in model.named_parameters():
        if _torch.is_distributed_param(p):
            raise ValueError(
                f"{name} holds FSDP-managed parameters ({pname!r} is a "
                f"{type(p).__name__} sharded across ranks): {FSDP_REASON}"
            )


def check_fn(fn: Any, name: str = "loss_fn") -> None:
    if not callable(fn):
        raise TypeError(
            f"{name} must be a callable (model, batch) -> scalar tensor, got "
            f"{type(fn).__name__}; e.g. lambda m, b: F.cross_entropy(m(b[0]), b[1])"
        )


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(
            f"mode must be 'eval' or 'train', got {mode!r}; 'eval' (the default) evaluates with "
            "dropout off and BatchNorm running statistics"
        )
    return str(mode)


def check_int(value: Any, name: str, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}{hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return value


def check_positive(value: Any, name: str, hint: str = "", allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}{hint}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}{hint}")
    return v


def check_generator(generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(0)"
        )
    return generator


def set_mode(model: nn.Module, mode: str) -> None:
    """Put ``model`` in ``mode`` (inside :func:`preserved`, which restores every flag)."""
    model.train(mode == "train")


class _Bound(nn.Module):
    """``forward(batch) = fn(model, batch)``; lets ``functional_call`` swap the model's tensors."""

    def __init__(self, model: nn.Module, fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def _check_scalar(out: Any, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{name} must return a scalar tensor, got {type(out).__name__}; return the loss "
            "tensor itself, not loss.item()"
        )
    if out.numel() != 1:
        raise ValueError(
            f"{name} must return a scalar tensor, got shape {tuple(out.shape)}; reduce it, "
            "e.g. with .mean()"
        )
    return out.reshape(())


class Evaluator:
    """Mean of ``fn(model, batch)`` over batches at any weights, via ``functional_call``.

    ``named`` maps full parameter/buffer names (``model.named_parameters()`` /
    ``named_buffers()`` spelling) to the tensors to use; names left out use the module's own.
    """

    def __init__(
        self, model: nn.Module, fn: LossFn, batches: Sequence[Any], name: str, seed: int | None
    ) -> None:
        check_unsharded(model)
        self.model = model
        self.bound = _Bound(model, fn)
        self.batches = batches
        self.name = name
        self.seed = seed
        self.calls = 0
        self._states: dict[int, tuple[Tensor, list[tuple[torch.device, Tensor]]]] = {}
        self._cuda = sorted(
            {
                t.device
                for t in list(model.parameters()) + list(model.buffers())
                if t.device.type == "cuda"
            },
            key=str,
        )

    def _reseed(self, i: int) -> None:
        """Put the RNG in the state it has after ``manual_seed(seed + i)``.

        ``manual_seed`` itself is slow (it records a stack trace for lazy CUDA seeding), so the
        states are captured once per batch and set again with ``set_rng_state``.
        """
        assert self.seed is not None
        if i not in self._states:
            torch.manual_seed(self.seed + i)
            cuda = [(d, torch.cuda.get_rng_state(d)) for d in self._cuda]
            self._states[i] = (torch.get_rng_state(), cuda)
        cpu, cuda = self._states[i]
        torch.set_rng_state(cpu)
        for d, st in cuda:
            torch.cuda.set_rng_state(st, d)

    def one(self, named: Mapping[str, Tensor], i: int) -> Tensor:
        """``fn`` on batch ``i``; with a seed, the RNG is reset first, so every evaluation in
        one probe sees the same dropout masks (:func:`preserved` restores the RNG after)."""
        self.calls += 1
        if self.seed is not None:
            self._reseed(i)
        pb = {"model." + k: v for k, v in named.items()}
        out = torch.func.functional_call(self.bound, pb, (self.batches[i],))
        return _check_scalar(out, self.name)

    def mean(self, named: Mapping[str, Tensor]) -> Tensor:
        total: Tensor | None = None
        for i in range(len(self.batches)):
            val = self.one(named, i)
            total = val if total is None else total + val
        assert total is not None
        return total / len(self.batches)


def probe_seed() -> int:
    """A seed drawn from the global torch RNG (restored by :func:`preserved` afterwards)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def own_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a CPU generator seeded from the global RNG.

    Probes re-seed the global RNG before every loss evaluation (fixed dropout masks), so random
    vectors drawn between evaluations must come from a generator of their own. Called inside
    :func:`~sgdlens.probes.preserved`, which puts the global RNG back afterwards.
    """
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(probe_seed())


def fixed_data(data: Any, name: str = "data") -> Any:
    """``data`` checked now, for a probe that reads it at every run later.

    A one-shot iterator (a generator expression, ``iter(loader)``) is read into a list here:
    read lazily, every run after the first would find it exhausted. Other iterables (a
    ``DataLoader``) are left as they are, to be iterated at each run.
    """
    if isinstance(data, Iterator):
        return Batches(as_batches(data, name))
    if data is None or isinstance(data, (Tensor, tuple, list, Mapping, Batches, str, bytes)):
        as_batches(data, name)
    return data


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Named parameters that require grad, tied weights once (the first name)."""
    check_unsharded(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def buffer_items(model: nn.Module) -> list[tuple[str, Tensor]]:
    return list(model.named_buffers())


@dataclass
class Space:
    """A flat view of a list of named tensors (one common compute dtype)."""

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, items: Sequence[tuple[str, Tensor]]) -> Space:
        if not items:
            raise ValueError(
                "the model has no parameters that require grad; set requires_grad=True on the "
                "parameters to probe"
            )
        dtype = items[0][1].dtype
        for _, t in items[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {dtype}")
        return cls(
            names=[n for n, _ in items],
            shapes=[t.shape for _, t in items],
            dtypes=[t.dtype for _, t in items],
            device=items[0][1].device,
            dtype=dtype,
        )

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def flatten_dict(self, named: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(
                f"the vector is missing entries for {missing[:3]}; give one tensor per "
                f"trainable parameter ({len(self.names)} names, e.g. {self.names[:3]})"
            )
        return self.flatten([named[n] for n in self.names])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        out = []
        i = 0
        for s, dt in zip(self.shapes, self.dtypes):
            n = math.prod(s)
            out.append(flat[i : i + n].reshape(s).to(dt))
            i += n
        return out

    def to_dict(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.unflatten(flat)))


def progress_iter(it: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterator[Any]:
    """``it`` wrapped in a tqdm bar when ``enabled`` (tqdm is an optional extra)."""
    if not enabled:
        yield from it
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"progress=True needs tqdm, which is not installed; run {_PLOT_HINT} "
            "(or pip install tqdm), or pass progress=False"
        ) from e
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for x in it:
            yield x
            bar.update(1)
