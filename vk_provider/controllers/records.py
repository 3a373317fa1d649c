"""Records every Pod start: one row in the registry database, and the node's metrics.

A Pod its cache kept from starting (ImageCacheNotFound, ImageCacheNotComplete) is stored too, with
the outcome ``failed``; the metrics count started Pods only.

Implements the pod controller's ``StartRecorder``. A Pod start is stored once (the registry is
idempotent on the Pod's UID, so a restarted agent finishing a start it had begun does not count it
twice; a start replaces a ``failed`` record of the Pod); metrics are observed only for starts this
process stored.

A start is stored within ``linger`` seconds (up to ``max_delay`` while status writes are pending),
so an agent killed (SIGKILL, OOM) may not have stored the last ones. After a restart, the Pods
found running are checked against the registry: those with no record are named in a warning and
counted (``vk_provider_pod_starts_unrecorded_total``), so a comparison that misses them says so
instead of being silently short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from vk_provider.controllers.pods import PodStart
from vk_provider.domain.images import normalize
from vk_provider.domain.podspec import PodFacts
from vk_provider.domain.records import CacheOutcome, ImagePullRecord, PodStartRecord
from vk_provider.metrics import NodeMetrics, image_size_bucket

log = logging.getLogger(__name__)


class PodStartStore(Protocol):
    async def record_pod_starts(self, records: Sequence[PodStartRecord]) -> list[bool]:
        """Store the records in one transaction; for each, False when one for its Pod UID already exists."""
        ...

    async def recorded_pod_uids(self, uids: Sequence[str]) -> set[str]:
        """Those of these Pod UIDs that have a record."""
        ...


def outcome_of(start: PodStart) -> CacheOutcome:
    try:
        return CacheOutcome(start.decision.outcome)
    except ValueError:
        return CacheOutcome.NONE


def to_record(start: PodStart) -> PodStartRecord:
    assert start.started_at is not None
    images = tuple(
        ImagePullRecord(
            # Normalised, as the registry's other references (and a simulation's) are: joins find it.
            reference=normalize(image) or image,
            bytes_pulled=result.downloaded,
            pull_seconds=result.seconds,
            from_cache=result.from_cache,
        )
        for image, result in start.images
    )
    return PodStartRecord(
        pod_uid=start.pod.uid,
        namespace=start.pod.namespace,
        name=start.pod.name,
        node=start.node,
        outcome=outcome_of(start),
        imc_id=start.decision.imc_id or None,
        reason=start.decision.explanation,
        images=images,
        resolve_seconds=start.resolve_seconds,
        snapshot_attach_seconds=start.attach_seconds,
        container_start_seconds=start.container_seconds,
        startup_seconds=start.startup_seconds,
        created_at=start.pod.created or start.started_at,
        started_at=start.started_at,
        labels=start.pod.labels,
    )


CHECK_TRIES = 5  # queries to check the records of adopted Pods before giving up on them


class RegistryStartRecorder:
    """Queues Pod starts and stores them from one writer, so a Pod never waits for the database.

    Many Pods starting at once would otherwise contend for the SQLite write lock; the writer
    stores up to ``batch`` queued starts in one transaction. After the first start of a batch it
    waits up to ``linger`` seconds for more (not when the batch is full, nor when flushing): a
    burst of 1,000 starts is then a handful of transactions, where storing whatever had queued at
    each turn made it a hundred, each costing far more CPU than its rows. Then, with ``give_way``,
    it lets waiting Pod status writes go first, up to ``max_delay`` seconds after it took the
    batch's first start (see :meth:`_after_status_writes`). A failed write is retried with
    back-off (nothing recorded is dropped while the agent runs); :meth:`flush` drains the queue
    on shutdown, with no lingering and no giving way.
    """

    def __init__(
        self,
        store: PodStartStore,
        metrics: NodeMetrics,
        *,
        max_backoff: float = 5.0,
        batch: int = 500,
        linger: float = 0.25,
        give_way: Callable[[], Awaitable[object]] | None = None,
        max_delay: float = 2.0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._queue: asyncio.Queue[PodStart] = asyncio.Queue()
        self._max_backoff = max_backoff
        self._batch = batch
        self._linger = linger
        self._give_way = give_way
        self._max_delay = max_delay
        self._hurry = asyncio.Event()  # a full batch is queued, or a flush waits: no lingering
        self._flush_asked = asyncio.Event()  # no giving way either
        self._flushing = 0
        self.failures = 0
        self._adopted: list[PodFacts] = []  # running Pods taken over after a restart, to check
        self._adopted_added = asyncio.Event()
        self.unrecorded: list[str] = []  # their keys (namespace/name), when no record was found

    async def record(self, start: PodStart) -> None:
        self._queue.put_nowait(start)
        if self._queue.qsize() + 1 >= self._batch:  # with the one the writer holds while lingering
            self._hurry.set()

    def adopted(self, pod: PodFacts) -> None:
        self._adopted.append(pod)
        self._adopted_added.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._write())
            group.create_task(self._check_adopted())

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            starts = [await self._queue.get()]
            taken = loop.time()
            if self._linger > 0 and not self._flushing and self._queue.qsize() + 1 < self._batch:
                self._hurry.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._hurry.wait()
            await self._after_status_writes(self._max_delay - (loop.time() - taken))
            while len(starts) < self._batch and not self._queue.empty():
                starts.append(self._queue.get_nowait())
            try:
                await self._store_with_retries(starts)
            finally:
                for _ in starts:
                    self._queue.task_done()

    async def _after_status_writes(self, patience: float) -> None:
        """Let the Pod status writes waiting go first (with ``give_way``, the status reporter's
        ``wait_idle``), as Events do: in a burst, the API server and this process's CPU go to
        getting Pods Running before their records are stored. At most ``patience`` seconds, and
        not at all when a flush waits."""
        if self._give_way is None or self._flushing or patience <= 0:
            return
        waits = [asyncio.ensure_future(self._give_way()), asyncio.ensure_future(self._flush_asked.wait())]
        try:
            await asyncio.wait(waits, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _check_adopted(self) -> None:
        """One query per batch of adopted Pods (a resync adopts them one after another); a failed
        query is tried again with back-off, ``CHECK_TRIES`` times in all."""
        first_backoff = min(0.5, self._max_backoff)
        failed, backoff = 0, first_backoff
        while True:
            await self._adopted_added.wait()
            await asyncio.sleep(self._linger)
            self._adopted_added.clear()
            pods, self._adopted = self._adopted, []
            try:
                recorded = await self._store.recorded_pod_uids([pod.uid for pod in pods])
            except Exception as exc:
                failed += 1
                if failed < CHECK_TRIES:
                    log.warning(
                        "could not check that the starts of %d running Pods were recorded (%s); retrying in %.1f s",
                        len(pods), exc, backoff,
                    )  # fmt: skip
                    self._adopted = pods + self._adopted
                    self._adopted_added.set()
                    await asyncio.sleep(backoff)
                    backoff = min(self._max_backoff, backoff * 2)
                else:
                    log.warning(
                        "could not check that the starts of %d running Pods were recorded (%s); gave up after %d tries",
                        len(pods), exc, failed,
                    )  # fmt: skip
                    failed, backoff = 0, first_backoff
                continue
            failed, backoff = 0, first_backoff
            missing = [pod.key for pod in pods if pod.uid not in recorded]
            if missing:
                self.unrecorded.extend(missing)
                self._metrics.starts_unrecorded.inc(by=len(missing))
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                log.warning(
                    "%d Pods were running when the agent started but their start is not in the registry "
                    "(the agent that started them stopped before storing it, e.g. it was killed, or it used "
                    "another database); report leaves them out: %s",
                    len(missing),
                    shown,
                )

    async def flush(self, timeout: float = 5.0) -> None:
        """Store everything queued now (no lingering), waiting at most ``timeout`` seconds."""
        self._flushing += 1
        self._hurry.set()
        self._flush_asked.set()
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("%d Pod starts were not recorded before shutdown", self._queue.qsize())
        finally:
            self._flushing -= 1
            if not self._flushing:
                self._flush_asked.clear()

    async def _store_with_retries(self, starts: list[PodStart]) -> None:
        backoff = 0.1
        records = [to_record(start) for start in starts]
        while True:
            try:
                stored = await self._store.record_pod_starts(records)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                what = starts[0].pod.key if len(starts) == 1 else f"{len(starts)} Pods"
                log.warning("could not record the start of %s (%s); retrying", what, exc)
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
        for start, record, new in zip(starts, records, stored, strict=True):
            if new and record.outcome is not CacheOutcome.FAILED:  # the metrics are of started Pods
                self._observe(start, record)

    def _observe(self, start: PodStart, record: PodStartRecord) -> None:
        m = self._metrics
        outcome = record.outcome.value
        m.pod_start_total.observe(record.startup_seconds, outcome)
        m.pod_start_sli.observe(max(0.0, record.startup_seconds - record.pull_seconds), outcome)
        for (_, result), image in zip(start.images, record.images, strict=True):
            if not result.present:
                m.image_pull.observe(image.pull_seconds, outcome, image_size_bucket(result.size))
        m.bytes_pulled.inc(outcome, by=record.bytes_pulled)
        m.pods_started.inc(outcome)
        if record.outcome.used_cache:
            m.cache_hits.inc(outcome)
        elif record.outcome is CacheOutcome.MISS:
            m.cache_misses.inc()
        if any(event.reason == "ImageCacheAutoCreated" for event in start.decision.events):
            m.auto_created.inc()
