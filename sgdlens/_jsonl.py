"""The JSONL format of the records: one strict JSON object per line, written and read back.

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
(strict JSON readers accept every line) and turned back into floats on reading, which also
takes the bare ``NaN`` of older files. Reading streams the file, skips torn lines with a note
and never unpickles anything.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgdlens.records import Record, Value

#: Keys whose string values are text, never a spelled-out non-finite number.
TEXT_KEYS = frozenset({"event", "layer", "old", "run", "phase", "header"})
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# --------------------------------------------------------------------------------------------
# Writing and parsing lines
# --------------------------------------------------------------------------------------------


def _portable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, (list, tuple)):
        return [_portable(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _portable(x) for k, x in v.items()}
    return v


def to_json_line(record: Mapping[str, Value]) -> str:
    """One record as a strict JSON line; ``nan``/``inf`` become ``"NaN"``/``"Infinity"``.

    Example:
        >>> to_json_line({"step": 1, "loss": float("nan")})
        '{"step":1,"loss":"NaN"}\\n'
    """
    try:
        return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    except ValueError:  # a non-finite float somewhere: spell it out
        return json.dumps(_portable(record), allow_nan=False, separators=(",", ":")) + "\n"


def _revive(obj: dict[str, Any]) -> dict[str, Any]:
    """Turn spelled-out non-finite numbers back into floats (text keys left alone)."""
    for k, v in obj.items():
        if k in TEXT_KEYS or k.startswith("phase/"):
            continue
        if isinstance(v, str) and v in _NONFINITE:
            obj[k] = _NONFINITE[v]
        elif isinstance(v, list):
            obj[k] = [_NONFINITE[x] if isinstance(x, str) and x in _NONFINITE else x for x in v]
    return obj


def parse_line(line: str, decode: Callable[[str], Any] = json.loads) -> dict[str, Any]:
    """One JSONL line as a record dict. Raises ``ValueError`` for anything else.

    Example:
        >>> parse_line('{"step": 3, "loss": "Infinity"}')
        {'step': 3, 'loss': inf}
    """
    try:
        obj = decode(line)
    except RecursionError:
        raise ValueError("a JSON value nested too deeply to be a record") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "NaN" in line or "Infinity" in line:
        _revive(obj)
    return obj


def _recover(line: str) -> dict[str, Any] | None:
    """The whole record that follows a torn one on the same line (a crash, then an append)."""
    start = line.find('{"', 1)
    for _ in range(64):
        if start < 0:
            return None
        try:
            return parse_line(line[start:])
        except ValueError:
            start = line.find('{"', start + 1)
    return None


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` per line, read as a stream (the file is never held whole)."""
    with open(path, "rb") as f:
        for i, chunk in enumerate(f):
            if i == 0 and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8) :]
            try:
                yield i + 1, chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                if chunk.lstrip().startswith(b"{"):  # a record torn mid-character
                    yield i + 1, chunk.decode("utf-8", errors="replace")
                    continue
                raise ValueError(
                    f"{path}, line {i + 1}: binary data, not UTF-8 text (byte "
                    f"0x{chunk[e.start]:02x} at column {e.start + 1})"
                ) from None


def _decoder() -> json.JSONDecoder:
    """A JSON decoder that shares one string object per distinct key and text value, so a
    long run holds each key once instead of once per record."""
    seen: dict[str, str] = {}
    share = seen.setdefault

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {share(k, k): share(v, v) if v.__class__ is str else v for k, v in items}

    return json.JSONDecoder(object_pairs_hook=pairs)


def read_records(path: str | os.PathLike[str]) -> tuple[list[Record], list[str]]:
    """Every record of a JSONL file in file order, and notes on what was skipped.

    Only JSON is parsed (nothing is unpickled), in one pass over the file. A UTF-8 byte-order
    mark is accepted. A torn line (a writer that stopped mid-record) is skipped with a note,
    wherever it is; when a resumed writer appended a whole record to the torn line, that
    record is kept. A line that is not a JSON object at all raises ``ValueError`` naming the
    file and the line.
    """
    name = os.fspath(path)
    items: list[Record] = []
    torn: list[int] = []
    last = 0
    decode = _decoder().decode
    for n, line in _lines(name):
        if not line or line.isspace():
            continue
        last = n
        try:
            items.append(parse_line(line, decode))
        except ValueError as e:
            if not line.lstrip().startswith("{") or "nested too deeply" in str(e):
                raise ValueError(f"{name}, line {n}: not a JSON record ({e})") from None
            torn.append(n)
            rest = _recover(line)
            if rest is not None and "\ufffd" not in json.dumps(rest):
                items.append(rest)
    notes = []
    for n in torn:
        if n == last:
            notes.append(f"{name}: skipped a truncated last line (the writer stopped mid-record)")
        else:
            notes.append(f"{name}, line {n}: skipped a torn record (a writer stopped mid-record)")
    return items, notes
