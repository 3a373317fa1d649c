"""Pod API calls (status and annotation patches, deletion) and the Event recorder.

Owns REST paths and wire formats. The pod controller decides what to write and when; the status
reporter is the only caller of :meth:`PodClient.patch_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from vk_provider.domain.events import EventSpec
from vk_provider.domain.node import rfc3339
from vk_provider.kube.session import JSON, MERGE_PATCH, KubeError, KubeSession

log = logging.getLogger(__name__)


class PodClient:
    def __init__(self, session: KubeSession) -> None:
        self._s = session

    async def patch_status(
        self, namespace: str, name: str, uid: str, status: JSON | None, annotations: Mapping[str, str] | None = None
    ) -> JSON:
        # The uid precondition keeps a status meant for a deleted Pod off a new one of the same name.
        # pods/status accepts metadata changes: annotations the node adds ride on the status write.
        meta: JSON = {"uid": uid}
        if annotations:
            meta["annotations"] = dict(annotations)
        body: JSON = {"metadata": meta}
        if status is not None:
            body["status"] = status
        # The answer (the whole Pod) is not needed: the watch brings it anyway.
        return await self._s.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            body=body,
            content_type=MERGE_PATCH,
            want_body=False,
        )

    async def delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Remove the Pod for good (grace 0), only if it is still the object we saw."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            await self._s.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body)
        except KubeError as exc:
            if not (exc.is_not_found or exc.is_conflict):
                raise


class EventRecorder:
    """Posts core/v1 Events in the order they are recorded, without blocking the caller.

    Event names follow the kubelet (``<pod>.<hex nanoseconds>``), strictly increasing, so that
    ``kubectl describe`` (which sorts by time, then name) lists them in the order they happened.
    Posting failures are logged and dropped: an Event is never worth stalling a Pod. Events give
    way to Pod status: with ``give_way`` (e.g. the status reporter's ``wait_idle``), each post
    first waits until no status write is waiting, like the kubelet whose Events travel on a
    separate, slower budget than status; but an Event waits at most ``max_delay`` seconds after it
    was recorded, so a long burst of Pods does not starve them. When the queue is full, new Events
    are dropped and counted, as the kubelet's recorder drops them under load.
    """

    def __init__(
        self,
        session: KubeSession,
        host: str,
        max_queue: int = 10000,
        give_way: Callable[[], Awaitable[object]] | None = None,
        max_delay: float = 5.0,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._s = session
        self._on_drop = on_drop
        self._host = host
        self._give_way = give_way
        self._max_delay = max_delay
        # (what, when it happened, name stamp, loop time it was queued)
        self._queue: asyncio.Queue[tuple[EventSpec, datetime, int, float]] = asyncio.Queue(maxsize=max_queue)
        self._last_ns = 0
        self.posted = 0
        self.dropped = 0

    def record(self, spec: EventSpec, now: datetime | None = None) -> None:
        moment = now or datetime.now(UTC)
        stamp = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = stamp
        try:
            self._queue.put_nowait((spec, moment, stamp, asyncio.get_running_loop().time()))
        except asyncio.QueueFull:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("event queue full (%d waiting): %d events dropped so far", self._queue.qsize(),
                            self.dropped)  # fmt: skip

    async def run(self, workers: int = 4) -> None:
        """Drain the queue forever (one task per worker); cancel to stop."""
        async with asyncio.TaskGroup() as group:
            for i in range(workers):
                group.create_task(self._worker(), name=f"event-poster-{i}")

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything recorded so far has been posted (or the timeout passes)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("%d events were not posted before shutdown", self._queue.qsize())

    async def _worker(self) -> None:
        while True:
            spec, moment, stamp, queued = await self._queue.get()
            try:
                patience = self._max_delay - (asyncio.get_running_loop().time() - queued)
                if self._give_way is not None and patience > 0:
                    # asyncio.timeout, not wait_for: wait_for can swallow a cancellation that
                    # arrives as the wait ends (Python 3.11), and the worker would not stop.
                    with contextlib.suppress(TimeoutError):  # waited long enough: post it anyway
                        async with asyncio.timeout(patience):
                            await self._give_way()
                await self._post(spec, moment, stamp)
                self.posted += 1
            except KubeError as exc:
                if not exc.is_not_found:  # the namespace is gone: nothing to tell
                    log.warning(
                        "could not post event %s for %s/%s: %s", spec.reason, spec.namespace, spec.pod_name, exc
                    )
            except Exception:  # an Event is never worth a dead recorder
                log.exception("could not post event %s for %s/%s", spec.reason, spec.namespace, spec.pod_name)
            finally:
                self._queue.task_done()

    async def _post(self, spec: EventSpec, moment: datetime, stamp: int) -> None:
        involved: JSON = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": spec.namespace,
            "name": spec.pod_name,
            "uid": spec.pod_uid,
        }
        if spec.field_path:
            involved["fieldPath"] = spec.field_path
        when = rfc3339(moment)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{spec.pod_name}.{stamp:x}", "namespace": spec.namespace},
            "involvedObject": involved,
            "reason": spec.reason,
            "message": spec.message[:1024],
            "type": spec.type,
            "source": {"component": spec.component, "host": spec.host or self._host},
            "firstTimestamp": when,
            "lastTimestamp": when,
            "count": 1,
            "reportingComponent": spec.component,
            "reportingInstance": spec.host or self._host,
        }
        await self._s.request("POST", f"/api/v1/namespaces/{spec.namespace}/events", body=body)
