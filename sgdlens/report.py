"""Reports on a recorded run: a self-contained HTML page, a terminal summary, a comparison.

Everything here reads the flat records of a run (see :mod:`sgdlens.records`); the HTML report
and the figures need matplotlib (``pip install "sgdlens[plot]"``), imported only when a figure
is drawn, so :func:`summary` and the helpers below work without it.

The command line wraps these functions::

    sgdlens report runs/exp1.jsonl -o report.html
    sgdlens summary runs/exp1.jsonl
    sgdlens compare runs/a.jsonl runs/b.jsonl -o compare.png

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

import base64
import html
import io
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sgdlens.records import History, Record, group_runs, read_records, select_run

__all__ = [
    "RunError",
    "compare_html",
    "compare_text",
    "figures",
    "last_value",
    "layers",
    "phase_spans",
    "read_run",
    "report_html",
    "split_runs",
    "summary",
    "transitions",
    "write_report",
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


class RunError(ValueError):
    """A file that is not a usable sgdlens run; the message is meant for the user."""


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


def split_runs(history: History) -> list[History]:
    """Split a history into runs where ``step`` stops increasing.

    ``sgdlens demo`` and :class:`~sgdlens.sinks.JSONLSink` append to a file, so one file can
    hold several runs one after the other. A new run starts at every record whose ``step`` is
    not larger than the one before. Event records go to the last run that had started by the
    event's ``time`` (events come after the record of their log point).

    Args:
        history: the records of one file.

    Returns:
        One :class:`History` per run, in file order (one, for a single run; none, if the
        history holds no metric records).

    Example:
        >>> h = History([{"step": 1}, {"step": 2}, {"step": 1}, {"step": 3}])
        >>> [len(r) for r in split_runs(h)]
        [2, 2]
    """
    starts: list[int] = []
    prev: float | None = None
    for i, r in enumerate(history.records):
        step = r.get("step")
        s = float(step) if isinstance(step, (int, float)) else math.nan
        if prev is None or not s > prev:
            starts.append(i)
        prev = s
    if len(starts) <= 1:
        return [history] if history.records else []
    bounds = [*starts, len(history.records)]
    runs = [History(history.records[a:b]) for a, b in itertools.pairwise(bounds)]
    start_times = []
    for run in runs:
        t = run.records[0].get("time")
        start_times.append(float(t) if isinstance(t, (int, float)) else -math.inf)
    for event in history.events:
        t = event.get("time")
        te = float(t) if isinstance(t, (int, float)) else math.inf
        k = max((i for i, t0 in enumerate(start_times) if t0 <= te), default=0)
        runs[k].events.append(dict(event))
    return runs


def read_run(path: str | os.PathLike[str], *, run: int | str = -1) -> tuple[History, list[str]]:
    """Load one run of a JSONL file for reporting, with user-facing checks.

    Args:
        path: the JSONL file (as written by :class:`~sgdlens.sinks.JSONLSink`).
        run: which run of the file (see :func:`sgdlens.runs`): 0-based, negative from the end,
            or a run id; the last one by default.

    Returns:
        ``(history, notes)``: the run and notes worth telling the user (skipped torn lines,
        other runs in the file).

    Raises:
        RunError: the file is missing, unreadable, not UTF-8 text, not JSON lines, holds no
            sgdlens records (objects with a numeric ``"step"``), or has no run ``run``.

    Example:
        >>> history, notes = read_run("runs/exp1.jsonl")  # doctest: +SKIP
    """
    name = os.fspath(path)
    try:
        items, notes = read_records(name)
    except FileNotFoundError:
        raise RunError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RunError(f"{name}: is a directory, not a JSONL run file") from None
    except OSError as e:
        raise RunError(f"{name}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise RunError(
            f"{e}; not a JSONL run of sgdlens records (one JSON object per line, as "
            f"sgdlens.sinks.JSONLSink writes them)"
        ) from None
    if not items and not notes:
        raise RunError(f"{name}: the file is empty; no records to report")
    metric = [r for r in items if "event" not in r and "header" not in r]
    bad = [r for r in metric if not isinstance(r.get("step"), (int, float))]
    if not metric:
        raise RunError(f"{name}: holds no metric records (only a truncated line or events)")
    if bad:
        raise RunError(
            f"{name}: not a run of sgdlens records: {len(bad)} of {len(metric)} JSON "
            f"objects lack a numeric 'step' (first: {_short(bad[0])})"
        )
    histories = group_runs(items)
    try:
        history = select_run(histories, run, name)
    except (TypeError, ValueError) as e:
        raise RunError(str(e).replace("run=", "--run ")) from None
    if len(histories) > 1:
        index = histories.index(history)
        notes.append(
            f"{name}: holds {len(histories)} runs; showing run {index} "
            f"({index + 1} of {len(histories)}, {len(history)} records); choose with --run "
            f"(list them with sgdlens runs {name})"
        )
    history.notes = notes
    return history, notes


def _short(record: Mapping[str, Any], n: int = 80) -> str:
    text = json.dumps(record, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Pure views of a run
# --------------------------------------------------------------------------------------------


def _steps(history: History) -> list[float]:
    return [float(s) if isinstance(s, (int, float)) else math.nan for s in history.column("step")]


def layers(history: History) -> list[str]:
    """Layer names of a run: every ``<metric>/<layer>`` of the known per-layer metrics and
    ``phase/<layer>``, in order of first appearance.

    Example:
        >>> layers(History([{"step": 1, "grad_snr/fc1": 1.0, "weight_norm/fc2": 2.0}]))
        ['fc1', 'fc2']
    """
    seen: dict[str, None] = {}
    keys = history.keys()
    metrics = (*LAYER_METRICS, "phase", "update_size", "batch_over_noise_scale")
    for k in keys:
        metric, sep, layer = k.partition("/")
        if sep and metric in metrics:
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


# --------------------------------------------------------------------------------------------
# Figures and HTML
# --------------------------------------------------------------------------------------------

#: (id, function name in sgdlens.plot, title, caption), in report order.
FIGURES: tuple[tuple[str, str, str, str], ...] = (
    (
        "gradients",
        "gradient_stats",
        "Gradient mean and noise per layer",
        "Shwartz-Ziv & Tishby's figure: per layer, the norm of the mean minibatch gradient "
        "(solid) and its standard deviation (dashed) over the SNR window, on log axes. Drift: "
        "mean above noise; diffusion (shaded, whole model): noise above mean. Triangles mark "
        "each layer's phase changes.",
    ),
    (
        "snr",
        "snr",
        "Gradient SNR",
        "Per-layer and whole-model gradient SNR (mean/std); SNR = 1 is the drift/diffusion "
        "boundary.",
    ),
    ("loss", "loss", "Loss", "Training loss at log points; crosses mark loss spikes."),
    (
        "noise_scale",
        "noise_scale",
        "Gradient noise scale",
        "McCandlish's B_simple = tr Σ / |G|², per layer and for the whole model; above the "
        "batch size, noise dominates the step.",
    ),
    (
        "weights",
        "weights",
        "Weights",
        "Weight norms, distance from initialisation (slope 1 on log axes: ballistic drift; "
        "1/2: a random walk) and update-to-weight ratio.",
    ),
    (
        "sharpness",
        "sharpness",
        "Sharpness",
        "Top Hessian eigenvalue against the edge-of-stability threshold (2/η for plain GD).",
    ),
)


def _plot_module() -> Any:
    try:
        from sgdlens import plot
    except ImportError as e:
        raise ImportError(
            f'sgdlens reports need matplotlib: pip install "sgdlens[plot]" ({e})'
        ) from e
    return plot


def figures(history: History) -> list[tuple[str, str, str, Any]]:
    """Every figure the run's records support, as ``(id, title, caption, Figure)``.

    The phase timeline comes first when the run carries phase columns. Needs matplotlib.
    """
    plot = _plot_module()
    out: list[tuple[str, str, str, Any]] = []
    keys = history.keys()
    if any(k == "phase" or k.startswith("phase/") for k in keys):
        out.append(
            (
                "timeline",
                "Phase timeline",
                "Phase of each layer and of the whole model over steps (log scale).",
                plot.phase_timeline(history),
            )
        )
    supported = plot.available(history)
    for fid, func, title, caption in FIGURES:
        if func in supported:
            out.append((fid, title, caption, getattr(plot, func)(history)))
    return out


def _png(fig: Any, dpi: int = 96) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:0 16px 32px;color:#222}
h1{font-size:1.5em;margin:16px 0 4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;
padding-bottom:2px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555;max-width:900px}
.facts td:first-child{color:#555}.note{color:#8a5a00}
.ph-drift{background:#fde7d3}.ph-diffusion{background:#dbe6f3}.ph-warmup{background:#eee}
.grid{display:flex;flex-wrap:wrap;gap:16px}.grid figure{flex:1 1 540px}
""".strip()


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for c in r:
            klass = f' class="ph-{c}"' if c in _PHASES else ""
            if not klass and _is_number(c):
                klass = ' class="num"'
            cells.append(f"<td{klass}>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


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


def _figure_html(fid: str, title: str, caption: str, fig: Any) -> str:
    data = _png(fig)
    _close(fig)
    return (
        f'<figure id="fig-{_e(fid)}"><img alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}"><figcaption><b>{_e(title)}.</b> '
        f"{_e(caption)}</figcaption></figure>"
    )


def _close(fig: Any) -> None:
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # pragma: no cover - figures from sgdlens.plot are not in pyplot
        pass


def report_html(
    history: History, *, title: str = "sgdlens report", notes: Sequence[str] = ()
) -> str:
    """One self-contained HTML page for a run: summary, phase timeline, figures, events.

    Figures are embedded as base64 PNG (``data:`` URIs); the page loads nothing from the
    network. Sections (``<section id=...>``): ``summary``, ``timeline`` (the timeline figure
    and the transition table, when the run has phases), ``figures``, ``layers`` (last values
    per layer) and ``events`` (one table row per event record). Needs matplotlib.

    Args:
        history: the run.
        title: the page title.
        notes: lines shown under the title (e.g. from :func:`read_run`).

    Example:
        >>> from sgdlens.report import read_run, report_html
        >>> history, notes = read_run("runs/demo.jsonl")  # doctest: +SKIP
        >>> page = report_html(history, title="demo", notes=notes)  # doctest: +SKIP
    """
    from sgdlens import __version__

    figs = figures(history)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        *[f'<p class="note">{_e(n)}</p>' for n in notes],
        "</header>",
        '<section id="summary"><h2>Run summary</h2>',
        _html_table(["quantity", "value"], [[k, v] for k, v in _run_facts(history)], "facts"),
        "</section>",
    ]
    timeline = [f for f in figs if f[0] == "timeline"]
    rest = [f for f in figs if f[0] != "timeline"]
    # The paper's figure goes first, beside the timeline, so it shows without scrolling.
    first = [f for f in rest if f[0] == "gradients"]
    rest = [f for f in rest if f[0] != "gradients"]
    if timeline or first:
        trans = transitions(history)
        rows = [
            [layer or "(model)", old, new, str(step)]
            for layer, ts in trans.items()
            for step, old, new in ts
        ]
        parts += [
            '<section id="timeline"><h2>Phase timeline</h2><div class="grid">',
            *[_figure_html(*f) for f in first + timeline],
            "</div>",
            _html_table(["layer", "from", "to", "step"], rows, "transitions")
            if rows
            else "<p>No phase changes recorded.</p>",
            "</section>",
        ]
    parts += ['<section id="figures"><h2>Figures</h2><div class="grid">']
    parts += [_figure_html(*f) for f in rest] or ["<p>No other metrics to plot.</p>"]
    parts += ["</div></section>"]
    header, rows = _layer_rows(history)
    parts += [
        '<section id="layers"><h2>Last values per layer</h2>',
        _html_table(header, rows, "layers"),
        "</section>",
    ]
    eh, er = _event_rows(history)
    parts += ['<section id="events"><h2>Events</h2>']
    parts += [_html_table(eh, er, "events")] if er else ["<p>No events recorded.</p>"]
    parts += [
        "</section>",
        f"<footer><p>Generated by sgdlens {_e(__version__)}.</p></footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    run: History | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> str:
    """Write the HTML report of a run (a :class:`History` or a JSONL path) to ``out``.

    Returns:
        The path written.

    Example:
        >>> write_report("runs/demo.jsonl", "report.html")  # doctest: +SKIP
        'report.html'
    """
    notes: list[str] = []
    if isinstance(run, History):
        history = run
    else:
        history, notes = read_run(run)
        title = title or f"sgdlens report: {os.path.basename(os.fspath(run))}"
    page = report_html(history, title=title or "sgdlens report", notes=notes)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return os.fspath(out)


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


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


def compare_html(
    a: History, b: History, *, labels: Sequence[str] = ("A", "B"), title: str = "sgdlens compare"
) -> str:
    """A self-contained HTML page overlaying two runs (figure and table). Needs matplotlib."""
    plot = _plot_module()
    fig = plot.compare([a, b], labels=labels)
    table = compare_text(a, b, labels=labels)
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en"><head><meta charset="utf-8">',
                f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
                f"<header><h1>{_e(title)}</h1></header>",
                '<section id="figures"><h2>Overlay</h2>',
                _figure_html(
                    "compare", "Runs overlaid", f"{labels[0]} solid, {labels[1]} dashed.", fig
                ),
                "</section>",
                f'<section id="table"><h2>Side by side</h2><pre>{_e(table)}</pre></section>',
                "</body></html>",
            ]
        )
        + "\n"
    )
