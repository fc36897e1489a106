"""Text views of a recorded run: phases, transitions, last values, a summary, a comparison.

Everything here reads the flat records of a run (see :mod:`sgdlens.records`) and needs no
matplotlib; :mod:`sgdlens.plot` draws the figures and :mod:`sgdlens.report` the HTML page.
``sgdlens summary`` and ``sgdlens compare`` (without ``-o``) print these.

Example:
    >>> from sgdlens.records import History
    >>> run = History([
    ...     {"step": s, "grad_snr/fc1": 3.0 if s < 30 else 0.3, "phase": p, "phase/fc1": p}
    ...     for s, p in [(10, "warmup"), (20, "drift"), (30, "drift"), (40, "diffusion")]
    ... ])
    >>> phase_spans(run)
    [(10.0, 20.0, 'warmup'), (20.0, 40.0, 'drift'), (40.0, 40.0, 'diffusion')]
    >>> transitions(run)["fc1"]
    [(20, 'warmup', 'drift'), (40, 'drift', 'diffusion')]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from sgdlens.records import History, Record

__all__ = [
    "LAYER_METRICS",
    "MODEL_METRICS",
    "compare_text",
    "last_value",
    "layers",
    "phase_spans",
    "spikes",
    "summary",
    "transitions",
]

#: Per-layer metrics, in the order a summary shows them.
LAYER_METRICS = (
    "grad_snr",
    "grad_mean",
    "grad_std",
    "noise_scale",
    "weight_norm",
    "weight_dist",
    "update_ratio",
    "grad_norm",
)
#: Whole-model metrics a summary shows when present.
MODEL_METRICS = (
    "loss",
    "grad_snr",
    "grad_mean",
    "grad_std",
    "noise_scale",
    "weight_norm",
    "weight_dist",
    "sharpness",
    "eos_threshold",
    "eos_ratio",
    "nonfinite_steps",
)
_PHASES = ("warmup", "drift", "diffusion")


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def _steps(history: History) -> list[float]:
    return [float(s) if isinstance(s, (int, float)) else math.nan for s in history.column("step")]


def layers(history: History) -> list[str]:
    """Layer names of a run: every ``<metric>/<layer>`` of the known per-layer metrics and
    ``phase/<layer>``, in order of first appearance (keys read as :meth:`History.split` does:
    by the run's schema when it has one).

    Example:
        >>> layers(History([{"step": 1, "grad_snr/fc1": 1.0, "weight_norm/fc2": 2.0}]))
        ['fc1', 'fc2']
    """
    seen: dict[str, None] = {}
    keys = history.keys()
    metrics = (*LAYER_METRICS, "phase", "update_size", "batch_over_noise_scale")
    for k in keys:
        metric, layer = history.split(k)
        if layer and metric in metrics:
            seen.setdefault(layer, None)
    return list(seen)


def last_value(history: History, key: str) -> float | None:
    """The last finite value of a numeric column, or ``None``.

    Example:
        >>> last_value(History([{"step": 1, "loss": 2.0}, {"step": 2}]), "loss")
        2.0
    """
    for r in reversed(history.records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def phase_spans(history: History, key: str = "phase") -> list[tuple[float, float, str]]:
    """Spans of constant phase from a phase column, as ``(start_step, end_step, phase)``.

    A span starts at the first record in its phase and ends at the first record of the next
    phase (the last span ends at the last record). Records without the key are skipped.

    Args:
        history: the run.
        key: ``"phase"`` (whole model) or ``"phase/<layer>"``.

    Returns:
        The spans in order; empty when no record carries ``key``.
    """
    spans: list[tuple[float, float, str]] = []
    current: str | None = None
    start = math.nan
    last = math.nan
    for step, value in zip(_steps(history), history.column(key)):
        if not isinstance(value, str) or not math.isfinite(step):
            continue
        if value != current:
            if current is not None:
                spans.append((start, step, current))
            current, start = value, step
        last = step
    if current is not None:
        spans.append((start, last, current))
    return spans


def transitions(history: History) -> dict[str, list[tuple[int, str, str]]]:
    """Phase changes per layer (``""`` for the whole model) as ``(step, old, new)``.

    Taken from the run's phase events when it has any, else derived from the ``phase`` and
    ``phase/<layer>`` columns. Loss spikes are not phase changes (see :func:`spikes`).
    """
    out: dict[str, list[tuple[int, str, str]]] = {}
    events = [e for e in history.events if e.get("event") in _PHASES]
    if events:
        for e in events:
            step = e.get("step")
            out.setdefault(str(e.get("layer", "")), []).append(
                (
                    int(step) if isinstance(step, (int, float)) else -1,
                    str(e.get("old", "")),
                    str(e["event"]),
                )
            )
        return out
    keys = [("", "phase")] + [(layer, f"phase/{layer}") for layer in layers(history)]
    for layer, key in keys:
        spans = phase_spans(history, key)
        for (_, _, old), (start, _, new) in itertools.pairwise(spans):
            out.setdefault(layer, []).append((int(start), old, new))
    return out


def spikes(history: History) -> list[Record]:
    """The run's loss-spike event records."""
    return [e for e in history.events if e.get("event") == "spike"]


def _fmt(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, list):
        return f"[{len(v)} values]"
    return str(v)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _layer_rows(history: History) -> tuple[list[str], list[list[str]]]:
    names = layers(history)
    trans = transitions(history)
    metrics = [m for m in LAYER_METRICS if any(f"{m}/{n}" in history for n in names)]
    header = ["layer", "phase", "transitions", *metrics]
    rows = []
    for n in [*names, ""]:
        phase = _last_str(history, f"phase/{n}" if n else "phase")
        steps = ", ".join(f"{new} @ {step}" for step, _, new in trans.get(n, [])) or "-"
        values = [_fmt(last_value(history, f"{m}/{n}" if n else m)) for m in metrics]
        rows.append([n or "(model)", phase or "-", steps, *values])
    return header, rows


def _last_str(history: History, key: str) -> str | None:
    for r in reversed(history.records):
        v = r.get(key)
        if isinstance(v, str):
            return v
    return None


def _run_facts(history: History) -> list[tuple[str, str]]:
    steps = [s for s in _steps(history) if math.isfinite(s)]
    times = [float(t) for t in history.column("time") if isinstance(t, (int, float))]
    facts = [
        ("records", str(len(history))),
        ("steps", f"{int(min(steps))} to {int(max(steps))}" if steps else "-"),
        ("layers", str(len(layers(history)))),
        ("phase (whole model)", _last_str(history, "phase") or "-"),
        ("phase events", str(sum(len(v) for v in transitions(history).values()))),
        ("loss spikes", str(len(spikes(history)))),
    ]
    if len(times) > 1:
        facts.append(("duration", f"{max(times) - min(times):.1f} s"))
    for m in MODEL_METRICS:
        v = last_value(history, m)
        if v is not None:
            facts.append((f"last {m}", _fmt(v)))
    first_loss = next(
        (float(v) for v in history.column("loss") if isinstance(v, (int, float))), None
    )
    if first_loss is not None:
        facts.append(("first loss", _fmt(first_loss)))
    return facts


def summary(history: History, *, name: str = "") -> str:
    """A plain-text summary of a run: facts, then one row per layer.

    Rows give each layer's current phase, its transitions (``new @ step``) and the last value
    of every per-layer metric the run records; the last row, ``(model)``, is the whole model.

    Args:
        history: the run.
        name: a title line (e.g. the file name).

    Example:
        >>> print(summary(History([{"step": 5, "grad_snr/fc1": 2.0, "phase/fc1": "drift"}])))
        ... # doctest: +NORMALIZE_WHITESPACE
        records: 1 | steps: 5 to 5 | layers: 1 | phase (whole model): - | phase events: 0 |
        loss spikes: 0
        <BLANKLINE>
        layer    phase  transitions  grad_snr
        -------  -----  -----------  --------
        fc1      drift  -            2
        (model)  -      -            -
    """
    facts = _run_facts(history)
    out = [name] if name else []
    line: list[str] = []
    for k, v in facts:
        line.append(f"{k}: {v}")
    # wrap the facts at ~100 columns
    buf = ""
    for item in line:
        piece = item if not buf else f" | {item}"
        if buf and len(buf) + len(piece) > 100:
            out.append(buf + " |")
            buf = item
        else:
            buf += piece
    if buf:
        out.append(buf)
    header, rows = _layer_rows(history)
    out += ["", _table([header, *rows])]
    sp = spikes(history)
    if sp:
        out += ["", "loss spikes at steps " + ", ".join(_fmt(e.get("step")) for e in sp)]
    return "\n".join(out)


def compare_text(a: History, b: History, *, labels: Sequence[str] = ("A", "B")) -> str:
    """Two runs side by side: per layer, the final phase, the transitions and the last SNR.

    Example:
        >>> a = History([{"step": 1, "grad_snr/fc1": 2.0, "phase/fc1": "drift"}])
        >>> b = History([{"step": 1, "grad_snr/fc1": 0.5, "phase/fc1": "diffusion"}])
        >>> print(compare_text(a, b).splitlines()[2])
        fc1      drift    -          2      diffusion  -          0.5
    """
    la, lb = labels
    names = list(dict.fromkeys([*layers(a), *layers(b)]))
    ta, tb = transitions(a), transitions(b)
    header = [
        "layer",
        f"phase {la}",
        f"changes {la}",
        f"snr {la}",
        f"phase {lb}",
        f"changes {lb}",
        f"snr {lb}",
    ]
    rows = [header]
    for n in [*names, ""]:
        row = [n or "(model)"]
        for h, t in ((a, ta), (b, tb)):
            row += [
                _last_str(h, f"phase/{n}" if n else "phase") or "-",
                ", ".join(f"{new}@{s}" for s, _, new in t.get(n, [])) or "-",
                _fmt(last_value(h, f"grad_snr/{n}" if n else "grad_snr")),
            ]
        rows.append(row)
    out = [_table(rows), ""]
    for key in MODEL_METRICS:
        va, vb = last_value(a, key), last_value(b, key)
        if va is not None or vb is not None:
            out.append(f"last {key}: {la} {_fmt(va)}   {lb} {_fmt(vb)}")
    return "\n".join(out)


def _event_rows(history: History) -> tuple[list[str], list[list[str]]]:
    evidence: dict[str, None] = {}
    for e in history.events:
        for k in e:
            if k.startswith("evidence/"):
                evidence.setdefault(k, None)
    ev_keys = list(evidence)
    header = ["step", "layer", "event", "from", *[k.split("/", 1)[1] for k in ev_keys]]
    rows = []
    for e in history.events:
        rows.append(
            [
                _fmt(e.get("step")),
                str(e.get("layer", "")) or "(model)",
                str(e.get("event", "")),
                str(e.get("old", "")) or "-",
                *[_fmt(e.get(k)) for k in ev_keys],
            ]
        )
    return header, rows
