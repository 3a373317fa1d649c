"""The status reporter: the only writer of Pod status.

Pod workers :meth:`~StatusReporter.publish` the status they want; the reporter sends it. Updates
for one Pod are coalesced (only the newest pending status is sent), a status equal to the last
one sent is skipped, one Pod never has two writes in flight, and transient failures are retried
with back-off. Dropping a Pod (:meth:`~StatusReporter.forget`) discards whatever was pending.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)
JSON = dict[str, Any]


class PodStatusApi(Protocol):
    async def patch_status(self, namespace: str, name: str, uid: str, status: JSON) -> JSON:
        """Raises an exception with ``is_transient`` / ``is_not_found`` / ``is_conflict`` on failure."""
        ...


@dataclass(slots=True)
class _Entry:
    namespace: str
    name: str
    pending: JSON | None = None
    sent: JSON | None = None
    in_flight: bool = False
    queued: bool = False
    waiters: list[asyncio.Future[None]] | None = None


class StatusReporter:
    def __init__(self, api: PodStatusApi, *, workers: int = 8, max_backoff: float = 10.0) -> None:
        self._api = api
        self._entries: dict[str, _Entry] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers = workers
        self._max_backoff = max_backoff
        self.writes = 0
        self.skipped = 0

    def publish(self, uid: str, namespace: str, name: str, status: JSON) -> None:
        """Ask for ``status`` to be written (non-blocking; newer calls replace older pending ones)."""
        entry = self._entries.get(uid)
        if entry is None:
            entry = self._entries[uid] = _Entry(namespace, name)
        entry.pending = status
        if not entry.in_flight and not entry.queued:
            entry.queued = True
            self._queue.put_nowait(uid)

    def seen(self, uid: str, namespace: str, name: str, status: JSON) -> None:
        """Record what the API server already has (e.g. after an agent restart), so it is not re-sent."""
        entry = self._entries.get(uid)
        if entry is None:
            entry = self._entries[uid] = _Entry(namespace, name)
        if entry.sent is None:
            entry.sent = status

    def forget(self, uid: str) -> None:
        entry = self._entries.pop(uid, None)
        if entry is not None:
            self._wake(entry)

    def busy(self) -> int:
        """How many Pods have a status waiting to be written or being written."""
        return sum(1 for e in self._entries.values() if e.pending is not None or e.in_flight)

    async def flushed(self, uid: str) -> None:
        """Wait until nothing is pending or in flight for this Pod."""
        entry = self._entries.get(uid)
        if entry is None or (entry.pending is None and not entry.in_flight):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters = [*(entry.waiters or []), fut]
        await fut

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(self._workers):
                group.create_task(self._worker(), name=f"status-writer-{i}")

    @staticmethod
    def _wake(entry: _Entry) -> None:
        for fut in entry.waiters or ():
            if not fut.done():
                fut.set_result(None)
        entry.waiters = None

    async def _worker(self) -> None:
        while True:
            uid = await self._queue.get()
            entry = self._entries.get(uid)
            if entry is None:
                continue
            entry.queued = False
            status = entry.pending
            entry.pending = None
            if status is None:
                continue
            if status == entry.sent:
                self.skipped += 1
                self._wake(entry)
                continue
            entry.in_flight = True
            try:
                ok = await self._send(entry, uid, status)
            finally:
                entry.in_flight = False
            if ok:
                entry.sent = status
            if self._entries.get(uid) is entry:
                self._after_send(uid, entry)

    def _after_send(self, uid: str, entry: _Entry) -> None:
        """A newer status may have arrived while the write was in flight: queue it, or wake waiters."""
        if entry.pending is None:
            self._wake(entry)
        elif not entry.queued:
            entry.queued = True
            self._queue.put_nowait(uid)

    async def _send(self, entry: _Entry, uid: str, status: JSON) -> bool:
        backoff = 0.25
        while True:
            try:
                await self._api.patch_status(entry.namespace, entry.name, uid, status)
                self.writes += 1
                return True
            except Exception as exc:
                if getattr(exc, "is_not_found", False) or getattr(exc, "is_conflict", False):
                    return False  # the Pod is gone (or replaced by a new one of the same name)
                if not getattr(exc, "is_transient", False):
                    log.warning("status of %s/%s was refused: %s", entry.namespace, entry.name, exc)
                    return False
                if self._entries.get(uid) is not entry:
                    return False
                if entry.pending is not None:  # a newer status replaces this one; send that instead
                    return False
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
