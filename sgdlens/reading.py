"""Reading runs for reports: one run of a JSONL file, with checks whose messages the user reads.

:func:`sgdlens.load` and :func:`sgdlens.runs` (in :mod:`sgdlens.records`) read files;
:func:`read_run` adds what the command line needs (a :class:`RunError` with one clear line for
each way a file can be unusable, and notes about skipped lines and other runs).
:func:`split_runs` splits an in-memory :class:`~sgdlens.records.History` into runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from sgdlens.records import History, group_runs, read_records, select_run

__all__ = ["RunError", "read_run", "split_runs"]


class RunError(ValueError):
    """A file that is not a usable sgdlens run; the message is meant for the user."""


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
