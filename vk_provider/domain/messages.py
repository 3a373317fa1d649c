"""Text for one-line error messages."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's first line, to end a one-line error (its type when it has no text)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
