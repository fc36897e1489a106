"""The HTML report of a recorded run, and a page comparing two runs.

One self-contained page (figures embedded as PNG ``data:`` URIs, no script, nothing fetched)
from a run's records; needs matplotlib (``pip install "sgdlens[plot]"``), imported only when a
figure is drawn. The text views (:func:`summary`, :func:`transitions`, :func:`read_run`, …)
live in :mod:`sgdlens.summary` and are re-exported here.

The command line wraps these functions::

    sgdlens report runs/exp1.jsonl -o report.html
    sgdlens summary runs/exp1.jsonl
    sgdlens compare runs/a.jsonl runs/b.jsonl -o compare.png

Example:
    >>> from sgdlens.report import read_run, report_html
    >>> history, notes = read_run("runs/demo.jsonl")  # doctest: +SKIP
    >>> page = report_html(history, title="demo", notes=notes)  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

from sgdlens.reading import RunError, read_run, split_runs
from sgdlens.records import History
from sgdlens.summary import (
    _PHASES,
    LAYER_METRICS,
    MODEL_METRICS,
    _event_rows,
    _layer_rows,
    _run_facts,
    compare_text,
    last_value,
    layers,
    phase_spans,
    spikes,
    summary,
    transitions,
)

__all__ = [
    "LAYER_METRICS",
    "MODEL_METRICS",
    "RunError",
    "compare_html",
    "compare_text",
    "figures",
    "last_value",
    "layers",
    "phase_spans",
    "read_run",
    "report_html",
    "spikes",
    "split_runs",
    "summary",
    "transitions",
    "write_report",
]

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
    if "phase" in history or history.layers("phase"):
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
    per layer), ``keys`` (the run's record schema, when its header has one: what each key
    means, and the keys first written after the header, such as a name first observed late)
    and ``events`` (one table row per event record). Needs matplotlib.

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
    schema = (history.header or {}).get("schema")
    if isinstance(schema, dict):  # what each key means, as the run's lenses declared it
        rows = [
            [
                m,
                str(e.get("source", "")),
                str(e.get("doc", "")),
                _keys_text(m, e),
                str(e.get("scale", "")),
            ]
            for m, e in schema.items()
            if isinstance(e, dict)
        ]
        rows += [
            [
                k,
                "",
                "not in the run header: first written after it (an observe() name "
                "used only later in the run, or a key nobody declared)",
                k,
                "",
            ]
            for k in _undeclared(history, schema)
        ]
        parts += [
            '<section id="keys"><h2>Record keys</h2>',
            _html_table(["metric", "from", "meaning", "keys", "scale"], rows, "keys"),
            "</section>",
        ]
    parts += ['<section id="events"><h2>Events</h2>']
    parts += [_html_table(eh, er, "events")] if er else ["<p>No events recorded.</p>"]
    parts += [
        "</section>",
        f"<footer><p>Generated by sgdlens {_e(__version__)}.</p></footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _undeclared(history: History, schema: dict[str, Any]) -> list[str]:
    """Record keys the header's schema does not list (it is written with the first record)."""
    listed = set()
    for metric, entry in schema.items():
        if isinstance(entry, dict):
            listed.update([metric] if entry.get("whole") else [])
            layers = entry.get("layers")
            listed.update(f"{metric}/{layer}" for layer in (layers or []))
    seen = dict.fromkeys(k for r in history.records for k in r)
    return [k for k in seen if k not in listed and k not in ("step", "time", "run")]


def _keys_text(metric: str, entry: dict[str, Any]) -> str:
    layers = entry.get("layers") if isinstance(entry.get("layers"), list) else []
    whole = [metric] if entry.get("whole") else []
    return ", ".join(whole + ([f"{metric}/<layer> ({len(layers)} layers)"] if layers else []))


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
        if os.path.realpath(run) == os.path.realpath(out) or (
            os.path.exists(out) and os.path.samefile(run, out)
        ):
            raise ValueError(
                f"write_report(out={os.fspath(out)!r}) is the run it reads; it would be "
                f"overwritten: pass another file"
            )
        history, notes = read_run(run)
        title = title or f"sgdlens report: {os.path.basename(os.fspath(run))}"
    page = report_html(history, title=title or "sgdlens report", notes=notes)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return os.fspath(out)


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
