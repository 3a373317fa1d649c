"""The pod controller and its workers with fakes and a fake clock (no API server, no real time)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from vk_provider.controllers.clock import FakeClock
from vk_provider.controllers.pods import (
    Allocatable,
    CacheDecision,
    ImagePullError,
    ImageResult,
    PodController,
    PodStart,
    PodTiming,
)
from vk_provider.controllers.reporter import StatusReporter
from vk_provider.domain.events import EventSpec
from vk_provider.domain.lifecycle import PodState
from vk_provider.domain.node import rfc3339
from vk_provider.domain.podspec import ContainerSpec, PodFacts


class Api:
    def __init__(self) -> None:
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.version = 100  # the resourceVersion of the last write
        self.hold: asyncio.Event | None = None  # set: writes are answered once it is
        self.deleted: list[str] = []
        self.annotations: dict[str, dict[str, str]] = {}

    async def patch_status(
        self,
        namespace: str,
        name: str,
        uid: str,
        status: dict[str, Any] | None,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if status is not None:
            self.statuses.setdefault(name, []).append(status)
        if annotations:
            self.annotations.setdefault(name, {}).update(annotations)
        self.version += 1
        version = str(self.version)
        if self.hold is not None:
            await self.hold.wait()
        return {"metadata": {"resourceVersion": version}}

    async def delete_now(self, namespace: str, name: str, uid: str) -> None:
        self.deleted.append(name)

    def last(self, name: str) -> dict[str, Any]:
        return self.statuses[name][-1]


class Events:
    def __init__(self) -> None:
        self.items: list[EventSpec] = []

    def record(self, spec: EventSpec, now: datetime | None = None) -> None:
        self.items.append(spec)

    def reasons(self, pod: str) -> list[str]:
        return [e.reason for e in self.items if e.pod_name == pod]


class Images:
    """Each pull takes ``seconds`` of simulated time; images named in ``broken`` fail."""

    def __init__(
        self, clock: FakeClock, seconds: float = 10.0, broken: dict[str, ImagePullError] | None = None
    ) -> None:
        self.clock = clock
        self.seconds = seconds
        self.broken = broken or {}
        self.pulls: list[str] = []
        self.present: set[str] = set()

    async def for_pod(self, pod: PodFacts, decision: CacheDecision) -> Images:
        return self

    async def attach_snapshot(self) -> float:
        return 0.0

    def will_pull(self, container: ContainerSpec) -> bool:
        return container.image not in self.present

    def ran_before(self, container: ContainerSpec) -> None:
        self.present.add(container.image)

    async def pull(self, container: ContainerSpec) -> ImageResult:
        if container.image in self.present:
            return ImageResult("id@sha256:x", 1000, present=True)
        self.pulls.append(container.image)
        if container.image in self.broken:
            raise self.broken[container.image]
        await self.clock.sleep(self.seconds)
        return ImageResult("id@sha256:x", 1000, seconds=self.seconds, downloaded=1000)


class Harness:
    def __init__(self, clock: FakeClock, images: Images, pods: int = 10) -> None:
        self.api = Api()
        self.events = Events()
        self.reporter = StatusReporter(self.api, workers=2)
        self.ctl = PodController(
            node_name="vk",
            host_ip="10.0.0.1",
            pod_cidr="10.234.0.0/24",
            allocatable=Allocatable(cpu_milli=1000, memory=2**30, pods=pods),
            api=self.api,
            reporter=self.reporter,
            events=self.events,
            images=images,
            clock=clock,
            timing=PodTiming(time_scale=1.0, create_seconds=0.0, start_seconds=1.0),
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        """The reporter and the controller run inside; cancelled on the way out."""
        tasks = [asyncio.create_task(self.reporter.run()), asyncio.create_task(self.ctl.run())]
        try:
            yield self
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(clock: FakeClock) -> AsyncIterator[Harness]:
    h = Harness(clock, Images(clock))
    async with h.running():
        yield h


def pod(
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    policy: str = "Always",
    cpu: str = "100m",
    image: str = "nginx:1.7.9",
    deleting: bool = False,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": f"uid-{name}", "namespace": "ns", "name": name, "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {
        "metadata": meta,
        "spec": {
            "nodeName": "vk",
            "restartPolicy": policy,
            "containers": [{"name": "c", "image": image, "resources": {"requests": {"cpu": cpu}}}],
            **spec,
        },
        "status": status or {"phase": "Pending"},
    }


def running_state(t0: datetime) -> PodState:
    """Pod a, its one container c (nginx:1.7.9) started and ready at ``t0``: what an earlier run wrote."""
    from vk_provider.domain import lifecycle as lc

    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=t0)  # fmt: skip
    return lc.became_ready(lc.started(state, "c", "uid-a", "x", t0), "c", t0)


async def test_pod_runs_through_pull_create_start(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(5)
    assert harness.api.last("a")["phase"] == "Pending"
    assert harness.api.last("a")["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    await clock.advance(10)
    status = harness.api.last("a")
    assert status["phase"] == "Running"
    assert status["conditions"][1] == {**status["conditions"][1], "type": "Ready", "status": "True"}
    assert harness.events.reasons("a") == ["Pulling", "Pulled", "Created", "Started"]
    # coalescing: accepted, running (started, then ready in the same instant) -> few writes
    assert len(harness.api.statuses["a"]) <= 3


async def test_a_status_another_writer_changed_is_written_again_and_a_label_change_is_not(
    harness: Harness, clock: FakeClock
) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(20)
    ours = harness.api.last("a")
    assert ours["phase"] == "Running"
    writes = len(harness.api.statuses["a"])
    # A label added by someone: the status is what the node wrote, so nothing is written.
    labelled = pod("a", status=ours)
    labelled["metadata"]["labels"] = {"team": "web"}
    await harness.ctl.upsert(labelled)
    await clock.advance(5)
    assert len(harness.api.statuses["a"]) == writes
    # A readiness gate's condition, set by its own controller, is not the node's to undo.
    gated = dict(ours)
    gated["conditions"] = [*ours["conditions"], {"type": "target-health.example.com/web", "status": "False"}]
    await harness.ctl.upsert(pod("a", status=gated))
    await clock.advance(5)
    assert len(harness.api.statuses["a"]) == writes
    # The node controller marks the Pod not ready while the node was silent (as kube-controller-manager).
    marked = dict(ours)
    marked["conditions"] = [{**c, "status": "False"} if c["type"] == "Ready" else c for c in ours["conditions"]]
    await harness.ctl.upsert(pod("a", status=marked))
    await clock.advance(5)
    assert len(harness.api.statuses["a"]) == writes + 1
    assert harness.api.last("a") == ours  # the node's status again, though it equals what it wrote before


async def test_a_readiness_gate_holds_ready_until_its_condition_is_true_and_the_node_keeps_it(
    harness: Harness, clock: FakeClock
) -> None:
    gate = "target-health.example.com/web"
    spec: dict[str, Any] = {"readinessGates": [{"conditionType": gate}]}
    await harness.ctl.resync([pod("a", **spec)])
    await clock.advance(20)
    ours = harness.api.last("a")
    ready = next(c for c in ours["conditions"] if c["type"] == "Ready")
    assert (ours["phase"], ready["status"], ready["reason"]) == ("Running", "False", "ReadinessGatesNotReady")
    assert ready["message"] == f'corresponding condition of pod readiness gate "{gate}" does not exist.'
    # The gate's controller says False first: Ready says so.
    false = {"type": gate, "status": "False"}
    await harness.ctl.upsert(pod("a", status={**ours, "conditions": [*ours["conditions"], false]}, **spec))
    await clock.advance(1)
    ours = harness.api.last("a")
    ready = next(c for c in ours["conditions"] if c["type"] == "Ready")
    assert ready["message"] == f'the status of pod readiness gate "{gate}" is not "True", but False'
    assert false in ours["conditions"]  # the node's write carries it (the API server keeps it)
    writes = len(harness.api.statuses["a"])
    # Then True: Ready follows, and the node's write keeps it.
    theirs = {"type": gate, "status": "True", "lastTransitionTime": "2026-01-01T00:00:20Z"}
    kept = [c for c in ours["conditions"] if c["type"] != gate]
    await harness.ctl.upsert(pod("a", status={**ours, "conditions": [*kept, theirs]}, **spec))
    await clock.advance(1)
    assert len(harness.api.statuses["a"]) == writes + 1
    written = harness.api.last("a")
    assert next(c for c in written["conditions"] if c["type"] == "Ready")["status"] == "True"
    assert theirs in written["conditions"]
    # Deleted: the final status still carries it.
    await harness.ctl.upsert(pod("a", deleting=True, status=written, **spec))
    await clock.advance(1)
    assert theirs in harness.api.last("a")["conditions"]


async def test_the_nodes_own_writes_come_back_unread_and_a_gates_change_with_one_is_taken(
    harness: Harness, clock: FakeClock
) -> None:
    from vk_provider.controllers.router import PodRouter

    gate = "target-health.example.com/web"
    gated: dict[str, Any] = {"readinessGates": [{"conditionType": gate}]}
    await harness.ctl.resync([pod("gated", **gated), pod("plain")])
    await clock.advance(20)
    router = PodRouter([harness.ctl])
    last = str(harness.api.version)
    for uid in ("uid-plain", "uid-gated"):
        version = harness.reporter._entries[uid].version
        assert version is not None
        assert router.tracks(uid, str(version))  # its own write coming back: not read
        assert not router.tracks(uid, str(version - 1))  # an older version may hold another writer's change
    # The node's own write coming back, with the gate's condition another writer set meanwhile:
    # taken into the state (Ready follows it), but no "changed by another writer" rewrite.
    ours = harness.api.last("gated")
    theirs = {"type": gate, "status": "True"}
    echo = pod("gated", status={**ours, "conditions": [*ours["conditions"], theirs]}, **gated)
    echo["metadata"]["resourceVersion"] = last
    writes = len(harness.api.statuses["gated"])
    await harness.ctl.upsert(echo)
    await clock.advance(1)
    assert len(harness.api.statuses["gated"]) == writes + 1
    assert next(c for c in harness.api.last("gated")["conditions"] if c["type"] == "Ready")["status"] == "True"


async def test_the_nodes_own_write_seen_before_its_answer_is_not_taken_for_another_writers(
    harness: Harness, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vk_provider.controllers.pods")
    harness.api.hold = asyncio.Event()  # the watch brings each write back before its answer
    await harness.ctl.resync([pod("a")])
    await clock.advance(20)  # Running by now; the first write (Pending) still waits for its answer
    sending = harness.reporter.sending("uid-a")
    assert sending is not None
    assert sending["phase"] == "Pending"
    await harness.ctl.upsert(pod("a", status=sending))
    harness.api.hold.set()
    await clock.advance(5)
    assert "changed by another writer" not in caplog.text
    assert [s["phase"] for s in harness.api.statuses["a"]] == ["Pending", "Running"]
    assert harness.reporter.sending("uid-a") is None


def test_a_status_summary_reads_the_api_servers_copy_as_the_rendered_one() -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=t0)  # fmt: skip
    state = lc.became_ready(lc.started(state, "c", "uid-a", "x", t0), "c", t0)
    rendered = lc.render_status(state)
    # What the API server gives back: nulls dropped, its own fields added, conditions in its order.
    served = {k: v for k, v in rendered.items() if v is not None} | {"qosClass": "BestEffort"}
    served["conditions"] = list(
        reversed([{k: v for k, v in c.items() if v is not None} for c in rendered["conditions"]])
    )
    assert lc.status_summary(served) == lc.status_summary(rendered)
    assert lc.status_summary({**served, "phase": "Failed", "reason": "Evicted"}) != lc.status_summary(rendered)


async def test_admission_out_of_cpu_and_pods(clock: FakeClock) -> None:
    h = Harness(clock, Images(clock), pods=2)
    async with h.running():
        await h.ctl.resync([pod("a", cpu="600m"), pod("b", cpu="600m"), pod("c", cpu="400m"), pod("d", cpu="1m")])
        await clock.advance(1)
        assert h.api.last("b")["phase"] == "Failed"
        assert h.api.last("b")["reason"] == "OutOfcpu"
        assert h.api.last("d")["reason"] == "OutOfpods"
        assert h.api.last("c")["phase"] == "Pending"  # exactly fills the node: 600m + 400m = 1 core, 2 Pods
        assert h.api.last("a")["phase"] == "Pending"
        assert "OutOfcpu" in h.events.reasons("b")


async def test_exit_code_with_never_and_crash_loop_with_always(harness: Harness, clock: FakeClock) -> None:
    ann = {"vk-provider.io/run-seconds": "3", "vk-provider.io/exit-code": "1"}
    await harness.ctl.resync([pod("never", annotations=ann, policy="Never"), pod("always", annotations=ann)])
    await clock.advance(20)
    never = harness.api.last("never")
    assert never["phase"] == "Failed"
    assert never["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1
    await clock.advance(200)
    always = harness.api.last("always")["containerStatuses"][0]
    assert always["restartCount"] >= 3
    assert always["lastState"]["terminated"]["exitCode"] == 1
    # back-off doubles: 10+20+40+80 = 150 s of waiting in the first ~220 s leaves room for ~4-5 restarts
    assert always["restartCount"] <= 5
    assert harness.events.reasons("always").count("BackOff") == always["restartCount"]


async def test_deletion_stops_then_deletes(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(30)
    await harness.ctl.upsert(pod("a", deleting=True))
    await clock.advance(1)
    assert harness.api.deleted == ["a"]
    assert "Killing" in harness.events.reasons("a")
    assert "terminated" in harness.api.last("a")["containerStatuses"][0]["state"]
    await harness.ctl.delete(pod("a"))
    assert "uid-a" not in harness.ctl.workers


async def test_deleted_while_pulling_cancels_the_pull(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(2)
    await harness.ctl.upsert(pod("a", deleting=True))
    await clock.advance(1)
    assert harness.api.deleted == ["a"]
    assert "Started" not in harness.events.reasons("a")


async def test_a_shutdown_while_a_deletion_is_cancelling_the_pull_ends_the_pod_task(
    harness: Harness, clock: FakeClock
) -> None:
    # The deletion's cancellation is taken back to terminate the Pod; the shutdown's is not.
    await harness.ctl.resync([pod("a")])
    await clock.advance(2)
    task = harness.ctl.workers["uid-a"].task
    assert task is not None
    await harness.ctl.upsert(pod("a", deleting=True))
    task.cancel()  # the agent stopping, before the Pod's task ran again
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert harness.api.deleted == []


async def test_a_deleted_pod_terminates_with_no_cancellation_left_pending(harness: Harness, clock: FakeClock) -> None:
    pending: list[int] = []
    delete_now = harness.api.delete_now

    async def deleting(namespace: str, name: str, uid: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        pending.append(task.cancelling())  # timeouts inside the termination rely on 0
        await delete_now(namespace, name, uid)

    harness.api.delete_now = deleting  # type: ignore[method-assign]
    await harness.ctl.resync([pod("a")])
    await clock.advance(2)
    await harness.ctl.upsert(pod("a", deleting=True))
    await harness.ctl.upsert(pod("a", deleting=True))  # a second notice changes nothing
    await clock.advance(1)
    assert pending == [0]


DEADLINE = "Pod was active on the node longer than the specified deadline"


async def test_a_pod_past_its_active_deadline_is_stopped_and_failed_not_deleted(
    harness: Harness, clock: FakeClock
) -> None:
    await harness.ctl.resync([pod("a", activeDeadlineSeconds=60), pod("b")])
    await clock.advance(59)
    assert harness.api.last("a")["phase"] == "Running"
    await clock.advance(2)
    status = harness.api.last("a")
    assert (status["phase"], status["reason"], status["message"]) == ("Failed", "DeadlineExceeded", DEADLINE)
    assert "terminated" in status["containerStatuses"][0]["state"]
    assert harness.events.reasons("a")[-2:] == ["DeadlineExceeded", "Killing"]
    assert next(e for e in harness.events.items if e.reason == "DeadlineExceeded").type == "Normal"  # the kubelet's
    assert harness.api.deleted == []  # a Failed Pod stays, for its owner to see
    assert harness.api.last("b")["phase"] == "Running"  # no deadline: runs on
    assert harness.ctl.used()[2] == 1  # the failed Pod holds no room
    await clock.advance(600)
    assert harness.events.reasons("a").count("DeadlineExceeded") == 1


async def test_a_deadline_counts_while_the_image_is_still_being_pulled(clock: FakeClock) -> None:
    harness = Harness(clock, Images(clock, seconds=100))
    async with harness.running():
        await harness.ctl.resync([pod("slow", activeDeadlineSeconds=30)])
        await clock.advance(31)
        status = harness.api.last("slow")
        assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
        assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}  # never ran
        assert "Started" not in harness.events.reasons("slow")
        await clock.advance(100)
        assert harness.api.last("slow")["phase"] == "Failed"
        assert "Started" not in harness.events.reasons("slow")


async def test_a_pod_that_ends_or_is_deleted_before_its_deadline_is_not_failed_by_it(
    harness: Harness, clock: FakeClock
) -> None:
    done = {"vk-provider.io/run-seconds": "5", "vk-provider.io/exit-code": "0"}
    await harness.ctl.resync(
        [pod("done", annotations=done, policy="Never", activeDeadlineSeconds=60), pod("gone", activeDeadlineSeconds=60)]
    )
    await clock.advance(20)
    assert harness.api.last("done")["phase"] == "Succeeded"
    await harness.ctl.upsert(pod("gone", deleting=True, activeDeadlineSeconds=60))
    await clock.advance(100)
    assert harness.api.deleted == ["gone"]
    assert "DeadlineExceeded" not in harness.events.reasons("done") + harness.events.reasons("gone")
    assert harness.api.last("done")["phase"] == "Succeeded"
    assert all(w._deadline is None for w in harness.ctl.workers.values())


async def test_past_its_deadline_a_pod_is_failed_at_once_then_its_containers_stop(
    harness: Harness, clock: FakeClock
) -> None:
    slow = {"vk-provider.io/stop-seconds": "50"}
    await harness.ctl.resync([pod("a", annotations=slow, activeDeadlineSeconds=60)])
    await clock.advance(61)
    status = harness.api.last("a")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], status["reason"], ready["status"]) == ("Failed", "DeadlineExceeded", "False")
    assert "running" in status["containerStatuses"][0]["state"]  # still stopping
    await clock.advance(50)
    assert "terminated" in harness.api.last("a")["containerStatuses"][0]["state"]
    assert harness.api.last("a")["phase"] == "Failed"


async def test_a_crash_looping_pod_past_its_deadline_keeps_its_last_run(harness: Harness, clock: FakeClock) -> None:
    crashing = {"vk-provider.io/run-seconds": "3", "vk-provider.io/exit-code": "1"}
    await harness.ctl.resync([pod("a", annotations=crashing, activeDeadlineSeconds=18)])
    await clock.advance(19)  # started at 11 s, exited at 14 s, in its 10 s back-off
    c = harness.api.last("a")["containerStatuses"][0]
    assert harness.api.last("a")["reason"] == "DeadlineExceeded"
    assert c["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert c["lastState"]["terminated"]["exitCode"] == 1


async def test_a_deadline_set_or_shortened_on_a_running_pod_counts_from_its_start(
    harness: Harness, clock: FakeClock
) -> None:
    await harness.ctl.resync([pod("set"), pod("shortened", activeDeadlineSeconds=100000)])
    await clock.advance(30)
    for name in ("set", "shortened"):  # kubectl patch: the API server allows setting or lowering it
        await harness.ctl.upsert(pod(name, status=harness.api.last(name), activeDeadlineSeconds=20))
    await clock.advance(1)
    for name in ("set", "shortened"):
        assert (harness.api.last(name)["phase"], harness.api.last(name)["reason"]) == ("Failed", "DeadlineExceeded")


async def test_a_pod_taken_again_before_it_ran_keeps_its_start_time_and_deadline(clock: FakeClock) -> None:
    harness = Harness(clock, Images(clock, seconds=100))
    async with harness.running():
        first = "2026-01-01T00:00:00Z"  # what the run before the agent's restart gave it
        await clock.advance(40)
        await harness.ctl.resync([pod("a", status={"phase": "Pending", "startTime": first}, activeDeadlineSeconds=60)])
        await clock.advance(1)
        assert harness.api.last("a")["startTime"] == first
        await clock.advance(20)  # 60 s from its startTime, not from now
        assert (harness.api.last("a")["phase"], harness.api.last("a")["reason"]) == ("Failed", "DeadlineExceeded")


async def test_a_pod_adopted_past_its_deadline_fails_at_once(harness: Harness, clock: FakeClock) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = running_state(t0)
    await clock.advance(100)  # the agent was down past the deadline
    await harness.ctl.resync([pod("a", status=lc.render_status(state), activeDeadlineSeconds=60)])
    await clock.advance(1)
    assert (harness.api.last("a")["phase"], harness.api.last("a")["reason"]) == ("Failed", "DeadlineExceeded")


async def test_a_host_network_pod_has_the_nodes_ip(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("host", hostNetwork=True), pod("own")])
    await clock.advance(20)
    host, own = harness.api.last("host"), harness.api.last("own")
    assert (host["podIP"], host["podIPs"], host["hostIP"]) == ("10.0.0.1", [{"ip": "10.0.0.1"}], "10.0.0.1")
    assert own["podIP"].startswith("10.234.0.")
    assert len(harness.ctl.ips) == 1  # only the other Pod took an address from the range
    await harness.ctl.delete(pod("host"))
    assert len(harness.ctl.ips) == 1


async def test_a_new_image_restarts_the_container_from_it(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(20)
    first = harness.api.last("a")["containerStatuses"][0]
    await harness.ctl.upsert(pod("a", status=harness.api.last("a")))  # a label, say: nothing to do
    await clock.advance(20)
    assert harness.events.reasons("a") == ["Pulling", "Pulled", "Created", "Started"]
    await harness.ctl.upsert(pod("a", image="nginx:1.9", status=harness.api.last("a")))  # kubectl set image
    await clock.advance(20)
    assert harness.events.reasons("a")[4:] == ["Killing", "Pulling", "Pulled", "Created", "Started"]
    killing = harness.events.items[4]
    assert killing.message == "Container c definition changed, will be restarted"
    assert harness.ctl.images.pulls == ["nginx:1.7.9", "nginx:1.9"]  # type: ignore[attr-defined]
    status = harness.api.last("a")
    c = status["containerStatuses"][0]
    assert (status["phase"], c["image"], c["restartCount"], c["ready"]) == ("Running", "nginx:1.9", 1, True)
    assert c["lastState"]["terminated"]["startedAt"] == first["state"]["running"]["startedAt"]
    assert c["state"]["running"]["startedAt"] > first["state"]["running"]["startedAt"]
    assert harness.ctl.workers["uid-a"].facts.containers[0].image == "nginx:1.9"
    # kubectl logs --previous reads the run the new image ended.
    previous = harness.ctl.container_log("ns", "a", "c", previous=True)
    assert not isinstance(previous, str)
    assert previous is not None
    assert previous.finished
    assert "stopping container c" in [line.text for line in previous.lines]


async def test_a_new_image_while_the_old_one_is_pulled_pulls_the_new_one(clock: FakeClock) -> None:
    harness = Harness(clock, Images(clock, seconds=100))
    async with harness.running():
        await harness.ctl.resync([pod("a")])
        await clock.advance(10)
        await harness.ctl.upsert(pod("a", image="nginx:1.9"))
        await clock.advance(110)
        assert harness.ctl.images.pulls == ["nginx:1.7.9", "nginx:1.9"]  # type: ignore[attr-defined]
        assert "Killing" not in harness.events.reasons("a")  # nothing ran yet
        c = harness.api.last("a")["containerStatuses"][0]
        assert (c["image"], c["restartCount"], "running" in c["state"]) == ("nginx:1.9", 0, True)
        assert harness.events.reasons("a").count("Started") == 1


async def test_a_new_image_for_a_container_that_ended_for_good_changes_nothing(
    harness: Harness, clock: FakeClock
) -> None:
    done = {"vk-provider.io/run-seconds": "5"}
    await harness.ctl.resync([pod("a", annotations=done, policy="Never")])
    await clock.advance(30)
    assert harness.api.last("a")["phase"] == "Succeeded"
    writes = len(harness.api.statuses["a"])
    ended = harness.api.last("a")
    await harness.ctl.upsert(pod("a", annotations=done, policy="Never", image="nginx:1.9", status=ended))
    await clock.advance(30)
    assert len(harness.api.statuses["a"]) == writes
    assert "Killing" not in harness.events.reasons("a")


@pytest.mark.parametrize("policy", ["Always", "OnFailure", "Never"])
async def test_a_new_image_restarts_the_container_whatever_the_restart_policy(
    harness: Harness, clock: FakeClock, policy: str
) -> None:
    await harness.ctl.resync([pod("a", policy=policy)])
    await clock.advance(20)
    await harness.ctl.upsert(pod("a", policy=policy, image="nginx:1.9", status=harness.api.last("a")))
    await clock.advance(30)
    assert [s["phase"] for s in harness.api.statuses["a"]][-3:] == ["Running"] * 3  # never Failed between
    c = harness.api.last("a")["containerStatuses"][0]
    assert (c["image"], c["restartCount"], "running" in c["state"]) == ("nginx:1.9", 1, True)


async def test_a_new_image_while_the_init_containers_run_is_started_after_them(
    harness: Harness, clock: FakeClock
) -> None:
    slow_init = {"vk-provider.io/run-seconds.init": "100"}
    body = pod("a", annotations=slow_init)
    body["spec"]["initContainers"] = [{"name": "init", "image": "busybox:1"}]
    await harness.ctl.resync([body])
    await clock.advance(30)  # the init container runs
    changed = pod("a", annotations=slow_init, image="nginx:1.9", status=harness.api.last("a"))
    changed["spec"]["initContainers"] = body["spec"]["initContainers"]
    await harness.ctl.upsert(changed)
    await clock.advance(30)
    status = harness.api.last("a")
    assert "running" in status["initContainerStatuses"][0]["state"]  # left to finish
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    await clock.advance(100)
    status = harness.api.last("a")
    c = status["containerStatuses"][0]
    assert (status["phase"], c["image"], c["restartCount"]) == ("Running", "nginx:1.9", 0)
    assert harness.ctl.images.pulls == ["busybox:1", "nginx:1.9"]  # type: ignore[attr-defined]
    assert "Killing" not in harness.events.reasons("a")


async def test_a_new_image_for_one_container_leaves_the_others_back_off_alone(
    harness: Harness, clock: FakeClock
) -> None:
    crashing = {"vk-provider.io/run-seconds.second": "1", "vk-provider.io/exit-code.second": "1"}
    body = two_containers("a", "nginx:1.7.9")
    body["metadata"]["annotations"] = crashing
    await harness.ctl.resync([body])
    await clock.advance(200)  # the second crash-loops, its back-off grown to 80 s
    second = harness.api.last("a")["containerStatuses"][1]
    assert second["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    changed = two_containers("a", "nginx:1.9")
    changed["metadata"]["annotations"] = crashing
    await harness.ctl.upsert({**changed, "status": harness.api.last("a")})
    await clock.advance(5)
    assert harness.api.last("a")["containerStatuses"][1]["restartCount"] == second["restartCount"]  # still waiting


async def test_a_second_new_image_during_the_stop_of_the_first_stops_the_container_once(
    harness: Harness, clock: FakeClock
) -> None:
    slow = {"vk-provider.io/stop-seconds": "10"}
    await harness.ctl.resync([pod("a", annotations=slow)])
    await clock.advance(20)
    await harness.ctl.upsert(pod("a", image="nginx:1.9", annotations=slow, status=harness.api.last("a")))
    await clock.advance(3)
    await harness.ctl.upsert(pod("a", image="nginx:2.0", annotations=slow, status=harness.api.last("a")))
    await clock.advance(40)
    assert harness.events.reasons("a").count("Killing") == 1
    c = harness.api.last("a")["containerStatuses"][0]
    assert (c["image"], c["restartCount"], "running" in c["state"]) == ("nginx:2.0", 1, True)


async def test_an_image_changed_while_the_agent_was_down_is_started_when_it_is_back(
    harness: Harness, clock: FakeClock
) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = running_state(t0)
    await clock.advance(10)
    await harness.ctl.resync([pod("a", image="nginx:1.9", status=lc.render_status(state))])
    await clock.advance(60)
    c = harness.api.last("a")["containerStatuses"][0]
    assert (c["image"], c["restartCount"], "running" in c["state"]) == ("nginx:1.9", 1, True)
    assert harness.events.reasons("a")[:2] == ["Killing", "Pulling"]


async def test_a_pod_failed_by_its_deadline_as_the_agent_stopped_has_its_containers_stopped(
    harness: Harness, clock: FakeClock
) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = running_state(t0)
    state = lc.stopped_by_node(state, "DeadlineExceeded", DEADLINE, t0)  # stopped before it stopped them
    await harness.ctl.resync([pod("a", status=lc.render_status(state), activeDeadlineSeconds=60)])
    await clock.advance(1)
    status = harness.api.last("a")
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert "terminated" in status["containerStatuses"][0]["state"]


async def test_a_gate_change_does_not_swallow_a_status_change_waiting_to_be_written(clock: FakeClock) -> None:
    from vk_provider.domain import lifecycle as lc

    harness = Harness(clock, Images(clock, seconds=100))
    async with harness.running():
        gate = "target-health.example.com/web"
        spec: dict[str, Any] = {"readinessGates": [{"conditionType": gate}]}
        await harness.ctl.resync([pod("a", **spec)])
        await clock.advance(5)
        server = harness.api.last("a")
        worker = harness.ctl.workers["uid-a"]
        assert worker.state is not None
        worker._set(lc.waiting(worker.state, "c", "ErrImagePull", "boom", clock.now()))  # queued
        theirs = {"type": gate, "status": "False"}
        await harness.ctl.upsert(pod("a", status={**server, "conditions": [*server["conditions"], theirs]}, **spec))
        await clock.advance(1)
        written = harness.api.last("a")
        assert written["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
        assert worker.state.others == (theirs,)


async def test_deleted_while_restarting_for_a_new_image(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(20)
    await harness.ctl.upsert(pod("a", image="nginx:1.9", status=harness.api.last("a")))
    await clock.advance(3)  # pulling the new image
    await harness.ctl.upsert(pod("a", image="nginx:1.9", deleting=True))
    await clock.advance(1)
    assert harness.api.deleted == ["a"]
    assert harness.events.reasons("a").count("Started") == 1


async def test_resync_forgets_pods_gone_while_disconnected(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a"), pod("b")])
    await clock.advance(1)
    await harness.ctl.resync([pod("b")])
    assert set(harness.ctl.workers) == {"uid-b"}


async def test_running_pod_is_adopted_not_restarted(harness: Harness, clock: FakeClock) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = running_state(t0)
    running = lc.render_status(state)
    harness.ctl.records = records = Starts()
    await clock.advance(100)
    await harness.ctl.resync([pod("a", status=running)])
    await clock.advance(60)
    assert records.adopted_uids == ["uid-a"]  # its start was stored by the run that started it: checked
    assert records.starts == []  # not recorded again
    assert harness.events.reasons("a") == []
    assert "a" not in harness.api.statuses  # what the API server has is already right: no write
    adopted = harness.ctl.workers["uid-a"].state
    assert adopted is not None
    assert adopted.container("c").state == lc.Running(t0)
    assert "10.234.0.9" not in {harness.ctl.ips.allocate() for _ in range(3)}  # its IP stays reserved
    # kubectl logs reads an open run (before: an empty, finished one, so -f ended at once).
    run = harness.ctl.container_log("ns", "a", "c")
    assert not isinstance(run, str)
    assert run is not None
    assert not run.finished
    assert [line.text for line in run.lines][:1] == [f"container c running since {rfc3339(t0)}"]


async def test_a_pending_pod_with_a_running_container_is_adopted_and_carries_on(
    harness: Harness, clock: FakeClock
) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = lc.accepted(restart_policy="Always", init_containers=[],
                        containers=[("first", "nginx:1.7.9"), ("second", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=t0)  # fmt: skip
    state = lc.waiting(state, "first", "ImagePullBackOff", 'Back-off pulling image "nginx:1.7.9"', t0)
    state = lc.became_ready(lc.started(state, "second", "uid-a", "x", t0), "second", t0)
    pending = lc.render_status(state)  # what the last run wrote: one container up, one in back-off
    assert pending["phase"] == "Pending"
    harness.ctl.records = records = Starts()
    await clock.advance(100)
    await harness.ctl.resync([{**two_containers("a", "nginx:1.7.9"), "status": pending}])
    await clock.advance(60)
    # Its start is recorded once the last container starts: from its startTime (taken by the first
    # run) to now, pull 10 s and start 1 s after the restart at 100 s.
    (recorded,) = records.starts
    assert recorded.startup_seconds == pytest.approx(111)
    assert [image for image, _ in recorded.images] == ["nginx:1.7.9"]
    assert records.adopted_uids == []  # not started before the restart: recorded by this run instead
    assert harness.ctl.started_total == 1
    status = harness.api.last("a")
    assert container_states(status) == {"first": "running", "second": "running"}
    assert status["phase"] == "Running"
    second = next(c for c in status["containerStatuses"] if c["name"] == "second")
    assert second["state"]["running"]["startedAt"] == pending["startTime"]  # not started again
    assert second["restartCount"] == 0
    assert harness.events.reasons("a") == ["Pulling", "Pulled", "Created", "Started"]  # the first's only
    assert [e.field_path for e in harness.events.items if e.reason == "Started"] == ["spec.containers{first}"]


async def test_a_crash_looping_container_adopted_starts_again_from_the_image_it_has(
    harness: Harness, clock: FakeClock
) -> None:
    from vk_provider.domain import lifecycle as lc

    t0 = clock.now()
    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=t0)  # fmt: skip
    state = lc.exited(lc.started(state, "c", "uid-a", "x", t0), "c", 1, t0)
    state = lc.back_off(state, "c", "back-off 10s", t0)
    await clock.advance(5)
    crashing = {"vk-provider.io/run-seconds": "3", "vk-provider.io/exit-code": "1"}
    await harness.ctl.resync([pod("a", annotations=crashing, status=lc.render_status(state))])
    await clock.advance(2)
    assert harness.events.reasons("a")[:3] == ["Pulled", "Created", "Started"]  # no Pulling
    pulled = next(e for e in harness.events.items if e.reason == "Pulled")
    assert pulled.message == 'Container image "nginx:1.7.9" already present on machine'
    assert harness.ctl.images.pulls == []  # type: ignore[attr-defined]
    assert harness.api.last("a")["containerStatuses"][0]["restartCount"] == 1


def test_a_pending_pod_that_never_ran_is_not_adopted(clock: FakeClock) -> None:
    from vk_provider.domain import lifecycle as lc

    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c", "nginx:1.7.9")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.9", now=clock.now())  # fmt: skip
    assert lc.adopt(lc.render_status(state), "Always", clock.now()) is None  # started from the beginning


async def test_pull_errors(clock: FakeClock) -> None:
    images = Images(
        clock,
        broken={
            "bad": ImagePullError("InvalidImageName", "couldn't parse image reference", retry=False),
            "flaky": ImagePullError("ErrImagePull", "registry said no"),
        },
    )
    h = Harness(clock, images)
    async with h.running():
        await h.ctl.resync([pod("bad", image="bad"), pod("flaky", image="flaky"), pod("fine")])
        await clock.advance(35)
        assert h.api.last("bad")["containerStatuses"][0]["state"]["waiting"]["reason"] == "InvalidImageName"
        assert "InspectFailed" in h.events.reasons("bad")
        flaky = h.api.last("flaky")["containerStatuses"][0]["state"]["waiting"]["reason"]
        assert flaky == "ImagePullBackOff"
        assert images.pulls.count("flaky") == 3  # at 0, 10 and 30 s (back-off 10 s, then 20 s)
        assert h.api.last("fine")["phase"] == "Running"


def two_containers(name: str, first_image: str) -> dict[str, Any]:
    body = pod(name)
    body["spec"]["containers"] = [{"name": "first", "image": first_image}, {"name": "second", "image": "nginx:1.7.9"}]
    return body


def container_states(status: dict[str, Any]) -> dict[str, str]:
    """Each container's state (running, or the waiting reason)."""
    return {
        c["name"]: "running" if "running" in c["state"] else c["state"]["waiting"]["reason"]
        for c in status["containerStatuses"]
    }


