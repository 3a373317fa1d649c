"""Prometheus text rendering, and Pod starts recorded once into the store and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.wait import await_for
from vk_provider.controllers.pods import CacheDecision, ImageResult, PodStart
from vk_provider.controllers.records import CHECK_TRIES, RegistryStartRecorder, to_record
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.records import CacheOutcome, PodStartRecord
from vk_provider.metrics import Counter, Histogram, NodeMetrics, image_size_bucket

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_histogram_renders_cumulative_buckets() -> None:
    h = Histogram("x_seconds", "help", (1, 5), ("outcome",))
    for v in (0.5, 1, 3, 9):
        h.observe(v, "miss")
    lines = h.render()
    assert 'x_seconds_bucket{outcome="miss",le="1"} 2' in lines
    assert 'x_seconds_bucket{outcome="miss",le="5"} 3' in lines
    assert 'x_seconds_bucket{outcome="miss",le="+Inf"} 4' in lines
    assert 'x_seconds_sum{outcome="miss"} 13.5' in lines
    assert 'x_seconds_count{outcome="miss"} 4' in lines
    assert h.count("miss") == 4


def test_counter_escapes_labels() -> None:
    c = Counter("c_total", "help", ("l",))
    c.inc('a"b')
    assert 'c_total{l="a\\"b"} 1' in c.render()


def test_a_counter_without_labels_shows_zero_until_counted() -> None:
    text = NodeMetrics().render()
    assert "vk_provider_events_dropped_total 0" in text.splitlines()
    assert "vk_provider_events_filtered_total 0" in text.splitlines()
    assert "vk_provider_pod_starts_unrecorded_total 0" in text.splitlines()
    assert not [line for line in text.splitlines() if line.startswith("vk_provider_pods_started_total")]  # labelled
    c = Counter("c_total", "help")
    c.inc()
    assert c.render()[2:] == ["c_total 1"]


def test_image_size_buckets() -> None:
    assert image_size_bucket(5 * 2**20) == "0-10MB"
    assert image_size_bucket(400 * 2**20) == "100MB-500MB"
    assert image_size_bucket(20 * 2**30) == "10GB+"


class Store:
    def __init__(self) -> None:
        self.rows: dict[str, PodStartRecord] = {}
        self.batches: list[int] = []

    async def record_pod_start(self, record: PodStartRecord) -> bool:
        if record.pod_uid in self.rows:
            return False
        self.rows[record.pod_uid] = record
        return True

    async def record_pod_starts(self, records: Sequence[PodStartRecord]) -> list[bool]:
        self.batches.append(len(records))
        return [await self.record_pod_start(r) for r in records]

    async def recorded_pod_uids(self, uids: Sequence[str]) -> set[str]:
        return {uid for uid in uids if uid in self.rows}


def start(outcome: str = "miss") -> PodStart:
    pod = PodFacts(
        uid="u1", namespace="ns", name="p", node_name="vk", created=T0, restart_policy="Always", grace_seconds=30,
        containers=(ContainerSpec("c", "nginx:1.7.9", "IfNotPresent"),), labels=(("app", "web"),),
    )  # fmt: skip
    s = PodStart(pod=pod, node="vk", decision=CacheDecision(outcome=outcome, imc_id="imc-x", explanation="why"))
    s.images.append(("nginx:1.7.9", ImageResult("id", 39_000_000, seconds=6.0, downloaded=39_000_000)))
    s.started_at = T0 + timedelta(seconds=9)
    s.startup_seconds = 9.0
    return s


async def test_recorded_once_with_metrics() -> None:
    store, metrics = Store(), NodeMetrics()
    recorder = RegistryStartRecorder(store, metrics)
    writer = asyncio.create_task(recorder.run())
    await recorder.record(start())
    await recorder.record(start())  # a restarted agent finishing the same start
    await recorder.flush()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert len(store.rows) == 1
    row = store.rows["u1"]
    assert row.outcome is CacheOutcome.MISS
    assert row.bytes_pulled == 39_000_000
    assert row.labels == (("app", "web"),)
    assert metrics.pod_start_total.count("miss") == 1
    assert metrics.pod_start_sli.count("miss") == 1
    assert metrics.image_pull.count("miss", "10MB-100MB") == 1
    text = metrics.render()
    assert 'kubelet_pod_start_total_duration_seconds_count{cache_outcome="miss"} 1' in text
    assert "vk_provider_image_cache_misses_total 1" in text


async def test_a_pod_failed_by_its_cache_is_stored_but_not_counted_as_started() -> None:
    store, metrics = Store(), NodeMetrics()
    recorder = RegistryStartRecorder(store, metrics)
    writer = asyncio.create_task(recorder.run())
    failed = start("failed")
    failed.images.clear()
    await recorder.record(failed)
    await recorder.flush()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert store.rows["u1"].outcome is CacheOutcome.FAILED
    assert store.rows["u1"].imc_id == "imc-x"
    assert metrics.pod_start_total.count("failed") == 0
    assert not [line for line in metrics.render().splitlines() if line.startswith("vk_provider_pods_started_total")]


def test_image_references_are_stored_normalised_as_the_registry_keeps_them() -> None:
    s = start()
    s.images.append(("Bad Image!", ImageResult("", 0)))  # not a reference: kept as written
    assert [i.reference for i in to_record(s).images] == ["docker.io/library/nginx:1.7.9", "Bad Image!"]


def test_unknown_outcome_is_none() -> None:
    assert to_record(start("weird")).outcome is CacheOutcome.NONE


class FlakyStore(Store):
    def __init__(self) -> None:
        super().__init__()
        self.fail = 2

    async def record_pod_starts(self, records: Sequence[PodStartRecord]) -> list[bool]:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("database is locked")
        return await super().record_pod_starts(records)


async def test_a_failed_write_is_retried_not_lost() -> None:
    store = FlakyStore()
    recorder = RegistryStartRecorder(store, NodeMetrics(), max_backoff=0.01)
    writer = asyncio.create_task(recorder.run())
    await recorder.record(start())
    await recorder.flush()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert list(store.rows) == ["u1"]
    assert recorder.failures == 2


async def test_starts_queued_together_are_stored_in_one_batch() -> None:
    store = Store()
    recorder = RegistryStartRecorder(store, NodeMetrics(), batch=3)
    for i in range(7):
        s = start()
        s.pod = replace(s.pod, uid=f"u{i}")
        await recorder.record(s)
    writer = asyncio.create_task(recorder.run())
    await recorder.flush()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert store.batches == [3, 3, 1]
    assert sorted(store.rows) == [f"u{i}" for i in range(7)]


@contextlib.asynccontextmanager
async def running(recorder: RegistryStartRecorder) -> AsyncIterator[None]:
    """The recorder's writer running for the block, then cancelled."""
    writer = asyncio.create_task(recorder.run())
    try:
        yield
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


