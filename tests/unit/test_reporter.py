"""The status reporter: one writer, coalesced, no-ops skipped, transient errors retried."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.test_node_controller import FakeKubeError
from vk_provider.controllers.reporter import StatusReporter


class SlowApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next: list[int] = []
        self.in_flight = 0
        self.max_in_flight_per_pod = 0

    async def patch_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.max_in_flight_per_pod = max(self.max_in_flight_per_pod, self.in_flight)
        try:
            await self.gate.wait()
            if self.fail_next:
                raise FakeKubeError(self.fail_next.pop(0))
            self.calls.append((uid, status))
            return {}
        finally:
            self.in_flight -= 1


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_coalesces_and_skips_noops() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=4)
    task = asyncio.create_task(reporter.run())
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
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_transient_errors_are_retried_and_not_found_drops() -> None:
    api = SlowApi()
    api.fail_next = [503]
    reporter = StatusReporter(api, workers=1, max_backoff=0.01)
    task = asyncio.create_task(reporter.run())
    reporter.publish("u1", "ns", "p", {"phase": "Running"})
    await asyncio.wait_for(reporter.flushed("u1"), 5)
    assert api.calls == [("u1", {"phase": "Running"})]
    api.fail_next = [404]
    reporter.publish("u1", "ns", "p", {"phase": "Succeeded"})
    await asyncio.wait_for(reporter.flushed("u1"), 5)
    assert len(api.calls) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_seen_status_is_not_resent_and_forget_discards() -> None:
    api = SlowApi()
    reporter = StatusReporter(api, workers=2)
    task = asyncio.create_task(reporter.run())
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
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