class Starts:
    def __init__(self) -> None:
        self.starts: list[PodStart] = []
        self.adopted_uids: list[str] = []

    async def record(self, start: PodStart) -> None:
        self.starts.append(start)

    def adopted(self, pod: PodFacts) -> None:
        self.adopted_uids.append(pod.uid)


@contextlib.asynccontextmanager
async def flaky_first_container(clock: FakeClock) -> AsyncIterator[tuple[Harness, Images, Starts]]:
    """Pod "a" taken: its first container's image fails to pull (retryable), its second is fine."""
    images = Images(clock, broken={"flaky": ImagePullError("ErrImagePull", "registry said no")})
    h = Harness(clock, images)
    h.ctl.records = records = Starts()
    async with h.running():
        await h.ctl.resync([two_containers("a", "flaky")])
        yield h, images, records


async def test_a_failing_image_does_not_hold_up_the_next_container(clock: FakeClock) -> None:
    async with flaky_first_container(clock) as (h, images, records):
        # first: failed at 0 s, back-off 10 s; second: pulled, started at 11 s; first again at 11 s
        # (its back-off is over), failed, back-off 20 s
        await clock.advance(12)
        status = h.api.last("a")
        assert container_states(status) == {"first": "ImagePullBackOff", "second": "running"}
        assert status["phase"] == "Pending"  # a container still waits, as the kubelet reports it
        assert records.starts == []
        images.broken.clear()  # the registry recovers: the retry at 31 s pulls (10 s), then starts (1 s)
        await clock.advance(35)
        status = h.api.last("a")
        assert container_states(status) == {"first": "running", "second": "running"}
        assert status["phase"] == "Running"
        assert images.pulls == ["flaky", "nginx:1.7.9", "flaky", "flaky"]
        (start,) = records.starts
        assert start.startup_seconds == pytest.approx(42)
        assert [image for image, _ in start.images] == ["nginx:1.7.9", "flaky"]
        assert h.ctl.started_total == 1


