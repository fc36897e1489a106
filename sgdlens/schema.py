"""The record schema: which keys a run's records hold, what each one means, how to draw it.

Every lens declares the metrics it logs as :class:`Key` s in its class attribute ``keys``
(whole-model and/or per-layer, a one-line description, the natural scale); a lens that declares
only ``metrics`` gets, for each name, a per-layer and a whole-model key without a description.
Probes declare theirs the same way (``Probe(keys=...)``), and the monitor declares the fields it
writes itself. The monitor writes the run's schema into its header as ``header["schema"]``, one
entry per metric::

    {"grad_snr": {"source": "GradSNR", "doc": "grad_mean / grad_std: ...", "scale": "snr",
                  "whole": true, "layers": ["0", "2"]},
     "step": {"source": "monitor", "doc": "optimizer steps seen so far", "scale": "linear",
              "whole": true, "layers": []}, ...}

The record keys of an entry are ``metric`` itself when ``whole`` is true and
``metric + "/" + layer`` for each of its ``layers``, exactly: a reader that has the schema looks
keys up (:func:`key_index`) and never splits a string, so a layer name holding ``/`` (a
``layers=`` function may return one) or a probe key such as ``barrier/init`` (one whole-model
number, not layer ``init`` of ``barrier``) reads right. A key may be absent from some records
(``GradSNR`` before its first window completes) or from the whole run (``eos_ratio`` for an
optimizer without an edge-of-stability threshold). Keys the schema does not list are
``observe()`` names first seen after the header was written, or come from a lens or probe that
declares nothing; readers split those, and every key of a file without a schema, at the first
``/``, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SCALES", "Key", "declared", "key_index", "run_schema", "scale_of", "split_key"]

#: ``"log"``: positive, drawn on log axes; ``"snr"``: a signal-to-noise ratio, log axes with 1
#: as the boundary (a diverging colour scale); ``"linear"``: any sign; ``"text"``: labels.
SCALES = ("log", "snr", "linear", "text")


@dataclass(frozen=True)
class Key:
    """One metric a lens or probe logs: ``name`` (whole model) and/or ``name/<layer>``.

    Example:
        >>> k = Key("sharpness", "top Hessian eigenvalue", per_layer=False)
        >>> k.per_layer, k.whole, k.scale
        (False, True, 'log')
    """

    name: str
    doc: str = ""
    per_layer: bool = True
    whole: bool = True
    scale: str = "log"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Key(name={self.name!r}) must be a non-empty string")
        if self.per_layer and "/" in self.name:
            raise ValueError(f"Key({self.name!r}): a per-layer metric's name may not hold '/'")
        if not (self.per_layer or self.whole):
            raise ValueError(f"Key({self.name!r}) logs nothing: set per_layer or whole")
        if self.scale not in SCALES:
            raise ValueError(f"Key({self.name!r}, scale={self.scale!r}) must be one of {SCALES}")


def declared(lens: Any) -> tuple[Key, ...]:
    """A lens's declared keys: its ``keys``, then a per-layer and whole-model :class:`Key` for
    each name of its ``metrics`` that ``keys`` leaves out (whole-model only for a name holding
    ``/``, such as ``"acc/train"``: it is the record key itself)."""
    keys = tuple(getattr(lens, "keys", ()))
    names = {k.name for k in keys}
    return keys + tuple(
        Key(m, per_layer="/" not in m) for m in getattr(lens, "metrics", ()) if m not in names
    )


def _whole(name: str, doc: str, scale: str = "linear") -> Key:
    return Key(name, doc, per_layer=False, scale=scale)


MONITOR = (
    _whole("step", "optimizer steps seen so far"),
    _whole("time", "Unix time of the record, in seconds"),
    _whole(
        "nonfinite_steps",
        "steps read so far whose gradients held NaN or Inf (skipped by every running statistic)",
    ),
)
UPDATE_EVERY = _whole("update_every", "the lenses read every k-th step (overhead_budget=)")
PROBE_TIME = _whole("probe_time_fraction", "probe time so far over wall time since attaching")
PHASE = Key("phase", "the phase detector's phase: warmup, drift or diffusion", scale="text")


def _entry(source: str, key: Key, layers: Iterable[str]) -> dict[str, Any]:
    return {
        "source": source,
        "doc": key.doc,
        "scale": key.scale,
        "whole": key.whole,
        "layers": [n for n in layers if n] if key.per_layer else [],
    }


def run_schema(monitor: Any) -> dict[str, dict[str, Any]]:
    """The schema of a monitor's records (see the module docstring), as its header carries it.

    Written with the header, before the first record: lenses that choose their layers at the
    first steps (the per-sample engine's coverage) have chosen them by then.
    """
    view = monitor.view
    out = {k.name: _entry("monitor", k, ()) for k in MONITOR}
    if getattr(getattr(monitor, "sampler", None), "budget", None) is not None:
        out[UPDATE_EVERY.name] = _entry("monitor", UPDATE_EVERY, ())
    for lens in monitor.lenses:
        logged = getattr(lens, "logged", None)
        keys, layers = logged(view) if callable(logged) else (declared(lens), view.layers)
        out.update({k.name: _entry(type(lens).__name__, k, layers) for k in keys})
    probes = getattr(monitor, "probes", None)
    if probes is not None:
        out[PROBE_TIME.name] = _entry("monitor", PROBE_TIME, ())
        for probe in probes.probes:
            source = f"probe {probe.name}"
            out.update({k.name: _entry(source, k, ()) for k in getattr(probe, "keys", ())})
    detector = getattr(monitor, "detector", None)
    if detector is not None:
        signal = out.get(detector.signal, {})
        out[PHASE.name] = _entry("PhaseDetector", PHASE, signal.get("layers", ()))
    for name in monitor.tally.observed_names if hasattr(monitor, "tally") else ():
        doc = f"the mean of observe({name}=...) since the last record"
        out.setdefault(name, _entry("observe", _whole(name, doc), ()))
    return out


def key_index(header: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
    """``{record key: (metric, layer)}`` from a header's schema (layer ``""``: the whole model);
    empty for a run without one (entries that are not of the schema's form are skipped).

    Example:
        >>> key_index({"schema": {"g": {"whole": True, "layers": ["a/b"]}}})
        {'g': ('g', ''), 'g/a/b': ('g', 'a/b')}
    """
    schema = header.get("schema") if isinstance(header, Mapping) else None
    out: dict[str, tuple[str, str]] = {}
    for metric, entry in schema.items() if isinstance(schema, Mapping) else ():
        if not isinstance(entry, Mapping):
            continue
        if entry.get("whole"):
            out[metric] = (metric, "")
        layers = entry.get("layers")
        for layer in layers if isinstance(layers, list) else ():
            if isinstance(layer, str) and layer:
                out[f"{metric}/{layer}"] = (metric, layer)
    return out


def split_key(key: str, index: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """``(metric, layer)`` of a record key: from the schema's index when it lists the key, else
    split at the first ``/`` (a file without a schema, or an undeclared key).

    Example:
        >>> split_key("grad_snr/fc1", {})
        ('grad_snr', 'fc1')
        >>> split_key("barrier/init", {"barrier/init": ("barrier/init", "")})
        ('barrier/init', '')
    """
    hit = index.get(key)
    if hit is not None:
        return hit
    metric, _, layer = key.partition("/")
    return metric, layer


def scale_of(header: Mapping[str, Any] | None, metric: str) -> str:
    """A metric's declared scale (see :data:`SCALES`); without a schema entry, ``"snr"`` for
    ``grad_snr`` and ``batch_snr`` and ``"log"`` for the rest, as before schemas."""
    schema = header.get("schema") if isinstance(header, Mapping) else None
    entry = schema.get(metric) if isinstance(schema, Mapping) else None
    if isinstance(entry, Mapping) and entry.get("scale") in SCALES:
        return str(entry["scale"])
    return "snr" if metric in ("grad_snr", "batch_snr") else "log"
