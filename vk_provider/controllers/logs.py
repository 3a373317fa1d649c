"""Simulated container logs: what ``kubectl logs`` shows for a Pod on the virtual node.

Each container's log is its lifecycle, one timestamped line per step. Logs are kept in memory
with a bounded number of lines per container and are dropped with the Pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from sys import intern


class Line:
    """One log line: a float timestamp and interned text (the same steps repeat across Pods)."""

    __slots__ = ("_stamp", "text")

    def __init__(self, at: datetime, text: str) -> None:
        self._stamp = at.timestamp()
        self.text = intern(text)

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self._stamp, UTC)


class SimLog:
    """Implements the http layer's ``ContainerLog``: lines only grow; ``finished`` once dropped."""

    __slots__ = ("_changed", "_lines", "_max", "finished")

    def __init__(self, max_lines: int = 1000) -> None:
        self._lines: list[Line] = []
        self._max = max_lines
        self._changed: asyncio.Event | None = None
        self.finished = False

    @property
    def lines(self) -> Sequence[Line]:
        return self._lines

    def write(self, at: datetime, text: str) -> None:
        if len(self._lines) >= self._max:
            del self._lines[: self._max // 10]
        self._lines.append(Line(at, text))
        self._notify()

    def close(self) -> None:
        self.finished = True
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_more(self, seen: int) -> None:
        while len(self._lines) <= seen and not self.finished:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
