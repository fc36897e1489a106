"""The ``sgdlens`` command line: ``sgdlens demo | runs | report | summary | compare``.

``runs``, ``report``, ``summary`` and ``compare`` read JSONL runs. A file that is missing,
empty, not UTF-8 text or not JSON lines gives one line on stderr and exit status 1 (a torn
record, as a crash leaves it, is skipped with a note); bad arguments give status 2. A file
holding several runs is read one run at a time: ``--run`` takes an index (0-based, negative
from the end) or a run id, as ``sgdlens runs FILE`` lists them. No command writes over a file
it reads. Text from the file reaches the terminal with control characters escaped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _run_choice(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sgdlens", description="See where your optimizer is.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train Shwartz-Ziv & Tishby's network on their 12-bit task and print per-layer SNR",
        description=(
            "Train the 12-10-7-5-4-3-2 tanh network on the 12-bit task (generated in code) and "
            "print the per-layer gradient SNR (one-epoch windows) as it trains."
        ),
    )
    demo.add_argument("--epochs", type=_positive_int, default=800)
    demo.add_argument("--batch-size", type=_positive_int, default=512)
    demo.add_argument("--lr", type=_positive_float, default=4e-4)
    demo.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--log-epochs", type=_positive_int, default=10, help="epochs per record")
    demo.add_argument("--print-every", type=_positive_int, default=4, help="records per line")
    demo.add_argument(
        "--out",
        default=None,
        help="JSONL file for the run (default: runs/demo-<run id>.jsonl, a new file)",
    )

    run_help = "which run of the file: index (0-based, negative from the end) or run id; default -1"
    runs = sub.add_parser("runs", help="list the runs in a file with their headers")
    runs.add_argument("run", metavar="RUN.jsonl", help="a JSONL file")
    report = sub.add_parser(
        "report",
        help="write one self-contained HTML report of a run (needs matplotlib)",
        description=(
            "Write a self-contained HTML file (figures embedded, no network) with the run "
            "summary, the phase timeline, every figure the records support and the events."
        ),
    )
    report.add_argument("run", metavar="RUN.jsonl", help="a JSONL run (JSONLSink, sgdlens demo)")
    report.add_argument("-o", "--out", default=None, help="HTML file (default: RUN.html)")
    report.add_argument("--title", default=None, help="page title")
    report.add_argument("--run", dest="index", type=_run_choice, default=-1, help=run_help)

    summary = sub.add_parser(
        "summary",
        help="print a table of a run: phase per layer, transition steps, last values",
    )
    summary.add_argument("run", metavar="RUN.jsonl", help="a JSONL run")
    summary.add_argument("--run", dest="index", type=_run_choice, default=-1, help=run_help)

    compare = sub.add_parser(
        "compare",
        help="overlay two runs (a figure or HTML page with -o, else a text table)",
        description=(
            "Compare two runs: without -o print the phases, transitions and last values side "
            "by side; with -o write the runs overlaid, as an image (.png, .svg, .pdf) or a "
            "self-contained HTML page (.html). Figures need matplotlib."
        ),
    )
    compare.add_argument("a", metavar="A.jsonl")
    compare.add_argument("b", metavar="B.jsonl")
    compare.add_argument("-o", "--out", default=None, help="out.png | out.svg | out.pdf | out.html")
    compare.add_argument("--labels", nargs=2, default=None, metavar=("LA", "LB"))
    compare.add_argument(
        "--run",
        dest="index",
        type=_run_choice,
        nargs="+",
        default=[-1],
        metavar="RUN",
        help="the run of A and of B (one value: the same for both); " + run_help,
    )
    return ap


_FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


def _error(command: str, message: str) -> int:
    print(f"sgdlens {command}: error: {safe_text(message)}", file=sys.stderr)
    return 1


def _notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {safe_text(note)}", file=sys.stderr)


def safe_text(text: str) -> str:
    r"""``text`` with control characters (terminal escapes) spelled out; newlines and tabs kept.

    Example:
        >>> print(safe_text("fc1\x1b[2J"))
        fc1\x1b[2J
    """
    return "".join(
        c if c in "\n\t" or (c.isprintable() and not 0x7F <= ord(c) <= 0x9F) else repr(c)[1:-1]
        for c in text
    )


def _same_file(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_out(command: str, out: str, inputs: Sequence[str]) -> None:
    for path in inputs:
        if _same_file(out, path):
            raise _Refused(
                command,
                f"the output {out} is the input {path}; it would be overwritten: pass another "
                f"file with -o",
            )


class _Refused(Exception):
    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command


def _runs(args: argparse.Namespace) -> int:
    from sgdlens import reading
    from sgdlens import summary as text
    from sgdlens.records import runs

    reading.read_run(args.run)  # the user-facing checks
    rows = [["index", "run", "records", "steps", "optimizer", "model", "started"]]
    for r in runs(args.run):
        h = r["header"] or {}
        started = h.get("started", "")
        rows.append(
            [
                str(r["index"]),
                str(r["run"] or "(no header)"),
                str(r["records"]),
                f"{r['first_step']} to {r['last_step']}",
                str(h.get("optimizer", "-")),
                str(h.get("model", "-")),
                str(started or "-"),
            ]
        )
    print(safe_text(text._table(rows)))
    return 0


def _report(args: argparse.Namespace) -> int:
    import os

    from sgdlens import reading, report

    history, notes = reading.read_run(args.run, run=args.index)
    _notes(notes)
    out = args.out or os.path.splitext(args.run)[0] + ".html"
    _check_out("report", out, [args.run])
    title = args.title or f"sgdlens report: {os.path.basename(args.run)}"
    page = report.report_html(history, title=title, notes=notes)
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        return _error("report", f"cannot write {out}: {e.strerror or e}")
    print(f"wrote {out} ({len(history)} records, {len(history.events)} events)")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from sgdlens import reading
    from sgdlens import summary as text

    history, notes = reading.read_run(args.run, run=args.index)
    _notes(notes)
    print(safe_text(text.summary(history, name=args.run)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import os

    from sgdlens import reading, report
    from sgdlens import summary as text

    labels = args.labels or [os.path.basename(args.a), os.path.basename(args.b)]
    if labels[0] == labels[1]:
        labels = ["A", "B"]
    if len(args.index) > 2:
        return _error("compare", f"--run takes one or two values, got {len(args.index)}")
    run_a, run_b = (args.index * 2)[:2]
    a, notes_a = reading.read_run(args.a, run=run_a)
    b, notes_b = reading.read_run(args.b, run=run_b)
    _notes([*notes_a, *notes_b])
    if args.out is None:
        print(safe_text(text.compare_text(a, b, labels=labels)))
        return 0
    _check_out("compare", args.out, [args.a, args.b])
    suffix = os.path.splitext(args.out)[1].lower()
    try:
        if suffix == ".html":
            page = report.compare_html(
                a, b, labels=labels, title=f"sgdlens compare: {labels[0]} vs {labels[1]}"
            )
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(page)
        else:
            from sgdlens import plot

            plot.compare([a, b], labels=labels).savefig(args.out, dpi=110)
    except OSError as e:
        return _error("compare", f"cannot write {args.out}: {e.strerror or e}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad usage).

    Example:
        >>> main(["summary", "runs/demo.jsonl"])  # doctest: +SKIP
        0
    """
    ap = parser()
    args = ap.parse_args(argv)
    if args.command == "demo":
        from sgdlens import demo

        options = {k: v for k, v in vars(args).items() if k != "command"}
        return demo.main(**options)
    if args.command == "compare" and args.out is not None:
        import os

        suffix = os.path.splitext(args.out)[1].lower()
        if suffix not in (*_FIGURE_SUFFIXES, ".html"):
            ap.error(f"compare -o {args.out}: use a .png, .svg, .pdf or .html file")
    commands = {"runs": _runs, "report": _report, "summary": _summary, "compare": _compare}
    from sgdlens.reading import RunError

    try:
        return commands[args.command](args)
    except RunError as e:
        return _error(args.command, str(e))
    except _Refused as e:
        return _error(e.command, str(e))
    except ImportError as e:
        return _error(args.command, str(e))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