def numbered(i: int) -> PodStart:
    s = start()
    s.pod = replace(s.pod, uid=f"u{i}")
    return s


async def test_the_writer_lingers_for_more_starts_and_a_flush_cuts_that_short() -> None:
    store = Store()
    recorder = RegistryStartRecorder(store, NodeMetrics(), linger=60.0)
    async with running(recorder):
        await recorder.record(numbered(0))
        await asyncio.sleep(0)  # the writer takes the first start and waits for more
        await recorder.record(numbered(1))
        await recorder.record(numbered(2))
        assert store.batches == []
        async with asyncio.timeout(5):  # not the 60 s linger
            await recorder.flush()
        assert store.batches == [3]


async def test_a_full_batch_is_stored_without_lingering() -> None:
    store = Store()
    recorder = RegistryStartRecorder(store, NodeMetrics(), batch=3, linger=60.0)
    async with running(recorder):
        for i in range(4):
            await recorder.record(numbered(i))
            await asyncio.sleep(0)
        await await_for(lambda: _async(store.batches == [3]), timeout=5, what="a batch of 3 stored")
        assert sorted(store.rows) == ["u0", "u1", "u2"]  # the fourth waits for more, or a flush


async def _async(value: bool) -> bool:
    return value


class CheckedStore(Store):
    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures  # how many checks fail before they succeed
        self.checks: list[list[str]] = []

    async def recorded_pod_uids(self, uids: Sequence[str]) -> set[str]:
        self.checks.append(list(uids))
        if len(self.checks) <= self.failures:
            raise RuntimeError("database is locked")
        return {uid for uid in uids if uid in self.rows}


