"""The status reporter: one writer, coalesced, no-ops skipped, transient errors retried."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from tests.unit.test_node_controller import FakeKubeError
from vk_provider.controllers.reporter import StatusReporter


class SlowApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.annotated: list[tuple[str, dict[str, str]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next: list[int] = []
        self.in_flight = 0
        self.max_in_flight_per_pod = 0
        self.version = 100  # the resourceVersion each accepted write answers with, then counts on

    async def patch_status(
        self,
        namespace: str,
        name: str,
        uid: str,
        status: dict[str, Any] | None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        self.in_flight += 1
        self.max_in_flight_per_pod = max(self.max_in_flight_per_pod, self.in_flight)
        try:
            await self.gate.wait()
            if self.fail_next:
                raise FakeKubeError(self.fail_next.pop(0))
            if status is not None:
                self.calls.append((uid, status))
            if annotations:
                self.annotated.append((uid, dict(annotations)))
            self.version += 1
            return {"metadata": {"resourceVersion": str(self.version)}}
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def running(reporter: StatusReporter) -> AsyncIterator[StatusReporter]:
    """The reporter's writers run inside; cancelled on the way out."""
    task = asyncio.create_task(reporter.run())
    try:
        yield reporter
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_coalesces_and_skips_noops() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=4)
    async with running(reporter):
        api.gate.clear()
        reporter.publish("u1", "ns", "p", {"phase": "Pending"})
        await settle()
        for phase in ("A", "B", "Running"):  # arrive while the first write is in flight
            reporter.publish("u1", "ns", "p", {"phase": phase})
        api.gate.set()
        await reporter.flushed("u1")
        assert [s["phase"] for _, s in api.calls] == ["Pending", "Running"]
        reporter.publish("u1", "ns", "p", {"phase": "Running"})
        await settle()
        await reporter.flushed("u1")
        assert len(api.calls) == 2
        assert reporter.skipped == 1
        assert api.max_in_flight_per_pod == 1


async def test_transient_errors_are_retried_and_not_found_drops() -> None:
    api = SlowApi()
    api.fail_next = [503]
    reporter = StatusReporter(api, workers=1, max_backoff=0.01)
    async with running(reporter):
        reporter.publish("u1", "ns", "p", {"phase": "Running"})
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert api.calls == [("u1", {"phase": "Running"})]
        api.fail_next = [404]
        reporter.publish("u1", "ns", "p", {"phase": "Succeeded"})
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert len(api.calls) == 1


async def test_seen_status_is_not_resent_and_forget_discards() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=2)
    async with running(reporter):
        reporter.seen("u1", "ns", "p", {"phase": "Running"})
        reporter.publish("u1", "ns", "p", {"phase": "Running"})
        await settle()
        assert api.calls == []
        api.gate.clear()
        reporter.publish("u2", "ns", "q", {"phase": "Pending"})
        await settle()
        reporter.publish("u2", "ns", "q", {"phase": "Running"})
        reporter.forget("u2")
        api.gate.set()
        await settle()
        assert [s["phase"] for _, s in api.calls] == ["Pending"]


async def test_versions_no_newer_than_the_last_write_are_the_reporters_own() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=1)
    async with running(reporter):
        assert not reporter.written("u1", "5")  # nothing written yet: an event must be read
        reporter.seen("u1", "ns", "p", {"phase": "Running"}, "90")  # adopted at version 90
        assert reporter.written("u1", "90")
        assert not reporter.written("u1", "91")
        reporter.publish("u1", "ns", "p", {"phase": "Succeeded"})
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert reporter.written("u1", "101")  # the write's answer
        assert not reporter.written("u1", "102")  # someone wrote after it
        assert not reporter.written("u1", "not-a-number")
        # Told another writer changed it, the same status is written again rather than skipped.
        reporter.rewrite("u1")
        reporter.publish("u1", "ns", "p", {"phase": "Succeeded"})
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert [s["phase"] for _, s in api.calls] == ["Succeeded", "Succeeded"]


async def test_annotations_ride_on_the_next_status_write() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=2)
    async with running(reporter):
        api.gate.clear()
        reporter.publish("u1", "ns", "p", {"phase": "Pending"})
        await settle()  # the Pending write is in flight
        reporter.annotate("u1", "ns", "p", {"k8s.aliyun.com/eci-matched-image-cache": "imc-1"})
        reporter.publish("u1", "ns", "p", {"phase": "Running"})
        api.gate.set()
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert [s["phase"] for _, s in api.calls] == ["Pending", "Running"]
        assert api.annotated == [("u1", {"k8s.aliyun.com/eci-matched-image-cache": "imc-1"})]
        # Annotations alone (status unchanged) are still written, once.
        reporter.publish("u1", "ns", "p", {"phase": "Running"})
        reporter.annotate("u1", "ns", "p", {"a": "1"})
        reporter.annotate("u1", "ns", "p", {"b": "2"})
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert len(api.calls) == 2
        assert api.annotated[-1] == ("u1", {"a": "1", "b": "2"})


async def test_annotations_survive_a_retry_superseded_by_a_newer_status() -> None:
    api = SlowApi()
    api.fail_next = [503]
    reporter = StatusReporter(api, workers=1, max_backoff=0.01)
    async with running(reporter):
        api.gate.clear()
        reporter.publish("u1", "ns", "p", {"phase": "Pending"})
        reporter.annotate("u1", "ns", "p", {"a": "1"})
        await settle()
        reporter.publish("u1", "ns", "p", {"phase": "Running"})  # arrives while the failing write is in flight
        api.gate.set()
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert api.calls == [("u1", {"phase": "Running"})]
        assert api.annotated == [("u1", {"a": "1"})]


async def test_settle_window_turns_a_burst_of_states_into_one_write() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=2, settle_seconds=0.05)
    async with running(reporter):
        for phase in ("Pending", "ContainerCreating", "Running"):
            reporter.publish("u1", "ns", "p", {"phase": phase})
            await settle()
        assert api.calls == []  # nothing sent inside the window
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert api.calls == [("u1", {"phase": "Running"})]


async def test_wait_idle_returns_only_when_no_status_is_pending() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=1)
    async with running(reporter):
        await asyncio.wait_for(reporter.wait_idle(), 1)  # nothing to write: at once
        api.gate.clear()
        reporter.publish("u1", "ns", "p", {"phase": "Pending"})
        reporter.publish("u2", "ns", "q", {"phase": "Pending"})
        waiter = asyncio.create_task(reporter.wait_idle())
        await settle()
        assert not waiter.done()
        assert reporter.busy() == 2
        api.gate.set()
        await asyncio.wait_for(waiter, 5)
        assert reporter.busy() == 0
        assert len(api.calls) == 2
        reporter.publish("u3", "ns", "r", {"phase": "Pending"})
        reporter.forget("u3")  # a forgotten Pod does not keep the reporter busy
        await asyncio.wait_for(reporter.wait_idle(), 1)


async def test_a_status_replaced_before_its_turn_is_never_rendered() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=1, settle_seconds=0.05)
    async with running(reporter):
        rendered: list[str] = []

        def render(phase: str) -> Callable[[], dict[str, Any]]:
            def make() -> dict[str, Any]:
                rendered.append(phase)
                return {"phase": phase}

            return make

        reporter.publish("u1", "ns", "p", render("Pending"))
        reporter.publish("u1", "ns", "p", render("Running"))
        await asyncio.wait_for(reporter.flushed("u1"), 5)
        assert rendered == ["Running"]
        assert api.calls == [("u1", {"phase": "Running"})]
