"""Simulated container logs: what ``kubectl logs`` shows for a Pod on the virtual node.

Each container's log is its lifecycle, one timestamped line per step, split into runs as the
kubelet keeps one log per container instance: a run holds the lines from the end of the run before
(the pull and create steps) to its own exit, so ``kubectl logs`` shows the current run and
``--previous`` the one before. Logs are kept in memory with a bounded number of lines per container
and are dropped with the Pod.
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
    """One container's log: lines only grow (the oldest are dropped past ``max_lines``); ``finished``
    once the Pod is dropped. Positions are counted from the first line ever written."""

    __slots__ = ("_changed", "_dropped", "_lines", "_max", "_next", "_runs", "finished")

    def __init__(self, max_lines: int = 1000) -> None:
        self._lines: list[Line] = []
        self._max = max_lines
        self._dropped = 0  # lines dropped from the front: the position of _lines[0]
        self._runs: list[list[int | None]] = []  # [first, end] positions; end None while it runs
        self._next = 0  # where the next run's lines begin
        self._changed: asyncio.Event | None = None
        self.finished = False

    @property
    def lines(self) -> Sequence[Line]:
        """Every line still kept, across runs."""
        return self._lines

    def write(self, at: datetime, text: str) -> None:
        if len(self._lines) >= self._max:
            cut = self._max // 10
            del self._lines[:cut]
            self._dropped += cut
        self._lines.append(Line(at, text))
        self._notify()

    def started(self) -> None:
        """The container started: a run begins, holding the lines since the last one ended."""
        self._end_run()  # one still open (its exit never came) ends where this one begins
        self._runs.append([self._next, None])

    def stopped(self) -> None:
        """The container exited (or was killed): its run ends here."""
        self._end_run()
        self._next = self._dropped + len(self._lines)
        self._notify()

    def run(self, back: int) -> LogRun:
        """The run ``back`` runs before the latest (0: the latest); an empty, finished one if the
        log does not go back that far (the agent restarted since, say)."""
        index = len(self._runs) - 1 - back
        if index < 0:
            here = self._dropped + len(self._lines)
            return LogRun(self, [here, here])
        return LogRun(self, self._runs[index])

    def close(self) -> None:
        self.finished = True
        self._notify()

    def _end_run(self) -> None:
        """The open run, if any, ends here; the next one's lines begin here."""
        if self._runs and self._runs[-1][1] is None:
            self._runs[-1][1] = self._next = self._dropped + len(self._lines)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def changed(self) -> None:
        """Returns after the next line, end of a run, or close."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def wait_for_more(self, seen: int) -> None:
        while len(self._lines) <= seen and not self.finished:
            await self.changed()


class LogRun:
    """One run of a container's log; implements the http layer's ``ContainerLog``."""

    __slots__ = ("_log", "_span")

    def __init__(self, log: SimLog, span: list[int | None]) -> None:
        self._log = log
        self._span = span  # shared with the log: its end is set when the run ends

    @property
    def lines(self) -> Sequence[Line]:
        log = self._log
        first, end = self._span
        assert first is not None
        start = max(0, first - log._dropped)
        return log._lines[start:] if end is None else log._lines[start : max(0, end - log._dropped)]

    @property
    def finished(self) -> bool:
        return self._span[1] is not None or self._log.finished

    async def wait_for_more(self, seen: int) -> None:
        while len(self.lines) <= seen and not self.finished:
            await self._log.changed()
