"""Records: one flat ``{key: number}`` dict per log point, and reading a run back.

A record always holds ``step`` (optimizer steps seen so far) and ``time`` (Unix seconds), then
flat metric keys ``"<metric>/<layer>"`` per layer and ``"<metric>"`` for the whole model.
Values are plain Python numbers; non-finite values stay ``nan``/``inf``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

Value = int | float | str | list[float] | list[int]
Record = dict[str, Value]


class History:
    """The records of a run, in order, with columns by key.

    ``history["grad_snr/fc1"]`` is a float64 numpy array with one entry per record (``nan`` where
    that record lacks the key). ``history.records`` is the list of record dicts;
    ``history.events`` the event records (phase changes and loss spikes: those with an
    ``"event"`` key), kept apart so that metric columns stay evenly spaced.

    Example:
        >>> h = History([{"step": 1, "loss": 2.0}, {"step": 2}])
        >>> h["loss"].tolist()
        [2.0, nan]
    """

    def __init__(self, records: Iterable[Mapping[str, Value]] = ()) -> None:
        self.records: list[Record] = []
        self.events: list[Record] = []
        for r in records:
            self(r)

    def __call__(self, record: Mapping[str, Value]) -> None:
        (self.events if "event" in record else self.records).append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __contains__(self, key: object) -> bool:
        return any(key in r for r in self.records)

    def keys(self) -> list[str]:
        """Every key that any record holds, in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self:
            raise KeyError(f"no record holds {key!r}; keys are {self.keys()}")
        out = np.full(len(self.records), np.nan)
        for i, r in enumerate(self.records):
            v = r.get(key)
            if isinstance(v, (int, float)):
                out[i] = v
        return out

    def column(self, key: str) -> list[Value | None]:
        """One key's raw values (strings included), ``None`` where a record lacks it."""
        return [r.get(key) for r in self.records]

    def layers(self, metric: str) -> list[str]:
        """The layer names that ``"<metric>/<layer>"`` keys carry, in order of appearance."""
        prefix = metric + "/"
        return [k[len(prefix) :] for k in self.keys() if k.startswith(prefix)]

    def to_pandas(self) -> Any:
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("History.to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame.from_records(self.records)

    def __repr__(self) -> str:
        return f"History({len(self.records)} records, {len(self.keys())} keys)"


def to_json_line(record: Mapping[str, Value]) -> str:
    """One record as a JSON line. Non-finite floats are written as ``NaN``/``Infinity``."""
    return json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n"


def load(path: str | os.PathLike[str]) -> History:
    """Read a JSONL run back as a :class:`History`.

    Only JSON is parsed (nothing is unpickled). A truncated last line, as a crash mid-write
    leaves it, is skipped; a malformed line anywhere else raises ``ValueError`` naming the file
    and the line.

    Example:
        >>> import sgdlens
        >>> run = sgdlens.load("runs/exp1.jsonl")  # doctest: +SKIP
        >>> run["grad_snr"]  # doctest: +SKIP
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    history = History()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:  # a truncated final line: the writer died mid-record
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}, line {i + 1}: expected a JSON object, got {type(obj).__name__}"
            )
        history(obj)
    return history


def finite_or_none(x: float) -> float | None:
    """``x`` if finite, else ``None`` (for consumers that cannot take nan/inf)."""
    return x if math.isfinite(x) else None
