"""Records: one flat ``{key: number}`` dict per log point, and reading runs back.

A record always holds ``step`` (optimizer steps seen so far) and ``time`` (Unix seconds), then
flat metric keys ``"<metric>/<layer>"`` per layer and ``"<metric>"`` for the whole model; the
header's ``schema`` lists each metric and its exact keys (:mod:`sgdlens.schema`).
Values are plain Python numbers; non-finite values stay ``nan``/``inf`` in memory.

A run starts with a *header* record (a ``"header"`` key; see :mod:`sgdlens.header`) that says
what produced it: run id, optimizer and hyperparameters, model, versions. Event records (phase
changes and loss spikes) carry an ``"event"`` key. In a JSONL file written by
:class:`~sgdlens.sinks.JSONLSink` every line carries the run id under ``"run"``, so several
runs in one file (appended, or written at once by two monitors) are told apart on reading;
files from before run ids are split where ``step`` restarts.

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so
that strict JSON readers (``jq``, browsers) accept every line; :func:`load` turns them back
into floats (and still reads the bare ``NaN`` of older files).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from sgdlens._jsonl import parse_line, read_records, to_json_line
from sgdlens.schema import key_index, split_key

Value = int | float | str | list[Any] | dict[str, Any] | None
Record = dict[str, Value]

__all__ = [
    "History",
    "Record",
    "Value",
    "group_runs",
    "load",
    "parse_line",
    "read_records",
    "runs",
    "select_run",
    "to_json_line",
]


class History:
    """The records of a run, in order, with columns by key.

    ``history["grad_snr/fc1"]`` is a float64 numpy array with one entry per record (``nan`` where
    that record lacks the key). ``history.records`` is the list of record dicts;
    ``history.events`` the event records (phase changes and loss spikes: those with an
    ``"event"`` key), kept apart so that metric columns stay evenly spaced; ``history.header``
    the run's header record (``None`` for a run written before headers existed).

    ``max_records`` keeps only the last that many records (and events) in memory, for runs
    too long to hold whole; a sink such as :class:`~sgdlens.sinks.JSONLSink` still gets all.

    Example:
        >>> h = History([{"step": 1, "loss": 2.0}, {"step": 2}])
        >>> h["loss"].tolist()
        [2.0, nan]
    """

    def __init__(
        self, records: Iterable[Mapping[str, Value]] = (), *, max_records: int | None = None
    ) -> None:
        if max_records is not None and (
            isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1
        ):
            raise ValueError(
                f"History(max_records={max_records!r}) must be None (keep all) or an int >= 1"
            )
        self.max_records = max_records
        self.records: list[Record] = []
        self.events: list[Record] = []
        self.header: Record | None = None
        self.notes: list[str] = []  # what reading the file skipped, for the user
        self._keys: dict[str, None] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._seen = 0
        self._index: tuple[object, dict[str, tuple[str, str]]] = (None, {})
        for r in records:
            self(r)

    def __call__(self, record: Mapping[str, Value]) -> None:
        self._add(dict(record))

    def _add(self, record: Record) -> None:
        """Keep ``record`` itself (no copy: for records nobody else holds)."""
        if "header" in record:
            if self.header is None:
                self.header = record
        elif "event" in record:
            self.events.append(record)
            if self.max_records is not None and len(self.events) > self.max_records:
                del self.events[0]
        else:
            self._sync()
            self.records.append(record)
            self._keys.update(dict.fromkeys(record))
            if self.max_records is not None and len(self.records) > self.max_records:
                del self.records[0]
            self._seen = len(self.records)
            if self._columns:
                self._columns = {}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def _sync(self) -> None:
        # ``records`` is a public list: notice records added to (or removed from) it directly
        if self._seen != len(self.records):
            self._keys = {}
            for r in self.records:
                self._keys.update(dict.fromkeys(r))
            self._columns = {}
            self._seen = len(self.records)

    def __contains__(self, key: object) -> bool:
        self._sync()
        return key in self._keys

    def keys(self) -> list[str]:
        """Every key that any record holds, in order of first appearance."""
        self._sync()
        return list(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        self._sync()
        if key not in self._keys:
            raise KeyError(f"no record holds {key!r}; keys are {self.keys()}")
        col = self._columns.get(key)
        if col is None or len(col) != len(self.records):
            col = np.fromiter(
                (_float(r.get(key)) for r in self.records), dtype=float, count=len(self.records)
            )
            self._columns[key] = col
        return col.copy()

    def column(self, key: str) -> list[Value]:
        """One key's raw values (strings included), ``None`` where a record lacks it."""
        return [r.get(key) for r in self.records]

    def split(self, key: str) -> tuple[str, str]:
        """``(metric, layer)`` of a record key (layer ``""``: the whole model), looked up in the
        header's schema (:mod:`sgdlens.schema`) when it lists the key, else split at the first
        ``/`` (runs written before schemas, undeclared keys).

        Example:
            >>> History([{"step": 1}]).split("grad_snr/fc1")
            ('grad_snr', 'fc1')
        """
        if self._index[0] is not self.header:
            self._index = (self.header, key_index(self.header))
        return split_key(key, self._index[1])

    def layers(self, metric: str) -> list[str]:
        """The layer names that ``"<metric>/<layer>"`` keys carry, in order of appearance
        (see :meth:`split`)."""
        out = []
        for k in self.keys():
            m, layer = self.split(k)
            if m == metric and layer:
                out.append(layer)
        return out

    def to_pandas(self) -> Any:
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("History.to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame.from_records(self.records)

    def __repr__(self) -> str:
        run = f", run {self.header.get('run')!r}" if self.header else ""
        return f"History({len(self.records)} records, {len(self.keys())} keys{run})"


def _float(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def group_runs(items: Iterable[Record]) -> list[History]:
    """Records in file order as one :class:`History` per run (the dicts themselves become
    the runs' records, without their ``"run"`` key: pass dicts nobody else holds, as
    :func:`read_records` returns them).

    Records with a ``"run"`` id go to that run (two writers interleaving one file are told
    apart); records without one (files from before run ids) start a new run wherever ``step``
    does not increase, and their events follow the run being read. Runs holding no metric
    record are dropped.
    """
    runs: dict[object, History] = {}
    legacy: tuple[str, int] | None = None
    prev = math.nan
    for r in items:
        rid = r.get("run")
        if isinstance(rid, str):
            key: object = rid
            if "header" not in r:  # the id lives in the header; records read as written
                del r["run"]
        else:
            metric = "header" not in r and "event" not in r
            step = _float(r.get("step")) if metric else prev
            if legacy is None or (metric and not step > prev):  # the step count restarts
                legacy = ("legacy", len(runs))
            prev = step
            key = legacy
        run = runs.get(key)
        if run is None:
            run = runs[key] = History()
        run._add(r)
    return [h for h in runs.values() if h.records]


def select_run(histories: list[History], run: int | str, name: str) -> History:
    if isinstance(run, str):
        for h in histories:
            if h.header is not None and h.header.get("run") == run:
                return h
        ids = [h.header.get("run") for h in histories if h.header is not None]
        raise ValueError(f"{name}: no run with id {run!r}; the runs are {ids}")
    if isinstance(run, bool) or not isinstance(run, int):
        raise TypeError(f"load(run=...) must be an int index or a run id str, got {run!r}")
    if not -len(histories) <= run < len(histories):
        raise ValueError(
            f"{name}: holds {len(histories)} run(s); run={run} is out of range "
            f"(0 to {len(histories) - 1}, or negative from the end)"
        )
    return histories[run]


def load(path: str | os.PathLike[str], run: int | str = -1) -> History:
    """Read one run of a JSONL file back as a :class:`History`.

    Args:
        path: the file (as :class:`~sgdlens.sinks.JSONLSink` writes it).
        run: which run: an index into :func:`runs` (0-based, negative from the end; the last
            by default) or a run id.

    Returns:
        The run's records, events and header; ``history.notes`` says which torn lines were
        skipped.

    Raises:
        ValueError: a line that is not a JSON object, a file without records, an unknown run.

    Example:
        >>> import sgdlens
        >>> run = sgdlens.load("runs/exp1.jsonl")  # doctest: +SKIP
        >>> run["grad_snr"], run.header["optimizer"]  # doctest: +SKIP
    """
    name = os.fspath(path)
    items, notes = read_records(name)
    histories = group_runs(items)
    if not histories:
        raise ValueError(f"{name}: holds no metric records")
    history = select_run(histories, run, name)
    history.notes = notes
    return history


def runs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The runs in a JSONL file, in order, each with its header.

    Returns:
        One dict per run: ``index``, ``run`` (the id, ``None`` for a run without a header),
        ``header`` (the header record or ``None``), ``records``, ``events``, ``first_step``,
        ``last_step``. Pass ``index`` or ``run`` to :func:`load`.

    Example:
        >>> import sgdlens
        >>> [r["run"] for r in sgdlens.runs("runs/demo.jsonl")]  # doctest: +SKIP
        ['20261201-143423-5f2c', '20261201-150104-9a0e']
    """
    out = []
    for i, h in enumerate(group_runs(read_records(path)[0])):
        steps = [r.get("step") for r in h.records]
        out.append(
            {
                "index": i,
                "run": h.header.get("run") if h.header is not None else None,
                "header": h.header,
                "records": len(h.records),
                "events": len(h.events),
                "first_step": steps[0],
                "last_step": steps[-1],
            }
        )
    return out


def finite_or_none(x: float) -> float | None:
    """``x`` if finite, else ``None`` (for consumers that cannot take nan/inf)."""
    return x if math.isfinite(x) else None
