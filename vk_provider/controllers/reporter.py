"""The status reporter: the only writer of Pod status (and of the annotations the node adds).

Pod workers :meth:`~StatusReporter.publish` the status they want; the reporter sends it. Updates
for one Pod are coalesced (only the newest pending status is sent, after a short settle window so
that a Pod passing through several states at once costs one write), a status equal to the last one
sent is skipped, one Pod never has two writes in flight, and transient failures are retried with
back-off. Annotations the node adds (:meth:`~StatusReporter.annotate`) ride on the next status
write: the ``pods/status`` endpoint accepts metadata changes, so they cost no extra request.
Dropping a Pod (:meth:`~StatusReporter.forget`) discards whatever was pending.

Memory per Pod is one small entry: the last sent status is kept as a digest, not as a dict.
Other writers (the Event recorder) can :meth:`~StatusReporter.wait_idle` to give way to status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)
JSON = dict[str, Any]


class PodStatusApi(Protocol):
    async def patch_status(
        self, namespace: str, name: str, uid: str, status: JSON | None, annotations: Mapping[str, str] | None = None
    ) -> JSON:
        """Raises an exception with ``is_transient`` / ``is_not_found`` / ``is_conflict`` on failure.

        Conditions other writers set (readiness gates') are left as the API server has them."""
        ...


def digest(status: JSON) -> int:
    """A stand-in for the status itself, to tell whether a new one differs from the last sent.

    Statuses are built by one function (``render_status``), so equal ones list their keys in the
    same order and ``repr`` tells them apart as well as sorted JSON would, at a third of the cost.
    """
    return hash(repr(status))


@dataclass(slots=True)
class _Entry:
    namespace: str
    name: str
    pending: JSON | Callable[[], JSON] | None = None
    annotations: dict[str, str] | None = None  # to add with the next write
    sent: int | None = None  # digest of the last status the API server accepted (or already had)
    version: int | None = None  # the Pod's resourceVersion after that write (or when seen)
    in_flight: bool = False
    sending: JSON | None = None  # the status of the write in flight
    queued: bool = False
    waiters: list[asyncio.Future[None]] | None = None

    @property
    def dirty(self) -> bool:
        return self.pending is not None or self.annotations is not None or self.in_flight


class StatusReporter:
    def __init__(
        self, api: PodStatusApi, *, workers: int = 8, max_backoff: float = 10.0, settle_seconds: float = 0.0
    ) -> None:
        self._api = api
        self._entries: dict[str, _Entry] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers = workers
        self._max_backoff = max_backoff
        self._settle = settle_seconds
        self._busy: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.writes = 0
        self.skipped = 0

    def publish(self, uid: str, namespace: str, name: str, status: JSON | Callable[[], JSON]) -> None:
        """Ask for ``status`` to be written (non-blocking; newer calls replace older pending ones).

        ``status`` may be a function making it: called only if it is still the newest when its
        turn comes, so a status replaced before it is sent is never rendered nor held as a dict.
        """
        entry = self._entry(uid, namespace, name)
        entry.pending = status
        self._schedule(uid, entry)

    def annotate(self, uid: str, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Ask for annotations to be added to the Pod, with the next status write (non-blocking)."""
        if not annotations:
            return
        entry = self._entry(uid, namespace, name)
        entry.annotations = {**(entry.annotations or {}), **annotations}
        self._schedule(uid, entry)

    def seen(self, uid: str, namespace: str, name: str, status: JSON, version: str = "") -> None:
        """Record what the API server already has (e.g. after an agent restart), so it is not re-sent."""
        entry = self._entry(uid, namespace, name)
        if entry.sent is None:
            entry.sent = digest(status)
            entry.version = _number(version)

    def written(self, uid: str, version: str) -> bool:
        """Whether the Pod at ``version`` holds nothing newer than this reporter's last write to it
        (or what it had when seen): its status is then the node's own."""
        entry = self._entries.get(uid)
        number = _number(version)
        return entry is not None and entry.version is not None and number is not None and number <= entry.version

    def wrote(self, uid: str, version: str) -> bool:
        """Whether ``version`` is exactly the Pod as this reporter's last write to it left it (or
        as it was when seen): a watch event of it needs no reading. (An older version may hold
        another writer's change, a new image say, that the node's write came after.)"""
        entry = self._entries.get(uid)
        number = _number(version)
        return entry is not None and number is not None and number == entry.version

    def sending(self, uid: str) -> JSON | None:
        """The status of the write to the Pod in flight, if one is: the watch can bring it back
        before its answer comes."""
        entry = self._entries.get(uid)
        return entry.sending if entry is not None else None

    def rewrite(self, uid: str) -> None:
        """Another writer changed the Pod's status: the next status published is sent, even if it
        equals the last one this reporter wrote."""
        entry = self._entries.get(uid)
        if entry is not None:
            entry.sent = None

    def forget(self, uid: str) -> None:
        entry = self._entries.pop(uid, None)
        if entry is not None:
            self._wake(entry)
        self._mark_clean(uid)

    def busy(self) -> int:
        """How many Pods have a status (or annotations) waiting to be written or being written."""
        return len(self._busy)

    async def wait_idle(self) -> None:
        """Return once no status is waiting or being written (at once if none is)."""
        while self._busy:
            await self._idle.wait()

    async def flushed(self, uid: str) -> None:
        """Wait until nothing is pending or in flight for this Pod."""
        entry = self._entries.get(uid)
        if entry is None or not entry.dirty:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters = [*(entry.waiters or []), fut]
        await fut

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(self._workers):
                group.create_task(self._worker(), name=f"status-writer-{i}")

    # -- internals

    def _entry(self, uid: str, namespace: str, name: str) -> _Entry:
        entry = self._entries.get(uid)
        if entry is None:
            entry = self._entries[uid] = _Entry(namespace, name)
        return entry

    def _schedule(self, uid: str, entry: _Entry) -> None:
        self._busy.add(uid)
        self._idle.clear()
        if entry.in_flight or entry.queued:
            return  # the newest pending state is picked up when the queued or current write is done
        entry.queued = True
        if self._settle > 0:
            asyncio.get_running_loop().call_later(self._settle, self._queue.put_nowait, uid)
        else:
            self._queue.put_nowait(uid)

    def _mark_clean(self, uid: str) -> None:
        self._busy.discard(uid)
        if not self._busy:
            self._idle.set()

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
            if entry is None or not entry.queued:
                continue
            entry.queued = False
            pending, annotations = entry.pending, entry.annotations
            entry.pending = entry.annotations = None
            status = pending() if callable(pending) else pending
            new = digest(status) if status is not None else None
            if status is not None and new == entry.sent:
                self.skipped += 1
                status = None
            if status is not None or annotations:
                entry.in_flight, entry.sending = True, status
                try:
                    ok = await self._send(entry, uid, status, annotations)
                finally:
                    entry.in_flight, entry.sending = False, None
                if ok and new is not None:
                    entry.sent = new
            if self._entries.get(uid) is entry:
                self._after_send(uid, entry)

    def _after_send(self, uid: str, entry: _Entry) -> None:
        """Something newer may have arrived while the write was in flight: queue it, or wake waiters."""
        if entry.pending is None and entry.annotations is None:
            self._wake(entry)
            self._mark_clean(uid)
        elif not entry.queued:
            entry.queued = True
            self._queue.put_nowait(uid)

    async def _send(self, entry: _Entry, uid: str, status: JSON | None, annotations: dict[str, str] | None) -> bool:
        backoff = 0.25
        while True:
            try:
                written = await self._api.patch_status(entry.namespace, entry.name, uid, status, annotations)
                self.writes += 1
                version = _number(str((written.get("metadata") or {}).get("resourceVersion") or ""))
                if version is not None and (entry.version is None or version > entry.version):
                    entry.version = version
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
                    if annotations:  # ...with the annotations this write carried
                        entry.annotations = {**annotations, **(entry.annotations or {})}
                    return False
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)


def _number(version: str) -> int | None:
    """A resourceVersion as a number (etcd's revisions are), or None: compared only as numbers."""
    return int(version) if version.isdigit() and len(version) < 20 else None
