"""Parsing and checking the numbers an experiment is specified with.

Shares and effects are written two ways by people: ``"0.5%"`` and ``0.005``. Both mean the same
fraction here. A bare number above 1 (``5``) is refused rather than guessed at, because reading
"5" as 5% or as 500% silently changes a plan by a factor of a hundred.
"""

from __future__ import annotations

import math


def parse_fraction(value: str | float, name: str = "value") -> float:
    """``"0.5%"`` -> 0.005, ``"0.005"`` -> 0.005, ``0.005`` -> 0.005.

    Raises ``ValueError`` naming ``name`` for text that is not a number, for NaN, and for a bare
    number greater than 1 (write ``"5%"`` or ``0.05``).
    """
    if isinstance(value, str):
        text = value.strip()
        is_percent = text.endswith("%")
        try:
            number = float(text[:-1] if is_percent else text)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a number or a percentage (e.g. '0.5%' or 0.005)") from None
        if is_percent:
            number /= 100.0
        elif abs(number) > 1:
            raise ValueError(f"{name}: {value!r} is ambiguous; write '{text}%' or {number / 100:g}")
    else:
        number = float(value)
        if abs(number) > 1:
            raise ValueError(f"{name}: {value!r} is ambiguous; write '{number:g}%' or {number / 100:g}")
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not finite")
    return number


def check_open_unit(value: float, name: str) -> float:
    """``value`` must lie strictly inside (0, 1): alpha, power, a share of traffic below 100%."""
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_share(value: float, name: str = "traffic") -> float:
    """A traffic share: in (0, 1]; 100% is allowed (a full rollout), 0 or above 100% is not."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 100%], got {value!r}")
    return float(value)


def check_positive(value: float, name: str) -> float:
    """A strictly positive finite number (an MDE, a standard deviation, a user count)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
