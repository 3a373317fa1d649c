"""The Pod lifecycle as a pure state machine, and the Pod status it renders to.

PURE: every transition takes the current :class:`PodState` and ``now`` and returns a new state;
nothing here sleeps, reads a clock or talks to the API server. The pod worker (controllers/pods)
decides *when* a transition happens; this module decides *what the Pod looks like* afterwards,
following the kubelet's rules for phase (``getPhase``), conditions and container states.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from vk_provider.domain.node import rfc3339

JSON = dict[str, Any]


class Phase(enum.StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Running:
    started_at: datetime


@dataclass(frozen=True, slots=True)
class Terminated:
    exit_code: int
    reason: str
    finished_at: datetime
    started_at: datetime | None = None
    message: str = ""
    container_id: str = ""


ContainerStateValue = Waiting | Running | Terminated


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    image: str
    init: bool = False
    state: ContainerStateValue = Waiting("ContainerCreating")
    last_state: Terminated | None = None
    ready: bool = False
    restart_count: int = 0
    image_id: str = ""
    container_id: str = ""

    @property
    def running(self) -> bool:
        return isinstance(self.state, Running)

    @property
    def succeeded(self) -> bool:
        return isinstance(self.state, Terminated) and self.state.exit_code == 0

    @property
    def has_run(self) -> bool:
        """Started at least once: running, ended, or waiting to run again."""
        return not isinstance(self.state, Waiting) or self.last_state is not None


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" / "False"
    since: datetime
    reason: str = ""
    message: str = ""


# The conditions the kubelet writes (kubetypes.PodConditionsByKubelet); any other (a readiness
# gate's, say) belongs to another writer, and the kubelet keeps it as it is.
KUBELET_CONDITIONS = frozenset({"PodScheduled", "Ready", "Initialized", "ContainersReady"})


@dataclass(frozen=True, slots=True)
class PodState:
    phase: Phase
    restart_policy: str
    host_ip: str
    pod_ip: str
    start_time: datetime | None
    containers: tuple[Container, ...]
    conditions: tuple[Condition, ...] = ()
    reason: str = ""
    message: str = ""
    gates: tuple[str, ...] = ()  # spec.readinessGates' condition types
    others: tuple[JSON, ...] = ()  # the conditions other writers own, as the API server has them

    def container(self, name: str) -> Container:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def init_containers(self) -> tuple[Container, ...]:
        return tuple(c for c in self.containers if c.init)

    @property
    def main_containers(self) -> tuple[Container, ...]:
        return tuple(c for c in self.containers if not c.init)

    @property
    def terminal(self) -> bool:
        return self.phase in (Phase.SUCCEEDED, Phase.FAILED)


def container_id_for(pod_uid: str, name: str, restart_count: int) -> str:
    digest = hashlib.sha256(f"{pod_uid}/{name}/{restart_count}".encode()).hexdigest()
    return f"containerd://{digest}"


def accepted(
    *,
    restart_policy: str,
    init_containers: Sequence[tuple[str, str]],
    containers: Sequence[tuple[str, str]],
    host_ip: str,
    pod_ip: str,
    now: datetime,
    gates: tuple[str, ...] = (),
    others: tuple[JSON, ...] = (),
    start_time: datetime | None = None,
) -> PodState:
    """A Pod the node has just taken: Pending, its containers waiting to be created; ``gates``
    its readiness gates, ``others`` the conditions other writers have given it; ``start_time``
    the one an earlier run gave it (kept, as the kubelet keeps it), else ``now``."""
    waiting_main = Waiting("PodInitializing") if init_containers else Waiting("ContainerCreating")
    members = [Container(n, i, init=True, state=Waiting("PodInitializing")) for n, i in init_containers]
    members += [Container(n, i, state=waiting_main) for n, i in containers]
    state = PodState(
        phase=Phase.PENDING,
        restart_policy=restart_policy or "Always",
        host_ip=host_ip,
        pod_ip=pod_ip,
        start_time=start_time or now,
        containers=tuple(members),
        gates=gates,
        others=others,
    )
    return recompute(state, now)


_CONTAINER_FIELDS = frozenset(f.name for f in fields(Container))


def _update(pod: PodState, name: str, now: datetime, **changes: Any) -> PodState:
    members = tuple(_changed(c, changes) if c.name == name else c for c in pod.containers)
    return recompute(_with(pod, containers=members), now)


def _changed(c: Container, changes: dict[str, Any]) -> Container:
    """``dataclasses.replace(c, **changes)``, without its per-call introspection."""
    if not changes.keys() <= _CONTAINER_FIELDS:
        raise TypeError(f"not fields of Container: {sorted(changes.keys() - _CONTAINER_FIELDS)}")
    get = changes.get
    return Container(
        get("name", c.name),
        get("image", c.image),
        get("init", c.init),
        get("state", c.state),
        get("last_state", c.last_state),
        get("ready", c.ready),
        get("restart_count", c.restart_count),
        get("image_id", c.image_id),
        get("container_id", c.container_id),
    )


def _with(
    pod: PodState,
    *,
    phase: Phase | None = None,
    containers: tuple[Container, ...] | None = None,
    conditions: tuple[Condition, ...] | None = None,
    others: tuple[JSON, ...] | None = None,
) -> PodState:
    """``dataclasses.replace`` for the fields transitions change, at a fraction of its cost."""
    return PodState(
        pod.phase if phase is None else phase,
        pod.restart_policy,
        pod.host_ip,
        pod.pod_ip,
        pod.start_time,
        pod.containers if containers is None else containers,
        pod.conditions if conditions is None else conditions,
        pod.reason,
        pod.message,
        pod.gates,
        pod.others if others is None else others,
    )


def other_conditions(status: JSON | None) -> tuple[JSON, ...]:
    """The conditions in ``status`` that other writers own (see KUBELET_CONDITIONS)."""
    found = (status or {}).get("conditions")
    if not isinstance(found, list):
        return ()
    return tuple(
        c
        for c in found
        if isinstance(c, dict) and isinstance(c.get("type"), str) and c["type"] not in KUBELET_CONDITIONS
    )


def with_others(state: PodState, others: tuple[JSON, ...], now: datetime) -> PodState:
    """Other writers' conditions changed (a readiness gate's controller wrote its condition)."""
    return recompute(_with(state, others=others), now)


def waiting(state: PodState, name: str, reason: str, message: str, now: datetime) -> PodState:
    return _update(state, name, now, state=Waiting(reason, message), ready=False)


def started(state: PodState, name: str, pod_uid: str, image_id: str, now: datetime) -> PodState:
    c = state.container(name)
    cid = container_id_for(pod_uid, name, c.restart_count)
    return _update(state, name, now, state=Running(now), ready=False, image_id=image_id, container_id=cid)


def became_ready(state: PodState, name: str, now: datetime) -> PodState:
    if not state.container(name).running:
        return state
    return _update(state, name, now, ready=True)


def exited(state: PodState, name: str, exit_code: int, now: datetime, reason: str = "") -> PodState:
    c = state.container(name)
    started_at = c.state.started_at if isinstance(c.state, Running) else None
    term = Terminated(
        exit_code=exit_code,
        reason=reason or ("Completed" if exit_code == 0 else "Error"),
        finished_at=now,
        started_at=started_at,
        container_id=c.container_id,
    )
    return _update(state, name, now, state=term, ready=False)


def should_restart(state: PodState, name: str) -> bool:
    """The kubelet's rule: Always restarts any exit, OnFailure a non-zero one, Never none."""
    c = state.container(name)
    if not isinstance(c.state, Terminated):
        return False
    if c.init:
        return c.state.exit_code != 0 and state.restart_policy != "Never"
    if state.restart_policy == "Always":
        return True
    return state.restart_policy == "OnFailure" and c.state.exit_code != 0


