"""Checking a monitor checkpoint against the monitor before loading it, and loading it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from sgdlens.monitor import PhaseMonitor

__all__ = [
    "STATE_KEYS",
    "VERSION",
    "check_like",
    "check_state",
    "lens_id",
    "load_into",
    "monitor_state",
    "restore",
]

#: the format version of ``PhaseMonitor.state_dict()``
VERSION = 1


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


def check_state(
    state_dict: Any, version: int, identity: Mapping[str, tuple[Any, str]], states: list[Any]
) -> None:
    """Raise unless ``state_dict`` is a complete monitor checkpoint of ``version`` whose
    ``identity`` entries (key -> (this monitor's value, the fix, where ``{saved}`` is the
    checkpoint's value)) match, where the file has them, and whose ``states`` are shaped like
    this monitor's (:func:`check_like`)."""
    where = "load_state_dict(state_dict=...)"
    if not isinstance(state_dict, Mapping) or state_dict.get("version") != version:
        raise ValueError(
            f"{where} needs a dict from PhaseMonitor.state_dict() (version {version}); got "
            f"{type(state_dict).__name__}"
            + (
                f" with version {state_dict.get('version')!r}"
                if isinstance(state_dict, Mapping)
                else ""
            )
        )
    missing = sorted(STATE_KEYS - set(state_dict))
    if missing:
        raise ValueError(
            f"{where} lacks {missing}: it is not a complete PhaseMonitor.state_dict() "
            f"(truncated or edited?); save monitor.state_dict() as it is"
        )
    for key, (mine, fix) in identity.items():
        if key in state_dict and plain(state_dict[key]) != mine:  # older files lack some
            saved = plain(state_dict[key])
            raise ValueError(
                f"load_state_dict: the checkpoint's {key} {short(saved)} differ from this "
                f"monitor's {short(mine)}; build the monitor with {fix.format(saved=saved)}"
            )
    for i, (state, loaded) in enumerate(zip(states, state_dict["states"])):
        check_like(state, loaded, f"states[{i}]")
    if len(state_dict["states"]) != len(states):
        raise ValueError(
            f"load_state_dict: states holds {len(state_dict['states'])} entries, this "
            f"monitor has {len(states)} lenses"
        )


def monitor_state(mon: PhaseMonitor) -> dict[str, Any]:
    """``PhaseMonitor.state_dict()``: live tensors and numbers, no copies."""
    return {
        "version": VERSION,
        "step": mon.step,
        **mon.tally.state_dict(),  # finite, observed, trace, trace_steps, updates, last_loss
        "lenses": [lens_id(lens) for lens in mon.lenses],
        "layers": list(mon.view.layers),
        "log_every": mon.log_every,
        "states": list(mon.states),
        "detector": None if mon.detector is None else mon.detector.state_dict(),
        "probes": None if mon.probes is None else mon.probes.state_dict(),
        "update_every": mon.sampler.every,
        "run_id": getattr(mon, "run_id", None),
    }


def restore(mon: PhaseMonitor, state_dict: Mapping[str, Any]) -> None:
    """Load a checked :func:`monitor_state` into ``mon`` (``PhaseMonitor.load_state_dict``)."""
    for i, (state, loaded) in enumerate(zip(mon.states, state_dict["states"])):
        mon.states[i] = load_into(state, loaded)
    mon.step = int(state_dict["step"])
    mon.tally.load_state_dict(state_dict, mon.step)
    if mon.detector is not None and state_dict.get("detector") is not None:
        mon.detector.load_state_dict(state_dict["detector"])
    if mon.probes is not None and state_dict.get("probes") is not None:
        mon.probes.load_state_dict(state_dict["probes"])
    # a monitor without overhead_budget reads every step, whatever the checkpoint's did
    mon.sampler.every = int(state_dict.get("update_every", 1)) if mon.sampler.budget else 1
    if state_dict.get("run_id") and not getattr(mon, "_header_sent", False):
        mon.run_id = str(state_dict["run_id"])  # a resumed run keeps its run id
