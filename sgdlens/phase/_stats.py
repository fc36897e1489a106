"""Pure functions of the phase detector: number checks, medians, robust z, motion exponent."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

__all__ = ["as_number", "displacement_exponent", "robust_z", "usable"]

_MAD_TO_STD = 1.4826  # MAD × 1.4826 estimates the std of a normal distribution
_Z_CAP = 1e300  # keeps robust z finite (JSON-able) when the loss history is constant


def as_number(x: object) -> float | None:
    """``x`` as a finite float, or ``None`` for anything else (nan, inf, str, bool, None)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    y = float(x)
    return y if math.isfinite(y) else None


def usable(x: object) -> bool:
    """Whether ``x`` is a usable SNR value: a finite number >= 0."""
    y = as_number(x)
    return y is not None and y >= 0.0


def displacement_exponent(points: Iterable[tuple[float, float]]) -> float | None:
    """Local exponent ``c`` of ``‖w_t − w_0‖ ∝ t^c``: least-squares slope in log-log space.

    ``c ≈ 1`` is ballistic motion (drift), ``½`` a random walk (diffusion), ``< ½``
    sub-diffusion.

    Args:
        points: ``(t, distance)`` pairs; pairs with ``t <= 0`` or ``distance <= 0`` (or
            non-finite) are ignored.

    Returns:
        The slope, or ``None`` with fewer than 3 usable points or all at one ``t``.

    Example:
        >>> round(displacement_exponent([(1, 2.0), (4, 4.0), (16, 8.0)]), 6)
        0.5
    """
    xs: list[float] = []
    ys: list[float] = []
    for t, d in points:
        if t > 0 and d > 0 and math.isfinite(t) and math.isfinite(d):
            xs.append(math.log(t))
            ys.append(math.log(d))
    if len(xs) < 3:
        return None
    mx = math.fsum(xs) / len(xs)
    my = math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0:
        return None
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def robust_z(history: Sequence[float], x: float) -> tuple[float, float, float]:
    """How far ``x`` lies above ``history``, in robust standard deviations.

    ``z = (x − median) / (1.4826 · MAD)``; the scale is floored at ``1e-9 · |median|`` (and at
    the smallest positive float) so a constant history gives a large, finite ``z``.

    Args:
        history: recent finite values (at least one).
        x: the new value.

    Returns:
        ``(z, median, scale)``. ``z`` is capped at ``1e300``.

    Example:
        >>> robust_z([1.0, 2.0, 3.0, 4.0, 5.0], 13.0)[0] > 5
        True
    """
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = max(_MAD_TO_STD * mad, 1e-9 * abs(med), 5e-324)
    z = (x - med) / scale
    return (min(z, _Z_CAP) if z == z else 0.0), med, scale


def relative_change(values: Sequence[float]) -> float | None:
    """Relative change of the median from the older to the newer half of ``values``.

    ``None`` with fewer than 4 values or an older median of 0.

    Example:
        >>> relative_change([4.0, 4.0, 2.0, 2.0])
        -0.5
    """
    n = len(values)
    if n < 4:
        return None
    old = statistics.median(values[: n // 2])
    if old == 0.0:
        return None
    return (statistics.median(values[n // 2 :]) - old) / abs(old)