def back_off(state: PodState, name: str, message: str, now: datetime) -> PodState:
    """The container exited and will be restarted: CrashLoopBackOff, lastState, restartCount + 1."""
    c = state.container(name)
    last = c.state if isinstance(c.state, Terminated) else c.last_state
    return _update(
        state,
        name,
        now,
        state=Waiting("CrashLoopBackOff", message),
        last_state=last,
        restart_count=c.restart_count + 1,
        ready=False,
    )


# A container that ran, waiting to be created again: restarted for a new image, not crashed. The
# Pod stays Running through it, whatever its restart policy (the kubelet restarts a container whose
# definition changed in the same sync that stops it).
RECREATING = Waiting("ContainerCreating")


def new_image(state: PodState, name: str, image: str, now: datetime) -> PodState:
    """The container's image was changed in the Pod's spec (``kubectl set image``): the kubelet
    stops a running container (its run is the lastState, the restartCount grows) and creates it
    again from the new image; one waiting to start (or to restart) starts from the new image."""
    c = state.container(name)
    if isinstance(c.state, Running):
        ended = Terminated(0, "Completed", now, c.state.started_at, container_id=c.container_id)
        return _update(
            state,
            name,
            now,
            image=image,
            state=RECREATING,
            last_state=ended,
            restart_count=c.restart_count + 1,
            ready=False,
        )
    return _update(state, name, now, image=image, state=Waiting("ContainerCreating"), ready=False)