async def test_a_retry_that_turns_hopeless_leaves_the_pod_pending(clock: FakeClock) -> None:
    async with flaky_first_container(clock) as (h, images, records):
        await clock.advance(5)
        images.broken["flaky"] = ImagePullError("ErrImagePull", "manifest unknown", retry=False)
        await clock.advance(100)
        status = h.api.last("a")
        assert container_states(status) == {"first": "ErrImagePull", "second": "running"}
        assert status["phase"] == "Pending"
        assert images.pulls.count("flaky") == 2  # no more tries once it is hopeless
        assert records.starts == []
        assert h.ctl.started_total == 0


async def test_deleting_a_pod_while_a_container_waits_out_its_back_off(clock: FakeClock) -> None:
    async with flaky_first_container(clock) as (h, images, records):
        await clock.advance(12)
        body = two_containers("a", "flaky")
        body["metadata"].update(deletionTimestamp="2026-01-01T00:00:30Z", deletionGracePeriodSeconds=30)
        await h.ctl.upsert(body)
        await clock.advance(60)
        assert h.api.deleted == ["a"]
        killing = [e.message for e in h.events.items if e.reason == "Killing"]
        assert killing == ["Stopping container second"]  # the waiting one never ran
        assert images.pulls.count("flaky") == 2  # the retry at 11 s; none after the deletion
        assert records.starts == []
        assert h.ctl.started_total == 0


