"""How parameters group into the layers that records report (``PhaseMonitor(layers=...)``).

A record holds whole-model keys (``grad_snr``) and one key per group (``grad_snr/<group>``).
The grouping decides how many keys a record has: a GPT-2-shaped model has 148 parameter
tensors, 76 modules with parameters, and 12 transformer blocks.

* ``"modules"``: a module's own parameters form one group named after the module
  (``transformer.h.3.mlp.c_fc``); parameters of no module of ``model`` are ``group<i>.<j>``.
* ``"blocks"``: the repeated children of a ``ModuleList``/``Sequential`` (two or more
  children of one class that hold parameters, such as ``transformer.h.3`` or ``layer2.1``) are
  one group each; every other parameter goes to its module's name cut to the level above the
  outermost such container (``transformer`` for GPT-2's embeddings and final LayerNorm), and to
  at least its top-level module (``conv1``, ``fc`` in a ResNet).
* ``"params"``: one group per parameter tensor (``fc1.weight``, ``fc1.bias``).
* ``"auto"`` (the default): ``"modules"`` while they number at most :data:`AUTO_MODULES`,
  else ``"blocks"``, so that a small model keeps one group per layer and a deep one stays
  readable (a GPT-2-shaped model: 13 groups).
* a function ``name -> group``: called with each parameter's name from
  ``model.named_parameters()``; return a group name, or ``None`` to keep the parameter out of
  the per-group keys (it still counts in the whole-model keys).
* :class:`Layers` ``(by, include=..., exclude=...)``: one of the above, restricted to the
  parameters whose names match an ``include`` pattern and no ``exclude`` pattern (shell
  patterns, ``fnmatch``: ``"transformer.h.*.mlp.*"``).

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    >>> group_names(net, [p for p in net.parameters()], "blocks")
    ['0', '0', '1.0', '1.0', '1.1', '1.1']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

from torch import Tensor, nn

from sgdlens._torch import clean_name
from sgdlens._warn import warn

__all__ = ["AUTO_MODULES", "BY", "Layers", "LayersArg", "check_layers", "group_names"]

#: ``layers="auto"`` groups by module up to this many modules with parameters, else by block
AUTO_MODULES = 16
BY = ("auto", "modules", "blocks", "params")


@dataclass(frozen=True)
class Layers:
    """A grouping restricted by name patterns (see the module docstring).

    Args:
        by: ``"auto"``, ``"modules"``, ``"blocks"``, ``"params"`` or a function
            ``parameter name -> group name or None``.
        include: shell patterns; only parameters whose names match one get per-group keys
            (empty: all).
        exclude: shell patterns; parameters whose names match one get no per-group keys.
    """

    by: str | Callable[[str], str | None] = "auto"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()


LayersArg = Union[str, Callable[[str], str | None], Layers]  # noqa: UP007 (a runtime alias)


def check_layers(layers: object, owner: str = "PhaseMonitor") -> Layers:
    """``layers=`` as a :class:`Layers`, or a ``TypeError``/``ValueError`` saying what to pass."""
    spec = layers if isinstance(layers, Layers) else Layers(layers)  # type: ignore[arg-type]
    if isinstance(spec.by, str):
        if spec.by not in BY:
            raise ValueError(
                f"{owner}(layers={spec.by!r}) is not a grouping; use one of {list(BY)}, a "
                f"function from parameter name to group name, or sgdlens.Layers(...)"
            )
    elif not callable(spec.by):
        raise TypeError(
            f"{owner}(layers=...) must be one of {list(BY)}, a function from parameter name "
            f"to group name, or sgdlens.Layers(...); got {type(spec.by).__name__} {spec.by!r}"
        )
    for arg in ("include", "exclude"):
        patterns = getattr(spec, arg)
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"{owner}(layers=Layers({arg}=...)) must be a list of name patterns, got "
                f"{patterns!r}; e.g. {arg}=['transformer.h.*']"
            )
    return spec


def _owners(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``id(parameter) -> (module name, parameter name)`` for the first module holding it."""
    out: dict[int, tuple[str, str]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            mod = clean_name(mname)
            out.setdefault(id(p), (mod, f"{mod}.{pname}" if mod else pname))
    return out


def _blocks(model: nn.Module) -> tuple[list[str], int]:
    """The block names (repeated children of containers) and the depth of the outermost
    container holding blocks (-1: none)."""
    blocks: list[str] = []
    depth = -1
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        kids = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        kinds = [type(c) for _, c in kids]
        name = clean_name(name)
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue  # inside a block already found: the outer one wins
        repeated = [n for (n, c), k in zip(kids, kinds) if kinds.count(k) >= 2]
        if repeated:
            blocks += [f"{name}.{n}" if name else n for n in repeated]
            here = len(name.split(".")) if name else 0
            depth = here if depth < 0 else min(depth, here)
    return blocks, depth


def group_names(
    model: nn.Module | None,
    params: Sequence[Tensor],
    layers: LayersArg = "auto",
    fallback: Sequence[str] = (),
) -> list[str | None]:
    """The group of each parameter (``None``: no per-group keys), in ``params`` order.

    ``fallback`` names the parameters that belong to no module of ``model`` (or all of them
    without a model); by default ``param<i>``.
    """
    spec = check_layers(layers)
    fallback = list(fallback) or [f"param{i}" for i in range(len(params))]
    owners = _owners(model) if model is not None else {}
    by = spec.by
    if by == "auto":  # modules with parameters, counted
        small = len({owners[id(p)][0] for p in params if id(p) in owners}) <= AUTO_MODULES
        by = "modules" if small else "blocks"
    blocks, depth = _blocks(model) if by == "blocks" and model is not None else ([], -1)
    out: list[str | None] = []
    matched = {pat: False for pat in (*spec.include, *spec.exclude)}
    for i, p in enumerate(params):
        mod, pname = owners.get(id(p), (None, fallback[i]))
        hits = {pat for pat in matched if fnmatch.fnmatchcase(pname, pat)}
        matched.update(dict.fromkeys(hits, True))
        not_included = bool(spec.include) and hits.isdisjoint(spec.include)
        if not_included or not hits.isdisjoint(spec.exclude):
            out.append(None)
            continue
        if callable(by):
            group = by(pname)
            if group is not None and not isinstance(group, str):
                raise TypeError(
                    f"PhaseMonitor(layers=...): the grouping function returned {group!r} for "
                    f"parameter {pname!r}; return a group name (str) or None"
                )
            out.append(group)
        elif mod is None:
            out.append(fallback[i])
        elif by == "params":
            out.append(pname)
        elif by == "blocks":
            block = next((b for b in blocks if mod == b or mod.startswith(b + ".")), None)
            if block is None and depth >= 0:
                parts = mod.split(".") if mod else []
                block = ".".join(parts[: max(1, depth - 1)]) if parts else ""
            out.append((block if block is not None else mod) or "model")
        else:
            out.append(mod or "model")
    unmatched = [pat for pat, hit in matched.items() if not hit]
    if unmatched:
        seen = [owners.get(id(p), (None, fallback[i]))[1] for i, p in enumerate(params[:3])]
        warn(
            f"PhaseMonitor(layers=Layers(...)): the patterns {unmatched} match no parameter "
            f"name (names look like {seen})",
        )
    return out