async def test_running_pods_taken_over_without_a_record_are_named_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, metrics = CheckedStore(), NodeMetrics()
    store.rows["u0"] = to_record(numbered(0))  # stored by the agent that started it
    recorder = RegistryStartRecorder(store, metrics)
    async with running(recorder):
        for i in range(8):  # a resync adopting them one after another: checked in one query
            recorder.adopted(replace(numbered(i).pod, name=f"p{i}"))
        await await_for(lambda: _async(bool(store.checks)), timeout=5, what="the adopted Pods checked")
        assert store.checks == [[f"u{i}" for i in range(8)]]
        assert recorder.unrecorded == [f"ns/p{i}" for i in range(1, 8)]
        assert "vk_provider_pod_starts_unrecorded_total 7" in metrics.render()
        (warning,) = [r.getMessage() for r in caplog.records if "not in the registry" in r.getMessage()]
        assert warning.startswith("7 Pods were running when the agent started")
        assert warning.endswith("ns/p1, ns/p2, ns/p3, ns/p4, ns/p5 and 2 more")


async def test_a_failed_check_of_adopted_pods_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    store = CheckedStore(failures=2)
    recorder = RegistryStartRecorder(store, NodeMetrics(), max_backoff=0.01)
    async with running(recorder):
        recorder.adopted(numbered(5).pod)
        await await_for(lambda: _async(len(store.checks) == 3), timeout=5, what="the adopted Pod checked thrice")
        await await_for(lambda: _async(recorder.unrecorded == [numbered(5).pod.key]), timeout=5, what="the Pod named")
        assert store.checks == [["u5"]] * 3
    retries = [r.getMessage() for r in caplog.records if "could not check" in r.getMessage()]
    assert len(retries) == 2
    assert all("retrying in" in m for m in retries)


async def test_a_check_of_adopted_pods_that_keeps_failing_is_given_up_and_starts_are_still_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = CheckedStore(failures=1000)
    recorder = RegistryStartRecorder(store, NodeMetrics(), max_backoff=0.01)
    async with running(recorder):
        recorder.adopted(numbered(5).pod)
        await await_for(lambda: _async(len(store.checks) == CHECK_TRIES), timeout=5, what="every try made")
        await recorder.record(numbered(1))
        await recorder.flush()
        assert list(store.rows) == ["u1"]
        assert recorder.unrecorded == []
        assert len(store.checks) == CHECK_TRIES  # no more tries after giving up
    assert any("gave up after 5 tries" in r.getMessage() for r in caplog.records)


class StatusWrites:
    """Stands in for the status reporter's wait_idle: busy until ``idle`` is set."""

    def __init__(self) -> None:
        self.idle = asyncio.Event()
        self.waits = 0

    async def wait_idle(self) -> None:
        self.waits += 1
        await self.idle.wait()


async def test_records_give_way_to_status_writes_then_are_stored() -> None:
    store, writes = Store(), StatusWrites()
    recorder = RegistryStartRecorder(store, NodeMetrics(), linger=0.0, give_way=writes.wait_idle, max_delay=60.0)
    async with running(recorder):
        await recorder.record(numbered(0))
        await await_for(lambda: _async(writes.waits == 1), timeout=5, what="the writer giving way")
        await recorder.record(numbered(1))
        await asyncio.sleep(0)
        assert store.batches == []  # status writes are waiting: the records wait too
        writes.idle.set()
        await await_for(lambda: _async(store.batches == [2]), timeout=5, what="both stored once status is idle")


async def test_records_give_way_for_at_most_max_delay() -> None:
    store, writes = Store(), StatusWrites()  # status never idle
    recorder = RegistryStartRecorder(store, NodeMetrics(), linger=0.0, give_way=writes.wait_idle, max_delay=0.05)
    async with running(recorder):
        await recorder.record(numbered(0))
        await await_for(lambda: _async(store.batches == [1]), timeout=5, what="stored after max_delay")
        assert writes.waits == 1


async def test_a_flush_does_not_give_way() -> None:
    store, writes = Store(), StatusWrites()  # status never idle
    recorder = RegistryStartRecorder(store, NodeMetrics(), linger=0.0, give_way=writes.wait_idle, max_delay=60.0)
    async with running(recorder):
        await recorder.record(numbered(0))
        await await_for(lambda: _async(writes.waits == 1), timeout=5, what="the writer giving way")
        async with asyncio.timeout(5):  # not the 60 s max_delay
            await recorder.flush()
        assert store.batches == [1]
        await recorder.record(numbered(1))  # after the flush, records give way again
        await await_for(lambda: _async(writes.waits == 2), timeout=5, what="the writer giving way again")
        assert store.batches == [1]
