"""The pod controller: takes the Pods bound to the node and runs them, in simulation.

Intake (:class:`PodController`, fed by the list+watch) is fast and never blocks: it admits a new
Pod like the kubelet (cpu, memory, pod count), gives it a Pod IP, and starts one serial
:class:`PodWorker` task for it. The worker drives the pure state machine in
``domain.lifecycle`` through the steps — cache resolution, images made present (through the
:class:`ImageService` seam), containers created and started, readiness, exits and restarts — and
publishes each resulting status to the :class:`StatusReporter`, the only writer of Pod status.

Cancellation flows downstream: a Pod being deleted has its worker cancelled (and with it any
pull), its containers stopped within the grace period, its status reported, and the Pod removed
from the API server; a Pod gone from the API server is forgotten by the reporter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from vk_provider.controllers.clock import Clock
from vk_provider.controllers.logs import LogRun, SimLog
from vk_provider.controllers.reporter import StatusReporter
from vk_provider.domain import lifecycle as lc
from vk_provider.domain.events import EventSpec, container_field_path
from vk_provider.domain.ipam import IpPool, PoolExhausted
from vk_provider.domain.lifecycle import Phase, PodState
from vk_provider.domain.node import rfc3339
from vk_provider.domain.podspec import ContainerSpec, PodFacts, active_deadline_of, pod_facts
from vk_provider.domain.workload import Workload, parse_workload

log = logging.getLogger(__name__)
JSON = dict[str, Any]
RESYNC_BATCH = 16  # Pods taken from a list between two turns of the event loop


# ------------------------------------------------------------------ seams


class EventSink(Protocol):
    def record(self, spec: EventSpec, now: datetime | None = None) -> None:
        """Queue an Event; must not block."""
        ...


class PodApi(Protocol):
    async def delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Delete with grace 0 and a uid precondition; a Pod already gone is not an error."""
        ...


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One container image made present. ``seconds`` are simulated seconds."""

    image_id: str
    size: int
    seconds: float = 0.0
    downloaded: int = 0
    present: bool = False
    from_cache: bool = False  # made present by the Pod's ImageCache


class ImagePullError(Exception):
    """``reason`` is the container's waiting reason: ErrImagePull, ErrImageNeverPull, InvalidImageName."""

    def __init__(self, reason: str, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


class PodImages(Protocol):
    async def attach_snapshot(self) -> float:
        """Attach the cache snapshot, if the decision gave one; returns simulated seconds (0: none)."""
        ...

    def will_pull(self, container: ContainerSpec) -> bool:
        """Whether :meth:`pull` contacts the registry (a ``Pulling`` Event is due) for this container."""
        ...

    def ran_before(self, container: ContainerSpec) -> None:
        """The container ran on this instance before the agent restarted: its image is present."""
        ...

    async def pull(self, container: ContainerSpec) -> ImageResult:
        """Make the container's image present (simulated); raises :class:`ImagePullError`.

        Cancellable: a cancelled pull releases what it held.
        """
        ...


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What cache resolution decided for a Pod (see controllers.caches)."""

    present_images: frozenset[str] = frozenset()  # normalised references the cache makes present
    failure: tuple[str, str] | None = None  # (reason, message): the Pod fails
    events: tuple[EventSpec, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    outcome: str = "none"
    imc_id: str = ""
    explanation: str = ""


class CacheResolver(Protocol):
    async def resolve(self, pod: PodFacts) -> CacheDecision: ...


class ImageService(Protocol):
    async def for_pod(self, pod: PodFacts, decision: CacheDecision) -> PodImages:
        """Plan the Pod's images (may resolve manifests from a registry); never raises for bad images."""
        ...


class StartRecorder(Protocol):
    async def record(self, start: PodStart) -> None:
        """Store one finished Pod start (called once per Pod, when all containers have started)."""
        ...

    def adopted(self, pod: PodFacts) -> None:
        """A Pod whose containers had all started before this agent took it over (after a restart):
        its start should have been stored by the agent that started it."""
        ...


@dataclass(slots=True)
class PodStart:
    """Timings of one Pod start, in simulated seconds, collected by the worker."""

    pod: PodFacts
    node: str
    decision: CacheDecision
    images: list[tuple[str, ImageResult]] = field(default_factory=list)
    resolve_seconds: float = 0.0
    attach_seconds: float = 0.0
    container_seconds: float = 0.0
    started_at: datetime | None = None  # for a Pod its cache failed: when it was failed
    startup_seconds: float = 0.0  # simulated: taken by the node -> all containers started (0 if failed)


class NoCaches:
    async def resolve(self, pod: PodFacts) -> CacheDecision:
        return CacheDecision()


class NoRecords:
    async def record(self, start: PodStart) -> None:
        return None

    def adopted(self, pod: PodFacts) -> None:
        return None


@dataclass(frozen=True, slots=True)
class PodTiming:
    """Simulated seconds for the kubelet's own steps, and how fast simulated time runs."""

    time_scale: float = 1.0
    create_seconds: float = 0.1
    start_seconds: float = 0.2
    pull_backoff_base: float = 10.0
    pull_backoff_max: float = 300.0
    crash_backoff_base: float = 10.0
    crash_backoff_max: float = 300.0


@dataclass(frozen=True, slots=True)
class Allocatable:
    cpu_milli: int
    memory: int
    pods: int


# ------------------------------------------------------------------ the controller


class PodController:
    """Implements the watch handler for Pods bound to one node, and the http layer's PodView."""

    def __init__(
        self,
        *,
        node_name: str,
        host_ip: str,
        pod_cidr: str,
        allocatable: Allocatable,
        api: PodApi,
        reporter: StatusReporter,
        events: EventSink,
        images: ImageService,
        clock: Clock,
        timing: PodTiming = PodTiming(),
        caches: CacheResolver | None = None,
        records: StartRecorder | None = None,
        ips: IpPool | None = None,
    ) -> None:
        self.node_name = node_name
        self.host_ip = host_ip
        self.allocatable = allocatable
        self.api = api
        self.reporter = reporter
        self.events = events
        self.images = images
        self.clock = clock
        self.timing = timing
        self.caches: CacheResolver = caches or NoCaches()
        self.records: StartRecorder = records or NoRecords()
        # Shared by the nodes of one agent, so Pod IPs are unique among them.
        self.ips = ips if ips is not None else IpPool(pod_cidr)
        self.workers: dict[str, PodWorker] = {}
        # What admitted, non-terminal Pods request, kept as running sums (admission is O(1)).
        self._used_cpu = self._used_mem = self._used_pods = 0
        self.synced = asyncio.Event()
        self.started_total = 0
        self.first_taken: float | None = None  # clock.monotonic() when the first Pod was taken

    # -- watch handler

    async def resync(self, objects: list[JSON]) -> None:
        seen = set()
        # Adopt first (running Pods reserve their resources and IPs), then start the rest.
        ordered = sorted(objects, key=lambda o: 0 if (o.get("status") or {}).get("phase") != "Pending" else 1)
        for i, obj in enumerate(ordered, 1):
            uid = (obj.get("metadata") or {}).get("uid")
            if uid:
                seen.add(uid)
                await self.upsert(obj)
            if i % RESYNC_BATCH == 0:
                # Let the Pods just taken run, and their status writes go out, before taking more:
                # a list of thousands otherwise starts every Pod before the first write is sent.
                await asyncio.sleep(0)
        for uid in [u for u in self.workers if u not in seen]:
            self._gone(uid)
        self.synced.set()

    async def upsert(self, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid or (obj.get("spec") or {}).get("nodeName") != self.node_name:
            return
        worker = self.workers.get(uid)
        if worker is None:
            worker = self._take(obj)
            if worker is None:
                return
        # In a Pod already taken, only a deletionTimestamp and a status another writer changed
        # matter: the watch passes over the agent's own writes undecoded (PodRouter.tracks).
        if meta.get("deletionTimestamp") and not worker.stopping:
            worker.request_stop(meta.get("deletionGracePeriodSeconds"))
        elif not worker.stopping:
            status = obj.get("status")
            # The node's own write coming back: known by its version once its answer is in, by
            # its content while it is in flight.
            sending = self.reporter.sending(uid)
            own = self.reporter.written(uid, str(meta.get("resourceVersion") or "")) or (
                sending is not None and lc.status_summary(status) == lc.status_summary(sending)
            )
            worker.reconcile(status, own=own)
            worker.respec(obj)

    async def delete(self, obj: JSON) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        if uid:
            self._gone(uid)

    # -- http PodView

    def pod_list(self) -> list[JSON]:
        return [w.as_api_object() for w in self.workers.values()]

    def node_of(self, namespace: str, pod: str) -> str | None:
        for w in self.workers.values():
            if w.facts.namespace == namespace and w.facts.name == pod:
                return self.node_name
        return None

    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> LogRun | str | None:
        """The run of a container's log ``kubectl logs`` reads, the kubelet's refusal (a 400's
        text: not started yet, no previous run), or None for a container not on this node."""
        for w in self.workers.values():
            if w.facts.namespace == namespace and w.facts.name == pod:
                sim_log = w.logs.get(container)
                if sim_log is None:
                    return None
                state = w.state
                c = state.container(container) if state is not None else lc.Container(container, "")
                run = lc.log_run(c, pod, previous=previous)
                return run if isinstance(run, str) else sim_log.run(run)
        return None

    # -- internals

    def used(self) -> tuple[int, int, int]:
        """(cpu millicores, memory bytes, Pods) taken by admitted Pods that have not ended."""
        return self._used_cpu, self._used_mem, self._used_pods

    def _count(self, worker: PodWorker) -> None:
        if not worker.counted and worker.counts_for_admission:
            cpu, mem = worker.facts.requests()
            self._used_cpu, self._used_mem, self._used_pods = (
                self._used_cpu + cpu, self._used_mem + mem, self._used_pods + 1
            )  # fmt: skip
            worker.counted = True

    def uncount(self, worker: PodWorker) -> None:
        """The Pod no longer holds node resources (it ended, or is gone)."""
        if worker.counted:
            cpu, mem = worker.facts.requests()
            self._used_cpu, self._used_mem, self._used_pods = (
                self._used_cpu - cpu, self._used_mem - mem, self._used_pods - 1
            )  # fmt: skip
            worker.counted = False

    def _take(self, obj: JSON) -> PodWorker | None:
        if self.first_taken is None:
            self.first_taken = self.clock.monotonic()
        facts = pod_facts(obj)
        status = obj.get("status") or {}
        now = self.clock.now()
        adopted = lc.adopt(status, facts.restart_policy, now, facts.readiness_gates)
        worker = PodWorker(self, facts)
        rejection = None if adopted is not None else self._admit(facts)  # before it counts as used
        self.workers[facts.uid] = worker
        if adopted is not None:
            worker.state = adopted
            worker.changed_while_away()
            if not facts.host_network:
                self.ips.reserve(adopted.pod_ip)
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            self.reporter.seen(facts.uid, facts.namespace, facts.name, lc.render_status(adopted), version)
            worker.adopted = True
            if all(c.has_run for c in adopted.main_containers):
                self.records.adopted(facts)
        else:
            worker.reconcile(status)  # before its lifecycle: takes the conditions other writers gave it
            worker._started_at = _time_or_none(status.get("startTime"))  # an earlier run's: kept
            if rejection is not None:
                worker.rejection = rejection
            elif facts.host_network:  # the node's network: its address, from no pool
                worker.pod_ip = self.host_ip
            else:
                ip = status.get("podIP") or ""
                if ip:
                    self.ips.reserve(ip)
                else:
                    try:
                        ip = self.ips.allocate()
                    except PoolExhausted as exc:
                        worker.rejection = ("OutOfPodIPs", str(exc))
                worker.pod_ip = ip
        self._count(worker)
        worker.start()
        return worker

    def _admit(self, facts: PodFacts) -> tuple[str, str] | None:
        cpu, mem, pods = self.used()
        want_cpu, want_mem = facts.requests()
        a = self.allocatable
        if pods + 1 > a.pods:
            return (
                "OutOfpods",
                f"Node didn't have enough resource: pods, requested: 1, used: {pods}, capacity: {a.pods}",
            )
        if want_cpu and cpu + want_cpu > a.cpu_milli:
            return (
                "OutOfcpu",
                f"Node didn't have enough resource: cpu, requested: {want_cpu}, used: {cpu}, capacity: {a.cpu_milli}",
            )
        if want_mem and mem + want_mem > a.memory:
            return (
                "OutOfmemory",
                f"Node didn't have enough resource: memory, requested: {want_mem}, used: {mem}, capacity: {a.memory}",
            )
        return None

    def _gone(self, uid: str) -> None:
        worker = self.workers.pop(uid, None)
        if worker is None:
            return
        worker.cancel()
        self.uncount(worker)
        self.reporter.forget(uid)
        if not worker.facts.host_network and (worker.pod_ip or (worker.state and worker.state.pod_ip)):
            self.ips.release(worker.pod_ip or (worker.state.pod_ip if worker.state else ""))
        for sim_log in worker.logs.values():
            sim_log.close()

    async def run(self) -> None:
        """Owns the workers' lifetime: waits forever; on cancellation, cancels every worker."""
        try:
            await asyncio.Event().wait()
        finally:
            tasks = [w.task for w in self.workers.values() if w.task is not None]
            for w in self.workers.values():
                w.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def emit(self, facts: PodFacts, reason: str, message: str, *, type: str = "Normal", field_path: str = "") -> None:
        self.events.record(
            EventSpec(facts.namespace, facts.name, facts.uid, reason, message, type, field_path, host=self.node_name),
            self.clock.now(),
        )


# ------------------------------------------------------------------ one Pod


class _RetryPull(Exception):
    """A pull failed; it may be tried again after ``delay`` simulated seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


class PodWorker:
    """Runs one Pod. All state changes go through ``domain.lifecycle`` and are published at once.

    Kept small (10,000 tracked Pods): slots, no task once the Pod has nothing left to simulate,
    shared strings and workload defaults, and the status rendered only when it is written.
    """

    __slots__ = (
        "_deadline",
        "_expired",
        "_grace",
        "_in_lifecycle",
        "_others",
        "_respec",
        "_started_at",
        "_stop_cancel",
        "adopted",
        "counted",
        "ctl",
        "facts",
        "logs",
        "pod_ip",
        "rejection",
        "state",
        "stopping",
        "task",
        "workload",
    )

    def __init__(self, ctl: PodController, facts: PodFacts) -> None:
        self.ctl = ctl
        self.facts = facts
        self.state: PodState | None = None
        self.pod_ip = ""
        self.adopted = False
        self.rejection: tuple[str, str] | None = None
        self.counted = False  # included in the controller's used resources
        self.task: asyncio.Task[None] | None = None
        self._in_lifecycle = False
        self._stop_cancel = False  # a deletion, the deadline or a new image cancelled the lifecycle
        self.stopping = False
        self._deadline: asyncio.Task[None] | None = None  # counts down spec.activeDeadlineSeconds
        self._expired = False
        self._others: tuple[JSON, ...] = ()  # other writers' conditions, until the state holds them
        self._respec: tuple[str, ...] = ()  # containers whose image the spec changed, to restart
        self._started_at: datetime | None = None  # the startTime an earlier run gave it
        self._grace: float = float(facts.grace_seconds)
        self.workload: Workload = parse_workload(
            facts.annotation_map(), [c.name for c in facts.init_containers], [c.name for c in facts.main_containers]
        )
        self.logs: dict[str, SimLog] = {c.name: SimLog() for c in facts.containers}

    # -- state

    @property
    def counts_for_admission(self) -> bool:
        return self.rejection is None and not (self.state is not None and self.state.terminal)

    def _set(self, state: PodState) -> None:
        self.state = state
        if state.terminal:
            self.ctl.uncount(self)
            self._stop_deadline()
        self._publish()

    def _publish(self) -> None:
        f = self.facts
        render = partial(lc.render_status, self._state)
        self.ctl.reporter.publish(f.uid, f.namespace, f.name, render)

    def reconcile(self, status: JSON | None, *, own: bool = False) -> None:
        """The API server's copy of the status, written by another writer. Conditions other writers
        own (a readiness gate's) are taken into the state, so Ready follows them and the node's
        writes keep them. Anything else that says something else than this Pod's state (the node
        controller marked it not ready while the node was silent, say, or someone edited it) has
        the state written again, as the kubelet's status manager does. ``own``: the Pod as the
        node's own write left it (read only for other writers' conditions)."""
        others = lc.other_conditions(status)
        if self.state is None:
            self._others = others
            return
        f = self.facts
        if others != self.state.others:  # a readiness gate's controller wrote its condition, say
            updated = lc.with_others(self.state, others, self.ctl.clock.now())
            if updated.conditions is not self.state.conditions or updated.phase is not self.state.phase:
                self._set(updated)  # Ready follows its gates: written
                return
            self.state = updated  # nothing of the node's changed by it
        if own or lc.status_summary(status) == lc.status_summary(lc.render_status(self.state)):
            return
        log.info("pod %s: its status was changed by another writer; writing the node's again", f.key)
        self.ctl.reporter.rewrite(f.uid)
        self._publish()

    def respec(self, obj: JSON) -> None:
        """The Pod's spec, as the API server has it: a container whose image was changed
        (``kubectl set image``, the one change the API server allows a running container) is
        restarted from the new image, as the kubelet does when a container's definition changes;
        a changed ``activeDeadlineSeconds`` counts from the Pod's startTime from now on."""
        spec = obj.get("spec") or {}
        containers = spec.get("containers")
        state = self.state
        if not isinstance(containers, list) or state is None or state.terminal:
            return
        deadline = active_deadline_of(spec)
        if deadline != self.facts.active_deadline:  # set, or shortened: the API server allows both
            self.facts = replace(self.facts, active_deadline=deadline)
            self._start_deadline()
        images = {c.get("name"): c.get("image") for c in containers if isinstance(c, dict)}
        running = {c.name for c in state.main_containers if not isinstance(c.state, lc.Terminated)}
        changed = tuple(
            c.name
            for c in self.facts.main_containers
            if isinstance(images.get(c.name), str) and images[c.name] != c.image and c.name in running
        )  # one that ended for good will not run again
        if not changed:
            return
        facts = pod_facts(obj)
        new = {c.name: c for c in facts.main_containers}
        self.facts = replace(
            self.facts,
            containers=tuple(new[c.name] if c.name in changed else c for c in self.facts.containers),
            annotations=facts.annotations,  # with the cache decision written on it, to read back
        )
        if not all(c.succeeded for c in state.init_containers):
            # Not started yet: the lifecycle starts them from the new images once its init
            # containers are done, as the kubelet would.
            log.info("pod %s: new image for %s, used once the init containers are done", facts.key, ", ".join(changed))
            return
        log.info("pod %s: new image for %s; restarting", self.facts.key, ", ".join(changed))
        self._respec = tuple(dict.fromkeys((*self._respec, *changed)))
        self._wind_up()

    def changed_while_away(self) -> None:
        """An adopted Pod (agent restart) whose spec names other images than its status: they
        were changed while no agent ran, and the containers restart from them when it starts."""
        state = self._state
        changed = []
        for spec in self.facts.main_containers:
            try:
                c = state.container(spec.name)
            except KeyError:
                continue
            if c.image != spec.image and not isinstance(c.state, lc.Terminated):
                changed.append(spec.name)
        self._respec = tuple(changed)

    def _log(self, container: str, text: str) -> None:
        sim_log = self.logs.get(container)
        if sim_log is not None:
            sim_log.write(self.ctl.clock.now(), text)

    def as_api_object(self) -> JSON:
        f = self.facts
        return {
            "metadata": {"name": f.name, "namespace": f.namespace, "uid": f.uid},
            "spec": {
                "nodeName": f.node_name,
                "containers": [{"name": c.name, "image": c.image} for c in f.main_containers],
            },
            "status": lc.render_status(self.state) if self.state else {"phase": "Pending"},
        }

    def _due(self, simulated: float) -> float:
        """The loop time ``simulated`` seconds from now."""
        return self.ctl.clock.monotonic() + simulated / self.ctl.timing.time_scale

    async def _sleep(self, simulated: float) -> None:
        if simulated > 0:
            await self.ctl.clock.sleep(simulated / self.ctl.timing.time_scale)

    # -- task control

    def start(self) -> None:
        self._own(asyncio.create_task(self._run(), name=f"pod:{self.facts.key}"))
        if self.rejection is None:
            self._start_deadline()

    def _start_deadline(self) -> None:
        """Count down spec.activeDeadlineSeconds (again, if it was changed), unless the Pod ended."""
        self._stop_deadline()
        ended = self.state is not None and self.state.terminal
        if self.facts.active_deadline is not None and not ended and not self.stopping:
            self._deadline = asyncio.create_task(self._count_down(), name=f"pod-deadline:{self.facts.key}")

    def _own(self, task: asyncio.Task[None]) -> None:
        """Hold the task while it runs; drop it when done (a finished Task is ~1 KB per Pod)."""
        self.task = task
        task.add_done_callback(self._drop_task)

    def _drop_task(self, task: asyncio.Task[None]) -> None:
        if self.task is task:
            self.task = None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._stop_deadline()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline is not asyncio.current_task():
                self._deadline.cancel()
            self._deadline = None

    def request_stop(self, grace: int | None) -> None:
        self.stopping = True
        if grace is not None and grace >= 0:
            self._grace = float(grace)
        self._wind_up()

    def _wind_up(self) -> None:
        """End the lifecycle (a deletion, the deadline, a new image): cancel it wherever it waits,
        or, with none running, start what follows it."""
        if self._in_lifecycle:
            if not self._stop_cancel and self.task is not None:
                self._stop_cancel = True  # _run tells this cancellation from a shutdown's
                self.task.cancel()
        elif self.task is None or self.task.done():
            self._own(asyncio.create_task(self._run(first=False), name=f"pod:{self.facts.key}"))

    async def _count_down(self) -> None:
        """spec.activeDeadlineSeconds, in simulated seconds from the Pod's startTime (as the
        kubelet's active deadline handler); then the Pod is stopped and Failed."""
        deadline = self.facts.active_deadline
        assert deadline is not None
        state = self.state
        started = state.start_time if state is not None else self._started_at
        ran = 0.0 if started is None else (self.ctl.clock.now() - started).total_seconds() * self.ctl.timing.time_scale
        await self._sleep(deadline - ran)
        self._deadline = None
        if (self.state is not None and self.state.terminal) or self.stopping:
            return
        self._expired = True
        self._wind_up()

    async def _run(self, first: bool = True) -> None:
        """The lifecycle (or, after a new image, its restart), then what follows it, in one task.

        A deletion, the deadline or a new image cancels the lifecycle wherever it is waiting
        (_wind_up); that one cancellation is taken back here. Any other (the agent stopping) ends
        the task.
        """
        while not (self.stopping or self._expired) and (first or self._respec):
            if first:
                first, work = False, self._lifecycle()
            else:
                respec, self._respec = self._respec, ()
                work = self._restart_with_new_images(respec)
            self._in_lifecycle = True
            try:
                await work
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._stop_cancel or task is None or task.uncancel() > 0:
                    raise
            except Exception:
                log.exception("pod %s: unexpected error; the Pod is left as it is", self.facts.key)
            finally:
                self._in_lifecycle = self._stop_cancel = False
        await self._after_lifecycle()

    async def _after_lifecycle(self) -> None:
        """The deadline's stop, then (if the Pod is being deleted) its termination."""
        if self._expired and not self.stopping:
            await self._expire()
        if self.stopping:
            await self._terminate()

    # -- the lifecycle

    async def _lifecycle(self) -> None:
        f = self.facts
        for problem in self.workload.problems:
            self.ctl.emit(f, "InvalidWorkloadAnnotation", problem, type="Warning")
        if self.rejection is not None:
            await self._reject(*self.rejection)
            return
        if self.adopted and self.state is not None:
            if self._respec:  # images changed while the agent was down
                respec, self._respec = self._respec, ()
                await self._restart_with_new_images(respec, adopted=True)
            else:
                await self._carry_on(self.state, adopted=True)
            return
        clock = self.ctl.clock
        t0 = clock.monotonic()
        now = clock.now()
        self._set(
            lc.accepted(
                restart_policy=f.restart_policy,
                init_containers=[(c.name, c.image) for c in f.init_containers],
                containers=[(c.name, c.image) for c in f.main_containers],
                host_ip=self.ctl.host_ip,
                pod_ip=self.pod_ip,
                now=now,
                gates=f.readiness_gates,
                others=self._others,
                start_time=self._started_at,
            )
        )
        self._others = ()  # in the state from now on
        # Start-up counts from the take; for a Pod an earlier run took, from its startTime.
        taken = t0 - max(0.0, (now - self._started_at).total_seconds()) if self._started_at else t0
        decision = await self.ctl.caches.resolve(f)
        for event in decision.events:
            self.ctl.events.record(event, clock.now())
        # Written with the next status (one request), like ECI's matched-cache annotations.
        self.ctl.reporter.annotate(f.uid, f.namespace, f.name, decision.annotations)
        start = PodStart(pod=f, node=self.ctl.node_name, decision=decision)
        start.resolve_seconds = clock.monotonic() - t0  # real work, no simulated wait: not scaled
        if decision.failure is not None:
            reason, message = decision.failure
            failed_at = clock.now()
            self._set(lc.failed(self._state, reason, message, failed_at))
            # Recorded as well (outcome "failed", nothing pulled): the comparison shows how many Pods
            # their cache kept from starting. No simulated time passed (resolving is real work, in
            # resolve_seconds), so, as in `vk-provider simulate`, its start-up time is 0.
            start.started_at = failed_at
            await self._record(start)
            return
        images = await self.ctl.images.for_pod(f, decision)
        start.attach_seconds = await images.attach_snapshot()
        for spec in f.init_containers:
            if not await self._run_init(spec, images, start):
                return
        if self.facts is not f:  # a main container's image changed while the init containers ran
            f = self.facts
            images = await self.ctl.images.for_pod(f, decision)
            state = self._state
            for spec in f.main_containers:
                if state.container(spec.name).image != spec.image:
                    state = lc.new_image(state, spec.name, spec.image, clock.now())
            self._set(state)
        # Like the kubelet's sync: each main container in order gets one try at pull, create and
        # start; one whose image fails does not hold up the next (it waits out its back-off and
        # tries again), and one whose image can never be pulled stays Waiting with the reason.
        mains = f.main_containers
        started: list[ContainerSpec] = []
        retrying: list[tuple[ContainerSpec, float]] = []  # and when its back-off ends (loop time)
        for spec in mains:
            try:
                if await self._pull_create_start(spec, images, start, attempt=0):
                    started.append(spec)
            except _RetryPull as retry:
                retrying.append((spec, self._due(retry.delay)))
        if len(started) == len(mains):
            await self._all_started(start, taken)
            if len(started) == 1:
                await self._live(started[0], images)  # the usual Pod: no task of its own for gather to make
                return
        # One that can never be pulled keeps the count above 0.
        unstarted = _Countdown(self, start, taken, left=len(mains) - len(started))
        turn = asyncio.Lock()  # retries take turns (pull, create, start), as the first pass did

        async def retry_then_live(spec: ContainerSpec, due: float) -> None:
            attempt = 1
            while True:
                # The back-off counts from the failure, not from the end of the others' turns.
                if due > clock.monotonic():
                    await clock.sleep(due - clock.monotonic())
                try:
                    async with turn:
                        if not await self._pull_create_start(spec, images, start, attempt=attempt):
                            return
                    break
                except _RetryPull as retry:
                    attempt, due = attempt + 1, self._due(retry.delay)
            await unstarted.one_started()
            await self._live(spec, images)

        # A TaskGroup: an unexpected error in one container's task stops the others with it.
        async with asyncio.TaskGroup() as group:
            for spec in started:
                group.create_task(self._live(spec, images))
            for spec, due in retrying:
                group.create_task(retry_then_live(spec, due))

    async def _all_started(self, start: PodStart, t0: float) -> None:
        """Every main container has started: the Pod's start is complete and recorded."""
        clock = self.ctl.clock
        start.started_at = clock.now()
        # Simulated seconds from the node taking the Pod to all containers started. (The Pod's
        # creationTimestamp has whole-second precision, too coarse to add the watch delay before
        # the node saw the Pod once time runs faster than real time.)
        start.startup_seconds = (clock.monotonic() - t0) * self.ctl.timing.time_scale
        self.ctl.started_total += 1
        await self._record(start)

    async def _record(self, start: PodStart) -> None:
        try:
            await self.ctl.records.record(start)
        except Exception as exc:
            log.warning("pod %s: could not record its start: %s", self.facts.key, exc)

    @property
    def _state(self) -> PodState:
        assert self.state is not None
        return self.state

    async def _reject(self, reason: str, message: str) -> None:
        f = self.facts
        now = self.ctl.clock.now()
        self.ctl.emit(f, reason, message, type="Warning")
        state = lc.accepted(
            restart_policy=f.restart_policy,
            init_containers=[(c.name, c.image) for c in f.init_containers],
            containers=[(c.name, c.image) for c in f.main_containers],
            host_ip=self.ctl.host_ip,
            pod_ip="",
            now=now,
            others=self._others,
        )
        self._set(lc.failed(state, reason, message, now))

    async def _pull(self, spec: ContainerSpec, images: PodImages, start: PodStart | None) -> ImageResult:
        """Pull until it works (with the kubelet's image back-off); raise only for hopeless cases."""
        attempt = 0
        while True:
            try:
                return await self._pull_attempt(spec, images, start, attempt)
            except _RetryPull as retry:
                attempt += 1
                await self._sleep(retry.delay)

    async def _pull_attempt(
        self, spec: ContainerSpec, images: PodImages, start: PodStart | None, attempt: int
    ) -> ImageResult:
        """One try (the ``attempt``-th retry); raises ImagePullError when it is hopeless, and
        _RetryPull with the back-off to wait (the status then says ImagePullBackOff)."""
        f = self.facts
        path = container_field_path(spec.name, spec.init)
        try:
            if images.will_pull(spec):
                self.ctl.emit(f, "Pulling", f'Pulling image "{spec.image}"', field_path=path)
                self._log(spec.name, f'pulling image "{spec.image}"')
            result = await images.pull(spec)
        except ImagePullError as exc:
            now = self.ctl.clock.now()
            if exc.reason == "InvalidImageName":
                self.ctl.emit(f, "InspectFailed", exc.message, type="Warning", field_path=path)
                self._set(lc.waiting(self._state, spec.name, exc.reason, exc.message, now))
                raise
            if exc.reason == "ErrImageNeverPull":
                self.ctl.emit(f, "ErrImageNeverPull", exc.message, type="Warning", field_path=path)
                self._set(lc.waiting(self._state, spec.name, exc.reason, exc.message, now))
                raise
            self.ctl.emit(f, "Failed", f'Failed to pull image "{spec.image}": {exc.message}', type="Warning",
                          field_path=path)  # fmt: skip
            self.ctl.emit(f, "Failed", "Error: ErrImagePull", type="Warning", field_path=path)
            self._set(lc.waiting(self._state, spec.name, "ErrImagePull", exc.message, now))
            if not exc.retry:
                raise
            delay = min(self.ctl.timing.pull_backoff_max, self.ctl.timing.pull_backoff_base * 2**attempt)
            self.ctl.emit(f, "BackOff", f'Back-off pulling image "{spec.image}"', field_path=path)
            self._set(
                lc.waiting(
                    self._state, spec.name, "ImagePullBackOff", f'Back-off pulling image "{spec.image}"',
                    self.ctl.clock.now(),
                )
            )  # fmt: skip
            raise _RetryPull(delay) from exc
        if result.present:
            message = f'Container image "{spec.image}" already present on machine'
        else:
            message = (
                f'Successfully pulled image "{spec.image}" in {result.seconds:.3f}s '
                f"({result.seconds:.3f}s including waiting). Image size: {result.size} bytes."
            )
        self.ctl.emit(f, "Pulled", message, field_path=path)
        self._log(spec.name, message)
        if start is not None:
            start.images.append((spec.image, result))
        return result

    async def _pull_create_start(
        self, spec: ContainerSpec, images: PodImages, start: PodStart | None, *, attempt: int | None = None
    ) -> bool:
        """False if the image can never be pulled. Pulls until it works; or, given ``attempt``,
        tries once and raises _RetryPull when the pull may be tried again."""
        f = self.facts
        path = container_field_path(spec.name, spec.init)
        try:
            if attempt is None:
                result = await self._pull(spec, images, start)
            else:
                result = await self._pull_attempt(spec, images, start, attempt)
        except ImagePullError:
            return False
        t0 = self.ctl.clock.monotonic()
        await self._sleep(self.ctl.timing.create_seconds)
        self.ctl.emit(f, "Created", f"Created container {spec.name}", field_path=path)
        self._log(spec.name, f"created container {spec.name}")
        await self._sleep(self.ctl.timing.start_seconds)
        self._set(lc.started(self._state, spec.name, f.uid, result.image_id, self.ctl.clock.now()))
        self.ctl.emit(f, "Started", f"Started container {spec.name}", field_path=path)
        self._log(spec.name, f"started container {spec.name}")
        self.logs[spec.name].started()
        if start is not None:
            start.container_seconds += (self.ctl.clock.monotonic() - t0) * self.ctl.timing.time_scale
        return True

    async def _run_init(self, spec: ContainerSpec, images: PodImages, start: PodStart) -> bool:
        behaviour = self.workload.of(spec.name)
        while True:
            if not await self._pull_create_start(spec, images, start):
                return False
            await self._sleep(behaviour.run_seconds or 0.0)
            self._exited(spec.name, behaviour.exit_code)
            if behaviour.exit_code == 0:
                return True
            if not lc.should_restart(self._state, spec.name):
                return False  # restartPolicy Never: the Pod is Failed (compute_phase)
            await self._back_off(spec)

    def _exited(self, name: str, exit_code: int) -> None:
        """The container's process ended: its status, its log's last line, the end of its run."""
        self._set(lc.exited(self._state, name, exit_code, self.ctl.clock.now()))
        self._log(name, f"exited with code {exit_code}")
        self.logs[name].stopped()

    def _back_off_of(self, c: lc.Container) -> float:
        """The back-off a waiting container is serving, in simulated seconds (served again in
        full: when it began is not kept); 0 for one not backing off."""
        timing = self.ctl.timing
        reason = c.state.reason if isinstance(c.state, lc.Waiting) else ""
        if reason == "CrashLoopBackOff":
            return lc.restart_delay(c.restart_count, timing.crash_backoff_base, timing.crash_backoff_max)
        return timing.pull_backoff_base if reason in ("ImagePullBackOff", "ErrImagePull") else 0.0

    async def _back_off(self, spec: ContainerSpec) -> None:
        f = self.facts
        count = self._state.container(spec.name).restart_count + 1
        delay = lc.restart_delay(count, self.ctl.timing.crash_backoff_base, self.ctl.timing.crash_backoff_max)
        message = f"back-off {delay:.0f}s restarting failed container={spec.name} pod={f.name}_{f.namespace}({f.uid})"
        self._set(lc.back_off(self._state, spec.name, message, self.ctl.clock.now()))
        self.ctl.emit(
            f, "BackOff", "Back-off restarting failed container", type="Warning",
            field_path=container_field_path(spec.name, spec.init),
        )  # fmt: skip
        await self._sleep(delay)

    async def _live(self, spec: ContainerSpec, images: PodImages, *, ran_for: float = 0.0) -> None:
        """A started main container: turns ready, maybe exits, maybe restarts; until the Pod stops."""
        behaviour = self.workload.of(spec.name)
        while True:
            if behaviour.run_seconds is None:
                # Runs until the Pod is deleted: once ready there is nothing left to simulate, and no
                # task is left behind for it (10,000 Running Pods must stay cheap). request_stop()
                # starts the termination when the Pod is deleted.
                await self._ready_after(spec.name, max(0.0, behaviour.ready_after - ran_for))
                return
            ready_task = asyncio.create_task(self._ready_after(spec.name, max(0.0, behaviour.ready_after - ran_for)))
            try:
                await self._sleep(max(0.0, behaviour.run_seconds - ran_for))
            finally:
                ready_task.cancel()
                await asyncio.gather(ready_task, return_exceptions=True)
            ran_for = 0.0
            self._exited(spec.name, behaviour.exit_code)
            if not lc.should_restart(self._state, spec.name):
                return
            await self._back_off(spec)
            if not await self._pull_create_start(spec, images, None):
                return

    async def _ready_after(self, name: str, seconds: float) -> None:
        await self._sleep(seconds)
        self._set(lc.became_ready(self._state, name, self.ctl.clock.now()))
        self._log(name, "container is ready")

    async def _restart_with_new_images(self, names: tuple[str, ...], *, adopted: bool = False) -> None:
        """Containers whose image the spec changed: a running one is stopped (Killing; its run
        ends now, so a second change or a deletion during the stop does not stop it again), then
        each starts from its new image; the others carry on (``adopted``: see :meth:`_carry_on`)."""
        f = self.facts
        slowest = 0.0
        state = self._state
        images = {c.name: c.image for c in f.main_containers}
        for name in names:
            if state.container(name).running:
                self.ctl.emit(f, "Killing", f"Container {name} definition changed, will be restarted",
                              field_path=container_field_path(name, False))  # fmt: skip
                self._log(name, f"stopping container {name}")
                self.logs[name].stopped()
                slowest = max(slowest, self.workload.of(name).stop_seconds)
            state = lc.new_image(state, name, images[name], self.ctl.clock.now())
        self._set(state)
        await self._sleep(min(slowest, self._grace))
        await self._carry_on(self._state, adopted=adopted, fresh=names)

    async def _carry_on(self, state: PodState, *, adopted: bool = False, fresh: tuple[str, ...] = ()) -> None:
        """Containers keep running where they are (same startedAt); one still waiting (to restart,
        to start at all because its image failed, or to start from a new image: ``fresh``) goes
        on to start. After an agent restart (``adopted``) the running ones' logs start over, and a
        Pod that ended with containers still running (its deadline passed as the agent stopped)
        has them stopped; otherwise one waiting out a back-off waits it out again first."""
        if state.terminal:
            if adopted and any(c.running for c in state.containers):
                await self._kill(running_only=True)
            return
        clock = self.ctl.clock
        now = clock.now()
        waiting = sum(1 for c in state.containers if not c.init and isinstance(c.state, lc.Waiting))
        # The cache decision the first run wrote on the Pod, for the images still to pull (read
        # back, not made again: no Events, no hit counted); none needed when every one runs.
        decision = await self.ctl.caches.resolve(self.facts) if waiting else CacheDecision()
        images = await self.ctl.images.for_pod(self.facts, decision)
        # A Pod that had not started yet is recorded when its last main container starts, with
        # its start-up counted from when the first run took it (its startTime).
        taken = state.start_time or now
        t0 = clock.monotonic() - max(0.0, (now - taken).total_seconds())
        start = PodStart(pod=self.facts, node=self.ctl.node_name, decision=decision)
        unstarted = _Countdown(self, start if state.phase is Phase.PENDING else None, t0, left=waiting)

        async def start_then_live(spec: ContainerSpec, back_off: float) -> None:
            await self._sleep(back_off)
            if not await self._pull_create_start(spec, images, unstarted.start):
                return
            await unstarted.one_started()
            await self._live(spec, images)

        lives = []
        for spec in self.facts.main_containers:
            try:
                c = state.container(spec.name)
            except KeyError:
                continue
            if isinstance(c.state, lc.Running):
                ran = (now - c.state.started_at).total_seconds() * self.ctl.timing.time_scale
                if adopted:
                    # Its log starts over here (the earlier lines went with the agent), in an open
                    # run, so `kubectl logs -f` follows it and its exit line has a run to go in.
                    self._log(spec.name, f"container {spec.name} running since {rfc3339(c.state.started_at)}")
                    self.logs[spec.name].started()
                lives.append(self._live(spec, images, ran_for=ran))
            elif isinstance(c.state, lc.Waiting):
                if c.has_run and spec.name not in fresh:  # crash-looping, say: it starts again from the image it has
                    images.ran_before(spec)
                lives.append(start_then_live(spec, 0.0 if adopted or spec.name in fresh else self._back_off_of(c)))
        async with asyncio.TaskGroup() as group:
            for live in lives:
                group.create_task(live)

    async def _expire(self) -> None:
        """Past spec.activeDeadlineSeconds: the containers are stopped and the Pod Failed (kept)."""
        f = self.facts
        message = "Pod was active on the node longer than the specified deadline"
        self.ctl.emit(f, "DeadlineExceeded", message)  # Normal, as the kubelet's active deadline handler
        log.info("pod %s: %s", f.key, message)
        # As the kubelet: Failed at once (no longer Ready), then its containers are stopped.
        self._set(lc.stopped_by_node(self._state, "DeadlineExceeded", message, self.ctl.clock.now()))
        await self._kill(running_only=True)

    async def _terminate(self) -> None:
        """Stop within the grace period, report the final status, then remove the Pod."""
        await self._kill()
        await self.ctl.reporter.flushed(self.facts.uid)  # its last status first (a deadline's, say)
        await self.ctl.api.delete_now(self.facts.namespace, self.facts.name, self.facts.uid)

    async def _kill(self, *, running_only: bool = False) -> bool:
        """Stop the containers still running within the grace period (Killing events); False if
        the Pod had nothing left to stop. ``running_only``: see ``lc.killed``."""
        f = self.facts
        state = self.state
        if state is not None and (not state.terminal or running_only):
            slowest = 0.0
            for c in state.containers:
                if c.running:
                    self.ctl.emit(f, "Killing", f"Stopping container {c.name}",
                                  field_path=container_field_path(c.name, c.init))  # fmt: skip
                    self._log(c.name, f"stopping container {c.name}")
                    slowest = max(slowest, self.workload.of(c.name).stop_seconds)
            await self._sleep(min(slowest, self._grace))
            self._set(lc.killed(self._state, self.ctl.clock.now(), running_only=running_only))
            for c in state.containers:
                if c.running:
                    self.logs[c.name].stopped()
            return True
        return False


@dataclass(slots=True)
class _Countdown:
    """The main containers still to start: when the last one does, the Pod's start is complete
    and recorded (when there is one to record: a Pod adopted Running has none)."""

    worker: PodWorker
    start: PodStart | None
    t0: float
    left: int

    async def one_started(self) -> None:
        self.left -= 1
        if self.left == 0 and self.start is not None:
            await self.worker._all_started(self.start, self.t0)


def _time_or_none(text: object) -> datetime | None:
    try:
        moment = lc.parse_time(text) if isinstance(text, str) else None
    except ValueError:  # not a time (edited by hand): as if there were none
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def node_allocatable(cpu: str, memory: str, pods: int) -> Allocatable:
    from vk_provider.domain.quantity import milli, parse_quantity, whole

    c = parse_quantity(cpu)
    m = parse_quantity(memory)
    return Allocatable(milli(c) if c else 0, whole(m) if m else 0, pods)