def restart_delay(restart_count: int, base: float = 10.0, cap: float = 300.0) -> float:
    """The kubelet's crash-loop back-off: 10 s, doubled per restart, at most 5 minutes."""
    return float(min(cap, base * (2 ** max(0, restart_count - 1))))


def stopped_by_node(state: PodState, reason: str, message: str, now: datetime) -> PodState:
    """The node ends the Pod (its active deadline passed): Failed with a reason at once, as the
    kubelet reports it, while its containers are still being stopped (see :func:`killed`)."""
    members = tuple(replace(c, ready=False) if c.ready else c for c in state.containers)
    return recompute(replace(state, containers=members, phase=Phase.FAILED, reason=reason, message=message), now)


def failed(state: PodState, reason: str, message: str, now: datetime) -> PodState:
    """The Pod cannot run at all (admission, an unusable image cache): Failed with a reason."""
    members = tuple(
        c if isinstance(c.state, Terminated) else replace(c, state=Waiting(reason, message), ready=False)
        for c in state.containers
    )
    return recompute(replace(state, containers=members, phase=Phase.FAILED, reason=reason, message=message), now)


def killed(state: PodState, now: datetime, *, running_only: bool = False) -> PodState:
    """Every container stopped because the Pod is being deleted; with ``running_only`` (a Pod
    kept, Failed: its deadline passed) those that were not running stay as they were."""
    members = []
    for c in state.containers:
        if isinstance(c.state, Terminated) or (running_only and not isinstance(c.state, Running)):
            members.append(c)
            continue
        started_at = c.state.started_at if isinstance(c.state, Running) else None
        code = 0 if isinstance(c.state, Running) else 137
        reason = "Completed" if code == 0 else "ContainerStatusUnknown"
        members.append(
            replace(
                c,
                ready=False,
                state=Terminated(code, reason, now, started_at, container_id=c.container_id),
            )
        )
    return recompute(replace(state, containers=tuple(members)), now)


def log_run(c: Container, pod: str, *, previous: bool = False) -> int | str:
    """Which run of container ``c`` ``kubectl logs`` reads, counted back from its latest run (0:
    the latest, 1: the one before), or the kubelet's refusal (the text of its HTTP 400).

    As the kubelet's validateContainerLogStatus: ``previous`` is the run its lastState describes;
    otherwise a running or exited container's own run, else (waiting to restart, or killed before
    it started again) the run its lastState describes, else the reason it has none yet.
    """
    state = c.state
    ran = isinstance(state, Running) or (isinstance(state, Terminated) and state.started_at is not None)
    if previous:
        if c.last_state is None:
            return f'previous terminated container "{c.name}" in pod "{pod}" not found'
        return 1 if ran else 0
    if ran:
        return 0
    if c.last_state is not None:
        return 0
    if isinstance(state, Terminated):
        return f'container "{c.name}" in pod "{pod}" is terminated'
    reason = state.reason if isinstance(state, Waiting) else ""
    why = {"ErrImagePull": "image can't be pulled", "ImagePullBackOff": "trying and failing to pull image"}
    return f'container "{c.name}" in pod "{pod}" is waiting to start: {why.get(reason, reason)}'


def compute_phase(state: PodState) -> Phase:
    """kubelet getPhase: init containers first, then the main containers' states."""
    if state.phase is Phase.FAILED and state.reason:
        return Phase.FAILED  # failed by a decision (admission, cache), not by containers
    for c in state.init_containers:
        if c.succeeded:
            continue
        if isinstance(c.state, Terminated) and state.restart_policy == "Never":
            return Phase.FAILED
        return Phase.PENDING
    running = waiting = stopped = succeeded = 0
    for c in state.main_containers:
        if isinstance(c.state, Running):
            running += 1
        elif isinstance(c.state, Terminated):
            stopped += 1
            succeeded += c.state.exit_code == 0
        elif c.last_state is not None and c.state == RECREATING:
            running += 1  # stopped for a new image and being started again at once (new_image)
        elif c.last_state is not None:
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return Phase.PENDING
    if running:
        return Phase.RUNNING
    if stopped:
        if state.restart_policy == "Always":
            return Phase.RUNNING
        if stopped == succeeded:
            return Phase.SUCCEEDED
        if state.restart_policy == "Never":
            return Phase.FAILED
        return Phase.RUNNING
    return Phase.PENDING