async def test_an_image_that_can_never_be_pulled_leaves_the_other_containers_running(clock: FakeClock) -> None:
    bad = ImagePullError("InvalidImageName", "couldn't parse image reference", retry=False)
    h = Harness(clock, Images(clock, broken={"bad": bad}))
    h.ctl.records = records = Starts()
    async with h.running():
        await h.ctl.resync([two_containers("a", "bad")])
        await clock.advance(60)
        status = h.api.last("a")
        assert container_states(status) == {"first": "InvalidImageName", "second": "running"}
        assert status["phase"] == "Pending"
        assert records.starts == []  # the Pod never started: nothing to compare
        assert h.events.reasons("a") == ["Pulling", "InspectFailed", "Pulling", "Pulled", "Created", "Started"]


async def test_room_freed_by_an_ended_pod_admits_the_next(clock: FakeClock) -> None:
    h = Harness(clock, Images(clock), pods=2)
    async with h.running():
        done = {"vk-provider.io/run-seconds": "1", "vk-provider.io/exit-code": "0"}
        await h.ctl.resync([pod("job", annotations=done, policy="Never", cpu="600m"), pod("web", cpu="300m")])
        assert h.ctl.used() == (900, 0, 2)
        await h.ctl.upsert(pod("late", cpu="100m"))
        await clock.advance(1)
        assert h.api.last("late")["reason"] == "OutOfpods"
        await clock.advance(30)
        assert h.api.last("job")["phase"] == "Succeeded"
        assert h.ctl.used() == (300, 0, 1)  # the finished Pod no longer holds its requests
        await h.ctl.upsert(pod("later", cpu="600m"))
        await clock.advance(30)
        assert h.api.last("later")["phase"] == "Running"
        await h.ctl.delete(pod("web"))
        await h.ctl.delete(pod("late"))  # rejected: never counted, so nothing is given back
        assert h.ctl.used() == (600, 0, 1)


