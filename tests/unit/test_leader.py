"""Leader election on a Lease (client-go's rules), with a fake API server and a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vk_provider.controllers.clock import FakeClock
from vk_provider.controllers.leader import (
    ElectionMode,
    LeaderElector,
    LeaderTiming,
    election_wanted,
    leader_identity,
    micro_time,
)

NS, NAME = "kube-system", "vk-provider-imagecaches"


class FakeError(Exception):
    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.is_conflict = status == 409
        self.is_already_exists = status == 409 and reason == "AlreadyExists"
        self.is_transient = status >= 500


class FakeLeaseServer:
    """One Lease with resourceVersions, as the API server keeps it."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.writes: list[dict[str, Any]] = []

    def _store(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {"metadata": {"name": NAME, "namespace": NS, "resourceVersion": str(self.version)}, "spec": spec}
        self.writes.append(dict(spec))
        return self.lease


class FakeLeaseApi:
    """One candidate's view of the server; ``cut`` makes its calls fail, ``hang`` never answer."""

    def __init__(self, server: FakeLeaseServer) -> None:
        self.server = server
        self.cut = False
        self.hang = False
        self.yield_between = False  # let another candidate run between a read and a write

    async def _gate(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.cut:
            raise FakeError(503, "ServiceUnavailable")
        if self.yield_between:
            await asyncio.sleep(0)

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self._gate()
        assert (namespace, name) == (NS, NAME)
        return None if self.server.lease is None else {**self.server.lease}

    async def create(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        await self._gate()
        if self.server.lease is not None:
            raise FakeError(409, "AlreadyExists")
        return self.server._store(spec)

    async def update(self, namespace: str, name: str, spec: dict[str, Any], resource_version: str) -> dict[str, Any]:
        await self._gate()
        assert self.server.lease is not None
        if resource_version != self.server.lease["metadata"]["resourceVersion"]:
            raise FakeError(409, "Conflict")
        return self.server._store(spec)


class Candidate:
    def __init__(self, name: str, server: FakeLeaseServer, clock: FakeClock, timeline: list[tuple[float, str, bool]]):
        self.api = FakeLeaseApi(server)
        self.changes: list[bool] = []

        async def on_change(leading: bool) -> None:
            self.changes.append(leading)
            timeline.append((clock.monotonic(), name, leading))

        self.elector = LeaderElector(
            self.api, identity=f"{name}_0001", clock=clock, namespace=NS, name=NAME, on_change=on_change
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Candidate:
        self.task = asyncio.create_task(self.elector.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Election:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.server = FakeLeaseServer()
        self.timeline: list[tuple[float, str, bool]] = []
        self.candidates: list[Candidate] = []

    def candidate(self, name: str) -> Candidate:
        made = Candidate(name, self.server, self.clock, self.timeline)
        self.candidates.append(made)
        return made

    def leaders(self) -> list[str]:
        return [c.elector.identity for c in self.candidates if c.elector.is_leader]

    def never_two_leaders(self) -> bool:
        acting: set[str] = set()
        for _, name, leading in sorted(self.timeline, key=lambda t: t[0]):
            if leading:
                if acting - {name}:
                    return False
                acting.add(name)
            else:
                acting.discard(name)
        return True


@pytest.fixture
async def election() -> AsyncIterator[Election]:
    made = Election()
    yield made
    for candidate in made.candidates:
        if candidate.task is not None:
            await candidate.stop()


async def test_a_lone_candidate_creates_the_lease_and_renews_it(election: Election) -> None:
    a = election.candidate("a").start()
    await election.clock.advance(0)
    assert a.elector.is_leader
    assert a.changes == [True]
    lease = election.server.lease
    assert lease is not None
    assert lease["spec"] == {
        "holderIdentity": "a_0001",
        "leaseDurationSeconds": 15,
        "acquireTime": micro_time(election.clock.now()),
        "renewTime": micro_time(election.clock.now()),
        "leaseTransitions": 0,
    }
    await election.clock.advance(30)
    renewals = election.server.writes[1:]
    assert len(renewals) == 6  # every 5 s
    assert {w["holderIdentity"] for w in renewals} == {"a_0001"}
    assert {w["acquireTime"] for w in renewals} == {lease["spec"]["acquireTime"]}
    assert renewals[-1]["renewTime"] == micro_time(election.clock.now())
    assert a.changes == [True]


async def test_of_two_candidates_exactly_one_leads(election: Election) -> None:
    a = election.candidate("a")
    b = election.candidate("b")
    a.api.yield_between = b.api.yield_between = True
    a.start()
    b.start()
    for _ in range(30):
        await election.clock.advance(2)
        assert len(election.leaders()) == 1
    assert election.never_two_leaders()


async def test_a_lost_race_is_a_conflict_and_no_leadership() -> None:
    clock = FakeClock()
    server = FakeLeaseServer()
    server._store({"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 3})
    electors = [
        LeaderElector(FakeLeaseApi(server), identity=f"{n}_1", clock=clock, namespace=NS, name=NAME) for n in "ab"
    ]
    for elector in electors:
        assert isinstance(elector.api, FakeLeaseApi)
        elector.api.yield_between = True
    results = await asyncio.gather(*(e.try_acquire_or_renew() for e in electors), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["FakeError", "bool"]
    assert [r.is_conflict for r in results if isinstance(r, FakeError)] == [True]
    assert server.lease is not None
    assert server.lease["spec"]["leaseTransitions"] == 4


async def test_a_silent_leader_is_replaced_after_the_lease_duration_and_steps_down_first(election: Election) -> None:
    a = election.candidate("a").start()
    await election.clock.advance(0)
    election.candidate("b").start()
    await election.clock.advance(20)
    assert election.leaders() == ["a_0001"]
    cut_at = election.clock.monotonic()
    a.api.cut = True  # a can no longer reach the API server
    await election.clock.advance(30)
    assert election.leaders() == ["b_0001"]
    a_stepped_down = next(t for t, who, leading in election.timeline if who == "a" and not leading)
    b_took_over = next(t for t, who, leading in election.timeline if who == "b" and leading)
    assert a_stepped_down - cut_at <= LeaderTiming().renew_deadline_seconds + LeaderTiming().retry_interval_seconds
    assert a_stepped_down < b_took_over <= cut_at + 15 + 2 + 5
    assert election.server.lease is not None
    assert election.server.lease["spec"]["leaseTransitions"] == 1
    assert election.never_two_leaders()


async def test_a_leader_whose_api_calls_hang_steps_down_by_its_deadline(election: Election) -> None:
    a = election.candidate("a").start()
    await election.clock.advance(1)
    a.api.hang = True
    await election.clock.advance(LeaderTiming().renew_deadline_seconds)
    assert a.changes == [True, False]
    assert not a.elector.is_leader


async def test_a_renewing_holder_keeps_the_lease_whatever_its_clock_says(election: Election) -> None:
    """Expiry is measured on the candidate's own clock from when the record last changed."""
    a = election.candidate("a")
    far_behind = FakeClock(start=election.clock.now().replace(year=2001))
    a.elector.clock = far_behind  # renewTime written hours in the past
    a.start()
    await election.clock.advance(0)
    b = election.candidate("b").start()
    for _ in range(12):
        await far_behind.advance(5)
        await election.clock.advance(5)
    assert election.leaders() == ["a_0001"]
    assert b.changes == []


async def test_a_clean_shutdown_releases_and_another_takes_over_at_once(election: Election) -> None:
    a = election.candidate("a").start()
    await election.clock.advance(0)
    election.candidate("b").start()
    await election.clock.advance(7)
    await a.stop()
    assert a.changes == [True, False]
    lease = election.server.lease
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == ""
    stopped_at = election.clock.monotonic()
    await election.clock.advance(LeaderTiming().retry_interval_seconds)
    assert election.leaders() == ["b_0001"]
    assert election.timeline[-1][0] - stopped_at <= LeaderTiming().retry_interval_seconds
    assert election.never_two_leaders()


async def test_a_failing_listener_does_not_stop_the_election(election: Election) -> None:
    calls: list[bool] = []

    async def broken(leading: bool) -> None:
        calls.append(leading)
        raise RuntimeError("boom")

    api = FakeLeaseApi(election.server)
    elector = LeaderElector(api, identity="a_1", clock=election.clock, namespace=NS, name=NAME, on_change=broken)
    task = asyncio.create_task(elector.run())
    try:
        await election.clock.advance(12)
        assert elector.is_leader
        assert calls == [True]
        assert len(election.server.writes) == 3  # created, then renewed at 5 s and 10 s
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("mode", "wanted"), [("auto", True), ("always", True), ("never", False)])
def test_when_an_election_is_wanted(mode: ElectionMode, wanted: bool) -> None:
    # Whatever the registry: agents with a SQLite file each share the cluster's ImageCache objects too.
    assert election_wanted(mode) is wanted


def test_identities_are_the_node_and_a_random_suffix() -> None:
    rng = random.Random(7)
    first, second = leader_identity("vk-1", rng), leader_identity("vk-1", rng)
    assert first.startswith("vk-1_")
    assert len(first) == len("vk-1_") + 8
    assert first != second


@pytest.mark.parametrize(
    ("timing", "problems"),
    [
        (LeaderTiming(), 0),
        (LeaderTiming.for_lease(15, 5), 0),
        (LeaderTiming.for_lease(30, 10), 0),
        (LeaderTiming.for_lease(15, 12), 1),
        (LeaderTiming(retry_interval_seconds=0), 1),
        (LeaderTiming(lease_duration_seconds=0, renew_interval_seconds=1, renew_deadline_seconds=2), 2),
    ],
)
def test_timing_problems(timing: LeaderTiming, problems: int) -> None:
    assert len(timing.problems()) == problems
    if problems == 0:
        assert timing.renew_deadline_seconds < timing.lease_duration_seconds


def test_for_lease_keeps_client_gos_proportions() -> None:
    assert LeaderTiming.for_lease(15, 5) == LeaderTiming()


class ForbiddenLeases:
    """RBAC without the election's Lease: every call is 403."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, namespace: str, name: str) -> Any:
        self.calls += 1
        raise FakeError(403, "Forbidden")

    async def create(self, namespace: str, name: str, spec: Any) -> Any:
        raise FakeError(403, "Forbidden")

    async def update(self, namespace: str, name: str, spec: Any, resource_version: str) -> Any:
        raise FakeError(403, "Forbidden")


async def test_a_forbidden_lease_is_told_once_as_an_error_and_never_led(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    api = ForbiddenLeases()
    elector = LeaderElector(api, identity="a_1", clock=clock, namespace=NS, name=NAME)
    task = asyncio.create_task(elector.run())
    try:
        for _ in range(5):
            await clock.advance(2)
        assert api.calls >= 5  # it keeps trying (the permission may be granted later)
        assert not elector.is_leader
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        assert "builds no ImageCache" in errors[0]
        assert "caches.leader_election: never" in errors[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