def recompute(state: PodState, now: datetime) -> PodState:
    phase = compute_phase(state)
    initialized = all_ready = True
    has_main = False
    for c in state.containers:
        if c.init:
            initialized = initialized and c.succeeded
        else:
            has_main = True
            all_ready = all_ready and c.ready
    containers_ready = has_main and all_ready and phase is not Phase.SUCCEEDED and phase is not Phase.FAILED
    not_ready = "PodCompleted" if phase is Phase.SUCCEEDED else "ContainersNotReady"
    ready_reason = "" if containers_ready else not_ready
    # Ready also waits for the readiness gates (the kubelet's GeneratePodReadyCondition).
    ready, why, gates_message = containers_ready, ready_reason, ""
    if containers_ready and state.gates:
        gates_message = _gates_not_ready(state.gates, state.others)
        if gates_message:
            ready, why = False, "ReadinessGatesNotReady"
    wanted = (
        ("Initialized", initialized, "" if initialized else "ContainersNotInitialized", ""),
        ("Ready", ready, why, gates_message),
        ("ContainersReady", containers_ready, ready_reason, ""),
        ("PodScheduled", True, "", ""),
    )
    old = state.conditions
    if len(old) == len(wanted) and all(
        o.type == kind and (o.status == "True") == ok and o.reason == reason and o.message == message
        for o, (kind, ok, reason, message) in zip(old, wanted, strict=True)
    ):
        conditions = old  # nothing changed: the same conditions, with their transition times
    else:
        since = {c.type: (c.status, c.since) for c in old}
        made = []
        for kind, ok, reason, message in wanted:
            status = "True" if ok else "False"
            prev = since.get(kind)
            made.append(
                Condition(kind, status, prev[1] if prev is not None and prev[0] == status else now, reason, message)
            )
        conditions = tuple(made)
    if phase is state.phase and conditions is old:
        return state
    return _with(state, phase=phase, conditions=conditions)


def _gates_not_ready(gates: tuple[str, ...], others: tuple[JSON, ...]) -> str:
    """Why the readiness gates hold the Pod back, in the kubelet's words; empty if they do not."""
    statuses = {c.get("type"): c.get("status") for c in others}
    problems = []
    for gate in gates:
        status = statuses.get(gate)
        if status is None:
            problems.append(f'corresponding condition of pod readiness gate "{gate}" does not exist.')
        elif status != "True":
            problems.append(f'the status of pod readiness gate "{gate}" is not "True", but {status}')
    return ", ".join(problems)


# ------------------------------------------------------------------ rendering


def render_status(state: PodState) -> JSON:
    """The Pod's ``status``, as the API server should have it: every field we own is present
    (null when unset), and other writers' conditions after ours (the write itself sends only
    ours: ``kube.pods.conditions_merged``).

    ``qosClass`` is not ours: the API server sets it when the Pod is created, and it stays.
    """
    init: list[JSON] = []
    main: list[JSON] = []
    for c in state.containers:
        (init if c.init else main).append(_container(c))
    conditions = [_condition(c) for c in state.conditions]
    if state.others:  # as the API server has them: compared with its copy, not written
        conditions.extend(state.others)
    return {
        "phase": state.phase.value,
        "conditions": conditions,
        "hostIP": state.host_ip,
        "podIP": state.pod_ip or None,
        "podIPs": [{"ip": state.pod_ip}] if state.pod_ip else None,
        "startTime": _time(state.start_time) if state.start_time else None,
        "initContainerStatuses": init or None,
        "containerStatuses": main,
        "reason": state.reason or None,
        "message": state.message or None,
    }


def status_summary(status: JSON | None) -> tuple[object, ...]:
    """What a Pod's status says that its node answers for (phase, reason, conditions, each
    container's readiness, restarts and state), read alike from a rendered status and from the
    API server's copy: they differ only when another writer changed the status."""
    status = status or {}

    def containers(key: str) -> tuple[tuple[object, ...], ...]:
        found = status.get(key) or []
        return tuple(
            sorted(
                (
                    str(c.get("name")),
                    bool(c.get("ready")),
                    c.get("restartCount") or 0,
                    tuple(sorted((c.get("state") or {}).keys())),
                )
                for c in found
                if isinstance(c, dict)
            )
        )

    conditions = status.get("conditions") or []
    return (
        status.get("phase"),
        status.get("reason") or None,
        tuple(sorted((str(c.get("type")), str(c.get("status"))) for c in conditions if isinstance(c, dict))),
        containers("initContainerStatuses"),
        containers("containerStatuses"),
    )


# One status renders the same few moments several times (conditions, start, container states).
_time = functools.lru_cache(maxsize=1024)(rfc3339)


