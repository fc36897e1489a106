"""Checking a monitor checkpoint against the monitor before loading it, and loading it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["STATE_KEYS", "check_like", "lens_id", "load_into", "plain", "short"]


def lens_id(lens: Any) -> str:
    """What a checkpoint records of a lens: its ``repr`` where the class defines one (the
    settings, ``GradSNR(window=50, ...)``), else its class (a default ``repr`` holds a memory
    address, which no resumed process would match)."""
    cls = type(lens)
    if cls.__repr__ is object.__repr__:
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(lens)


STATE_KEYS = frozenset(
    {"version", "step", "finite", "observed", "lenses", "states", "trace", "last_loss"}
)


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_like(current: Any, loaded: Any, path: str) -> None:
    """Raise if ``loaded`` cannot be loaded into ``current`` (see :func:`load_into`)."""
    if isinstance(current, Tensor):
        if not isinstance(loaded, Tensor) or loaded.shape != current.shape:
            raise ValueError(f"load_state_dict: {path} does not match this monitor's parameters")
    elif isinstance(current, dict):
        if not isinstance(loaded, Mapping) or set(loaded) != set(current):
            raise ValueError(f"load_state_dict: {path} has other entries than this monitor's")
        for k in current:
            check_like(current[k], loaded[k], f"{path}[{k!r}]")
    elif isinstance(current, list):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(current):
            raise ValueError(
                f"load_state_dict: {path} holds "
                f"{len(loaded) if isinstance(loaded, (list, tuple)) else type(loaded).__name__}"
                f" entries, not {len(current)}"
            )
        for j, (c, x) in enumerate(zip(current, loaded)):
            check_like(c, x, f"{path}[{j}]")


def load_into(current: Any, loaded: Any) -> Any:
    """Copy ``loaded`` into the structure of ``current``, tensors in place (keeping devices).

    ``loaded`` has passed :func:`check_like` against ``current``."""
    if isinstance(current, Tensor):
        return current.copy_(loaded)
    if isinstance(current, dict):
        for k in current:
            current[k] = load_into(current[k], loaded[k])
        return current
    if isinstance(current, list):
        return [load_into(c, x) for c, x in zip(current, loaded)]
    return loaded
