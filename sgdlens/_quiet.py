"""Passes that are not training: probes run inside :func:`probing`, and no lens hook reads them.

A plain counter, not a thread-local: backward hooks on an accelerator run in autograd's own
device threads, which must see the flag the probing thread set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0


@contextmanager
def probing() -> Iterator[None]:
    """Mark the forward and backward passes inside as a probe's, invisible to every lens."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def probing_now() -> bool:
    """Whether a probe is running (its passes are not the training step's)."""
    return _depth > 0
