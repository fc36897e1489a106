"""The restore guarantee every probe runs under: :func:`preserved`.

On return *or exception* the model is bit-for-bit what it was: parameter and buffer values
(BatchNorm running statistics and ``num_batches_tracked`` included) and the tensor objects that
hold them, every ``.grad`` (values, object, and ``None``-ness), ``requires_grad`` flags, the
``training`` flag of every submodule, the random number generators (torch CPU, CUDA when it is
initialised, MPS when available, Python's ``random`` and NumPy's global generator), and, when an
optimizer is given, its ``param_groups`` hyper-parameters and per-parameter state.

Tensors are written back only where their bits changed, so a probe that changed nothing leaves
version counters alone (a graph built before the probe can still be back-propagated).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sgdlens._optim import unwrap_optimizer
from sgdlens._quiet import probing
from sgdlens.probes._common import check_model

__all__ = ["preserved", "same_bits"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype and bit pattern (NaN payloads, -0.0 too).

    Example:
        >>> import torch
        >>> same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
        False
    """
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        size = a.element_size()
        if a.dtype.is_complex:
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            size //= 2
        it = _INT_OF_SIZE[size]
        return bool(torch.equal(a.view(it), b.view(it)))
    return bool(torch.equal(a, b))


class _Saved:
    """A tensor object and a copy of its values."""

    __slots__ = ("obj", "values")

    def __init__(self, t: Tensor) -> None:
        self.obj = t
        self.values = t.detach().clone()

    def restore(self) -> Tensor:
        with torch.no_grad():
            cur = self.obj.detach()
            if not same_bits(cur, self.values):
                if cur.shape != self.values.shape or cur.dtype != self.values.dtype:
                    self.obj.data = self.values.clone()
                else:
                    cur.copy_(self.values)
        return self.obj


class _ParamState:
    __slots__ = ("data", "data_obj", "grad", "param", "requires_grad")

    def __init__(self, p: Tensor) -> None:
        self.param = p
        self.data_obj = p.detach()  # shares p's storage: restores p.data if it was swapped
        self.data = _Saved(self.data_obj)
        self.grad = None if p.grad is None else _Saved(p.grad)
        self.requires_grad = p.requires_grad

    def restore(self) -> None:
        p = self.param
        if p.data_ptr() != self.data_obj.data_ptr() or p.shape != self.data_obj.shape:
            p.data = self.data_obj
        self.data.restore()
        if self.grad is None:
            p.grad = None
        else:
            g = self.grad.restore()
            if p.grad is not g:
                p.grad = g
        if p.requires_grad != self.requires_grad:
            p.requires_grad_(self.requires_grad)


class _OptimizerState:
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.groups = [
            {
                k: _Saved(v) if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in g.items()
                if k != "params"
            }
            for g in opt.param_groups
        ]
        self.group_params = [list(g["params"]) for g in opt.param_groups]
        self.state: dict[Tensor, tuple[dict[str, Any], dict[str, Any]]] = {}
        for p, st in opt.state.items():
            self.state[p] = (
                st,
                {
                    k: _Saved(v) if isinstance(v, Tensor) else copy.deepcopy(v)
                    for k, v in st.items()
                },
            )

    def restore(self) -> None:
        opt = self.opt
        del opt.param_groups[len(self.groups) :]
        for g, saved, params in zip(opt.param_groups, self.groups, self.group_params):
            for k in [k for k in g if k != "params" and k not in saved]:
                del g[k]
            for k, v in saved.items():
                g[k] = v.restore() if isinstance(v, _Saved) else copy.deepcopy(v)
            g["params"] = params
        for p in [p for p in opt.state if p not in self.state]:
            del opt.state[p]
        for p, (inner, saved_st) in self.state.items():
            values = {
                k: v.restore() if isinstance(v, _Saved) else copy.deepcopy(v)
                for k, v in saved_st.items()
            }
            inner.clear()
            inner.update(values)
            if opt.state.get(p) is not inner:
                opt.state[p] = inner


class _RNG:
    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        mps = getattr(torch, "mps", None)
        self.mps = None
        if mps is not None and torch.backends.mps.is_available():
            self.mps = mps.get_rng_state()
        self.py = random.getstate()
        self.np = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.mps is not None:
            torch.mps.set_rng_state(self.mps)
        random.setstate(self.py)
        np.random.set_state(self.np)


class _ModelState:
    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.attrs: list[tuple[nn.Module, str, Tensor]] = []
        params: dict[int, _ParamState] = {}
        buffers: dict[int, _Saved] = {}
        for m in self.modules:
            for name, p in m.named_parameters(recurse=False):
                self.attrs.append((m, name, p))
                if id(p) not in params:
                    params[id(p)] = _ParamState(p)
            for name, b in m.named_buffers(recurse=False):
                self.attrs.append((m, name, b))
                if id(b) not in buffers:
                    buffers[id(b)] = _Saved(b)
        self.params = list(params.values())
        self.buffers = list(buffers.values())

    def restore(self) -> None:
        for m, name, obj in self.attrs:
            if getattr(m, name, None) is not obj:
                setattr(m, name, obj)
        for ps in self.params:
            ps.restore()
        for bs in self.buffers:
            bs.restore()
        for m, flag in zip(self.modules, self.training):
            m.training = flag


@contextmanager
def preserved(model: nn.Module, optimizer: Any = None) -> Iterator[nn.Module]:
    """Run a block and put ``model`` (and ``optimizer``) back exactly as they were.

    On exit, normal or by exception, restores bit for bit: parameter and buffer values and the
    tensor objects behind them (BatchNorm ``running_mean``/``running_var``/
    ``num_batches_tracked``), each ``.grad`` (values, object identity, ``None``-ness),
    ``requires_grad`` flags, every submodule's ``training`` flag, the RNG states (torch CPU;
    CUDA if initialised; MPS if available; Python ``random``; NumPy's global generator), and the
    optimizer's ``param_groups`` hyper-parameters and ``state`` if an optimizer is given.
    Tied weights are saved once. Restoring only writes tensors whose bits changed.

    Cost: one copy of the parameters, gradients and buffers (and optimizer state) on entry; one
    comparison (and, where changed, a copy) per tensor on exit. No forward or backward pass.

    Args:
        model: the module to protect.
        optimizer: optionally, a ``torch.optim.Optimizer`` (or a wrapper exposing
            ``.optimizer``) whose state must also be protected.

    Yields:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``optimizer`` is not an optimizer.

    Example:
        >>> import torch
        >>> from sgdlens.probes import preserved
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> before = [t.clone() for t in model.state_dict().values()]
        >>> with preserved(model):
        ...     _ = model.train()
        ...     model(torch.randn(8, 3)).sum().backward()   # moves BN stats, fills .grad
        >>> all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
        True
        >>> model[0].weight.grad is None
        True
    """
    check_model(model)
    opt = None if optimizer is None else unwrap_optimizer(optimizer)
    saved_model = _ModelState(model)
    saved_opt = None if opt is None else _OptimizerState(opt)
    saved_rng = _RNG()
    try:
        with probing():  # the probe's passes are invisible to the monitor's lenses
            yield model
    finally:
        saved_model.restore()
        if saved_opt is not None:
            saved_opt.restore()
        saved_rng.restore()