async def test_running_pod_keeps_no_task_until_deleted(harness: Harness, clock: FakeClock) -> None:
    await harness.ctl.resync([pod("a")])
    await clock.advance(30)
    worker = harness.ctl.workers["uid-a"]
    assert harness.api.last("a")["phase"] == "Running"
    assert worker.task is None  # nothing left to simulate: no task, not even a finished one
    await harness.ctl.upsert(pod("a", deleting=True))
    await clock.advance(30)
    assert harness.api.deleted == ["a"]
    assert "terminated" in harness.api.last("a")["containerStatuses"][0]["state"]


async def test_cache_annotations_are_written_with_the_status(clock: FakeClock) -> None:
    matched = {"k8s.aliyun.com/eci-matched-image-cache": "imc-1"}

    class Caches:
        async def resolve(self, pod: PodFacts) -> CacheDecision:
            return CacheDecision(annotations=matched, outcome="hit", imc_id="imc-1")

    h = Harness(clock, Images(clock))
    h.ctl.caches = Caches()
    async with h.running():
        await h.ctl.resync([pod("a")])
        await clock.advance(30)
        assert h.api.annotations["a"] == matched
        assert h.api.last("a")["phase"] == "Running"


async def test_a_pod_its_cache_fails_is_failed_and_recorded_as_failed(clock: FakeClock) -> None:
    class Caches:
        async def resolve(self, pod: PodFacts) -> CacheDecision:
            why = "The specified image cache imc-gone does not exist."
            return CacheDecision(failure=("ImageCacheNotFound", why), outcome="failed", imc_id="imc-gone")

    h = Harness(clock, Images(clock))
    h.ctl.caches = Caches()
    h.ctl.records = records = Starts()
    taken = clock.now()
    async with h.running():
        await h.ctl.resync([pod("a"), pod("b")])
        await clock.advance(30)
        assert h.api.last("a")["phase"] == "Failed"
        assert h.api.last("a")["reason"] == "ImageCacheNotFound"
        assert sorted(s.pod.name for s in records.starts) == ["a", "b"]
        failed = records.starts[0]
        assert failed.decision.outcome == "failed"
        assert failed.images == []  # nothing was pulled
        assert failed.started_at == taken  # when it was failed: at once
        assert failed.startup_seconds == 0.0
        assert h.ctl.started_total == 0  # failed, not started


async def test_a_long_list_does_not_hold_back_the_first_status_writes(clock: FakeClock) -> None:
    h = Harness(clock, Images(clock), pods=100)
    taken_at_first_write: list[int] = []
    write = h.api.patch_status

    async def patch_status(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not taken_at_first_write:
            taken_at_first_write.append(len(h.ctl.workers))
        return await write(*args, **kwargs)

    h.api.patch_status = patch_status  # type: ignore[method-assign]
    async with h.running():
        await h.ctl.resync([pod(f"p{i}", cpu="1m") for i in range(80)])
        await clock.advance(1)
        assert len(h.api.statuses) == 80
        assert taken_at_first_write[0] < 80  # writes began while the list was still being taken