def _condition(c: Condition) -> JSON:
    out: JSON = {"type": c.type, "status": c.status, "lastProbeTime": None, "lastTransitionTime": _time(c.since)}
    if c.reason:
        out["reason"] = c.reason
    if c.message:
        out["message"] = c.message
    return out


def _container(c: Container) -> JSON:
    out: JSON = {
        "name": c.name,
        "image": c.image,
        "imageID": c.image_id,
        "ready": c.ready,
        "restartCount": c.restart_count,
        "started": c.running,
        "state": _state(c.state),
        "lastState": _state(c.last_state) if c.last_state else {},
    }
    if c.container_id:
        out["containerID"] = c.container_id
    return out


def _state(s: ContainerStateValue) -> JSON:
    if isinstance(s, Waiting):
        body: JSON = {"reason": s.reason}
        if s.message:
            body["message"] = s.message
        return {"waiting": body}
    if isinstance(s, Running):
        return {"running": {"startedAt": _time(s.started_at)}}
    term: JSON = {"exitCode": s.exit_code, "reason": s.reason, "finishedAt": _time(s.finished_at)}
    term["startedAt"] = _time(s.started_at) if s.started_at else None
    if s.message:
        term["message"] = s.message
    if s.container_id:
        term["containerID"] = s.container_id
    return {"terminated": term}


# ------------------------------------------------------------------ adoption after a restart


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def adopt(status: JSON, restart_policy: str, fallback: datetime, gates: tuple[str, ...] = ()) -> PodState | None:
    """Rebuild the state of a Pod this node was already running (agent restart).

    Returns ``None`` when the status is not one we can continue from (never started, or
    incomplete): such a Pod is started again from the beginning. A Pending Pod is continued when
    one of its main containers has started (another one's image is failing): those keep running.
    """
    if status.get("phase") not in ("Running", "Succeeded", "Failed", "Pending"):
        return None
    members: list[Container] = []
    try:
        for init, key in ((True, "initContainerStatuses"), (False, "containerStatuses")):
            for cs in status.get(key) or ():
                members.append(
                    Container(
                        name=cs["name"],
                        image=cs.get("image", ""),
                        init=init,
                        state=_parse_state(cs.get("state") or {}, fallback),
                        last_state=_terminated(cs.get("lastState") or {}, fallback),
                        ready=bool(cs.get("ready")),
                        restart_count=int(cs.get("restartCount", 0)),
                        image_id=cs.get("imageID", ""),
                        container_id=cs.get("containerID", ""),
                    )
                )
    except (KeyError, TypeError, ValueError):
        return None
    if not any(not c.init for c in members):
        return None
    if status["phase"] == "Pending" and not any(not c.init and c.has_run for c in members):
        return None  # nothing has run yet: start from the beginning
    conditions = tuple(
        Condition(
            c["type"],
            c["status"],
            parse_time(c.get("lastTransitionTime")) or fallback,
            c.get("reason", ""),
            c.get("message", ""),
        )
        for c in status.get("conditions") or ()
        if "type" in c and "status" in c and c["type"] in KUBELET_CONDITIONS
    )
    return PodState(
        phase=Phase(status["phase"]),
        restart_policy=restart_policy or "Always",
        host_ip=status.get("hostIP", ""),
        pod_ip=status.get("podIP", ""),
        start_time=parse_time(status.get("startTime")) or fallback,
        containers=tuple(members),
        conditions=conditions,
        reason=status.get("reason", "") or "",
        message=status.get("message", "") or "",
        gates=gates,
        others=other_conditions(status),
    )


def _parse_state(body: JSON, fallback: datetime) -> ContainerStateValue:
    if "running" in body:
        return Running(parse_time(body["running"].get("startedAt")) or fallback)
    term = _terminated({"terminated": body["terminated"]} if "terminated" in body else {}, fallback)
    if term is not None:
        return term
    waiting_body = body.get("waiting") or {}
    return Waiting(waiting_body.get("reason", "ContainerCreating"), waiting_body.get("message", ""))


def _terminated(body: JSON, fallback: datetime) -> Terminated | None:
    t = body.get("terminated")
    if not t:
        return None
    return Terminated(
        exit_code=int(t.get("exitCode", 0)),
        reason=t.get("reason", ""),
        finished_at=parse_time(t.get("finishedAt")) or fallback,
        started_at=parse_time(t.get("startedAt")),
        message=t.get("message", ""),
        container_id=t.get("containerID", ""),
    )


def names(containers: Iterable[Container]) -> list[str]:
    return [c.name for c in containers]
