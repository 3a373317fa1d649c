"""Kubernetes resource quantities (``500m``, ``1.5``, ``128Mi``, ``1k``) as exact numbers.

PURE. ``parse_quantity`` returns a :class:`fractions.Fraction` or ``None`` for text that is not a
quantity; callers decide what an invalid value means.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

_SUFFIX = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9]+(?:\.[0-9]*)?|[+-]?\.[0-9]+)(?:[eE]([+-]?[0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$"
)


def parse_quantity(text: str | int | float) -> Fraction | None:
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return Fraction(text)
    return _parse_text(text) if len(text) <= 64 else None


@lru_cache(maxsize=1024)  # Pods repeat the same few quantities ("100m", "128Mi"); Fractions are immutable
def _parse_text(text: str) -> Fraction | None:
    match = _QUANTITY.match(text.strip())
    if not match:
        return None
    number, exponent, suffix = match.groups()
    value = Fraction(number)
    if exponent:
        if abs(int(exponent)) > 30:
            return None
        value *= Fraction(10) ** int(exponent)
    return value * _SUFFIX[suffix or ""]


def milli(value: Fraction) -> int:
    """CPU in millicores, rounded up like the scheduler does."""
    scaled = value * 1000
    return int(-(-scaled.numerator // scaled.denominator))


def whole(value: Fraction) -> int:
    """Bytes (or a count), rounded up."""
    return int(-(-value.numerator // value.denominator))
