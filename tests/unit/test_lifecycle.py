"""The pure Pod state machine: kubelet phase rules, conditions, restarts, rendering, adoption."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vk_provider.domain import lifecycle as lc
from vk_provider.domain.lifecycle import Phase

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_pod(policy: str = "Always", init: bool = False, containers: int = 1) -> lc.PodState:
    return lc.accepted(
        restart_policy=policy,
        init_containers=[("init", "busybox")] if init else [],
        containers=[(f"c{i}", "nginx") for i in range(containers)],
        host_ip="10.0.0.1",
        pod_ip="10.234.0.5",
        now=T0,
    )


def cond(state: lc.PodState, kind: str) -> lc.Condition:
    return next(c for c in state.conditions if c.type == kind)


def test_accepted_is_pending_and_creating() -> None:
    s = new_pod()
    assert s.phase is Phase.PENDING
    assert s.container("c0").state == lc.Waiting("ContainerCreating")
    assert cond(s, "PodScheduled").status == "True"
    assert cond(s, "Initialized").status == "True"
    assert cond(s, "Ready").status == "False"


def test_init_containers_gate_initialized_and_main_waits_pod_initializing() -> None:
    s = new_pod(init=True)
    assert cond(s, "Initialized").status == "False"
    assert s.container("c0").state == lc.Waiting("PodInitializing")
    s = lc.started(s, "init", "uid", "img", at(1))
    assert s.phase is Phase.PENDING
    s = lc.exited(s, "init", 0, at(2))
    assert cond(s, "Initialized").status == "True"
    assert cond(s, "Initialized").since == at(2)


def test_running_then_ready_sets_transition_times_once() -> None:
    s = lc.started(new_pod(), "c0", "uid", "img", at(5))
    assert s.phase is Phase.RUNNING
    assert cond(s, "Ready").status == "False"
    s = lc.became_ready(s, "c0", at(7))
    assert cond(s, "Ready").status == "True"
    assert cond(s, "Ready").since == at(7)
    s = lc.recompute(s, at(9))
    assert cond(s, "Ready").since == at(7)  # unchanged status keeps its transition time


def test_all_main_containers_must_run_before_running() -> None:
    s = new_pod(containers=2)
    s = lc.started(s, "c0", "uid", "img", at(1))
    assert s.phase is Phase.PENDING  # c1 still waiting
    s = lc.started(s, "c1", "uid", "img", at(2))
    assert s.phase is Phase.RUNNING


@pytest.mark.parametrize(
    ("policy", "code", "restart", "phase"),
    [
        ("Always", 0, True, Phase.RUNNING),
        ("Always", 1, True, Phase.RUNNING),
        ("OnFailure", 0, False, Phase.SUCCEEDED),
        ("OnFailure", 2, True, Phase.RUNNING),
        ("Never", 0, False, Phase.SUCCEEDED),
        ("Never", 1, False, Phase.FAILED),
    ],
)
def test_exit_and_restart_policy(policy: str, code: int, restart: bool, phase: Phase) -> None:
    s = lc.started(new_pod(policy), "c0", "uid", "img", at(1))
    s = lc.exited(s, "c0", code, at(3))
    assert lc.should_restart(s, "c0") is restart
    if restart:
        s = lc.back_off(s, "c0", "back-off 10s", at(3))
        assert s.container("c0").restart_count == 1
        assert s.container("c0").state == lc.Waiting("CrashLoopBackOff", "back-off 10s")
        assert s.container("c0").last_state is not None
        assert s.container("c0").last_state.exit_code == code  # type: ignore[union-attr]
    assert s.phase is phase


def test_failed_init_with_never_fails_the_pod() -> None:
    s = new_pod("Never", init=True)
    s = lc.exited(lc.started(s, "init", "uid", "img", at(1)), "init", 1, at(2))
    assert s.phase is Phase.FAILED
    assert not lc.should_restart(s, "init")


def test_restart_delay_doubles_and_caps() -> None:
    assert [lc.restart_delay(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [10, 20, 40, 80, 160, 300, 300]


def test_failed_by_decision_keeps_reason() -> None:
    s = lc.failed(new_pod(), "OutOfcpu", "Node didn't have enough resource: cpu", at(1))
    assert s.phase is Phase.FAILED
    body = lc.render_status(s)
    assert body["reason"] == "OutOfcpu"
    assert body["containerStatuses"][0]["state"]["waiting"]["reason"] == "OutOfcpu"


def test_killed_terminates_running_containers() -> None:
    s = lc.started(new_pod(containers=2), "c0", "uid", "img", at(1))
    s = lc.killed(s, at(5))
    c0, c1 = s.container("c0").state, s.container("c1").state
    assert isinstance(c0, lc.Terminated)
    assert c0.exit_code == 0
    assert c0.started_at == at(1)
    assert isinstance(c1, lc.Terminated)
    assert c1.exit_code == 137


def test_render_status_golden() -> None:
    s = lc.became_ready(lc.started(new_pod(), "c0", "uid-1", "docker.io/library/nginx@sha256:ab", at(4)), "c0", at(4))
    assert lc.render_status(s) == {
        "phase": "Running",
        "conditions": [
            {
                "type": "Initialized",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
            {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "2026-01-01T00:00:04Z"},
            {
                "type": "ContainersReady",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": "2026-01-01T00:00:04Z",
            },
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
        ],
        "hostIP": "10.0.0.1",
        "podIP": "10.234.0.5",
        "podIPs": [{"ip": "10.234.0.5"}],
        "startTime": "2026-01-01T00:00:00Z",
        "initContainerStatuses": None,
        "containerStatuses": [
            {
                "name": "c0",
                "image": "nginx",
                "imageID": "docker.io/library/nginx@sha256:ab",
                "ready": True,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": "2026-01-01T00:00:04Z"}},
                "lastState": {},
                "containerID": lc.container_id_for("uid-1", "c0", 0),
            }
        ],
        "reason": None,
        "message": None,
    }


def test_adopt_round_trips_a_running_status() -> None:
    s = lc.became_ready(lc.started(new_pod(), "c0", "uid-1", "img", at(4)), "c0", at(4))
    body = lc.render_status(s)
    adopted = lc.adopt(body, "Always", at(100))
    assert adopted is not None
    assert lc.render_status(adopted) == body


@pytest.mark.parametrize(
    "status",
    [{}, {"phase": "Pending"}, {"phase": "Running"}, {"phase": "Running", "containerStatuses": [{"nope": 1}]}],
)
def test_adopt_refuses_what_it_cannot_continue(status: dict[str, object]) -> None:
    assert lc.adopt(status, "Always", T0) is None


def test_recompute_of_an_unchanged_pod_keeps_it_and_its_transition_times() -> None:
    s = lc.became_ready(lc.started(new_pod(), "c0", "uid", "img@sha256:1", at(1)), "c0", at(2))
    again = lc.recompute(s, at(60))
    assert again == s
    assert again.conditions is s.conditions  # not rebuilt: the times are those of the transitions
    assert cond(again, "Ready").since == at(2)
    assert cond(again, "PodScheduled").since == T0


def test_a_condition_changes_its_time_only_when_its_status_changes() -> None:
    s = lc.became_ready(lc.started(new_pod(containers=2), "c0", "uid", "img@sha256:1", at(1)), "c0", at(2))
    assert cond(s, "Ready").status == "False"  # c1 is not ready yet
    s = lc.became_ready(lc.started(s, "c1", "uid", "img@sha256:1", at(3)), "c1", at(4))
    assert (cond(s, "Ready").status, cond(s, "Ready").since) == ("True", at(4))
    assert (cond(s, "Initialized").since, cond(s, "PodScheduled").since) == (T0, T0)
    done = lc.exited(lc.exited(s, "c0", 0, at(5)), "c1", 0, at(6))
    assert done.phase is Phase.RUNNING  # restartPolicy Always: the kubelet restarts them
    s = lc.exited(lc.exited(replace(s, restart_policy="Never"), "c0", 0, at(5)), "c1", 0, at(6))
    assert s.phase is Phase.SUCCEEDED
    assert [(c.type, c.status, c.reason, c.since) for c in s.conditions] == [
        ("Initialized", "True", "", T0),
        ("Ready", "False", "PodCompleted", at(5)),
        ("ContainersReady", "False", "PodCompleted", at(5)),
        ("PodScheduled", "True", "", T0),
    ]


def test_a_transition_with_an_unknown_container_field_is_refused() -> None:
    with pytest.raises(TypeError, match="colour"):
        lc._update(new_pod(), "c0", T0, colour="red")


def test_the_fast_copies_keep_every_field_even_one_added_later() -> None:
    # _changed and _with list the fields by hand; a field they missed would silently reset to its
    # default. Each field gets a distinct marker (the dataclasses do not check types).
    markers: dict[str, object] = {f.name: object() for f in fields(lc.Container)}
    c = lc.Container(**markers)  # type: ignore[arg-type]
    assert lc._changed(c, {}) == c
    for name in markers:
        new = object()
        assert getattr(lc._changed(c, {name: new}), name) is new
    pod_markers: dict[str, object] = {f.name: object() for f in fields(lc.PodState)}
    pod = lc.PodState(**pod_markers)  # type: ignore[arg-type]
    assert lc._with(pod) == pod
    assert [getattr(lc._with(pod), f.name) for f in fields(lc.PodState)] == list(pod_markers.values())


def test_a_new_image_ends_the_running_container_and_waits_to_create_it_again() -> None:
    s = lc.became_ready(lc.started(new_pod(), "c0", "uid", "img", at(1)), "c0", at(2))
    s = lc.new_image(s, "c0", "nginx:2", at(10))
    c = s.container("c0")
    assert (c.image, c.state, c.ready, c.restart_count) == ("nginx:2", lc.Waiting("ContainerCreating"), False, 1)
    assert c.last_state == lc.Terminated(0, "Completed", at(10), at(1), container_id=c.container_id)
    assert s.phase is Phase.RUNNING  # as the kubelet shows a restarting container's Pod
    assert cond(s, "Ready").status == "False"
    # One that never started (its image failed) just takes the new image: no run ended.
    waiting = lc.waiting(new_pod(), "c0", "ImagePullBackOff", "back-off", at(1))
    w = lc.new_image(waiting, "c0", "nginx:2", at(2)).container("c0")
    assert (w.image, w.state, w.restart_count, w.last_state) == ("nginx:2", lc.Waiting("ContainerCreating"), 0, None)


def test_stopped_by_the_node_the_pod_is_failed_before_its_containers_stop() -> None:
    s = lc.became_ready(lc.started(new_pod(containers=2), "c0", "uid", "img", at(1)), "c0", at(2))
    s = lc.stopped_by_node(s, "DeadlineExceeded", "too long", at(10))
    assert (s.phase, s.reason, s.message) == (Phase.FAILED, "DeadlineExceeded", "too long")
    assert s.container("c0").running
    assert not s.container("c0").ready
    assert cond(s, "Ready").status == "False"
    s = lc.killed(s, at(12), running_only=True)
    assert s.container("c0").state == lc.Terminated(
        0, "Completed", at(12), at(1), container_id=s.container("c0").container_id
    )
    assert s.container("c1").state == lc.Waiting("ContainerCreating")  # never ran: left as it was
    assert s.phase is Phase.FAILED


def test_a_pod_taken_again_keeps_the_start_time_it_had() -> None:
    s = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c0", "nginx")],
                    host_ip="10.0.0.1", pod_ip="", now=at(100), start_time=at(5))  # fmt: skip
    assert s.start_time == at(5)
    assert new_pod().start_time == T0


# ------------------------------------------------------------------ readiness gates


GATE = "target-health.example.com/web"


def gated(others: tuple[dict[str, Any], ...] = ()) -> lc.PodState:
    state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("c0", "nginx")],
                        host_ip="10.0.0.1", pod_ip="10.234.0.5", now=T0, gates=(GATE,), others=others)  # fmt: skip
    return lc.became_ready(lc.started(state, "c0", "uid", "img", at(1)), "c0", at(2))


def test_ready_waits_for_a_readiness_gate_with_the_kubelets_reason_and_message() -> None:
    s = gated()
    assert cond(s, "ContainersReady").status == "True"
    ready = cond(s, "Ready")
    assert (ready.status, ready.reason) == ("False", "ReadinessGatesNotReady")
    assert ready.message == f'corresponding condition of pod readiness gate "{GATE}" does not exist.'
    s = lc.with_others(s, ({"type": GATE, "status": "False"},), at(3))
    assert cond(s, "Ready").message == f'the status of pod readiness gate "{GATE}" is not "True", but False'
    assert cond(s, "Ready").since == T0  # False all along: its transition time stays
    s = lc.with_others(s, ({"type": GATE, "status": "True"},), at(4))
    assert (cond(s, "Ready").status, cond(s, "Ready").reason, cond(s, "Ready").message) == ("True", "", "")
    assert cond(s, "Ready").since == at(4)


def test_other_writers_conditions_are_rendered_after_the_nodes_and_taken_back_on_adoption() -> None:
    theirs = {"type": GATE, "status": "True", "lastTransitionTime": "2026-01-01T00:00:03Z", "message": "healthy"}
    s = gated((theirs,))
    body = lc.render_status(s)
    assert [c["type"] for c in body["conditions"]] == ["Initialized", "Ready", "ContainersReady", "PodScheduled", GATE]
    assert body["conditions"][-1] == theirs
    assert lc.other_conditions(body) == (theirs,)
    adopted = lc.adopt(body, "Always", at(100), gates=(GATE,))
    assert adopted is not None
    assert (adopted.others, adopted.gates) == ((theirs,), (GATE,))
    assert [c.type for c in adopted.conditions] == ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
    assert lc.render_status(adopted) == body
    not_ready = lc.render_status(gated())
    assert next(c for c in not_ready["conditions"] if c["type"] == "Ready")["reason"] == "ReadinessGatesNotReady"


@pytest.mark.parametrize("conditions", [None, "x", [1, "x", {"status": "True"}, {"type": 5}]])
def test_other_conditions_of_a_garbled_status_are_none(conditions: object) -> None:
    assert lc.other_conditions({"conditions": conditions}) == ()


# ------------------------------------------------------------------ which run kubectl logs reads


def _through(*steps: str) -> lc.Container:
    """Container c0 of a new Pod taken through ``steps``: start, exit, backoff, kill, pullfail."""
    state = new_pod()
    for n, step in enumerate(steps):
        now = at(n + 1)
        if step == "start":
            state = lc.started(state, "c0", "uid", "sha", now)
        elif step == "exit":
            state = lc.exited(state, "c0", 2, now)
        elif step == "backoff":
            state = lc.back_off(state, "c0", "back-off", now)
        elif step == "kill":
            state = lc.killed(state, now)
        elif step == "pullfail":
            state = lc.waiting(state, "c0", "ImagePullBackOff", 'Back-off pulling image "nginx"', now)
    return state.container("c0")


WAITING = 'container "c0" in pod "p" is waiting to start: '
NO_PREVIOUS = 'previous terminated container "c0" in pod "p" not found'


@pytest.mark.parametrize(
    ("steps", "current", "previous"),
    [
        ((), WAITING + "ContainerCreating", NO_PREVIOUS),
        (("pullfail",), WAITING + "trying and failing to pull image", NO_PREVIOUS),
        (("start",), 0, NO_PREVIOUS),
        (("start", "exit"), 0, NO_PREVIOUS),
        # Crash loop: while it waits, both read the run that crashed; once restarted, -p is that one.
        (("start", "exit", "backoff"), 0, 0),
        (("start", "exit", "backoff", "start"), 0, 1),
        (("start", "exit", "backoff", "start", "exit"), 0, 1),
        (("start", "kill"), 0, NO_PREVIOUS),
        # Killed while waiting to restart: its last run is still what it has.
        (("start", "exit", "backoff", "kill"), 0, 0),
        (("kill",), 'container "c0" in pod "p" is terminated', NO_PREVIOUS),
    ],
)
def test_log_run_is_the_kubelets_choice(steps: tuple[str, ...], current: int | str, previous: int | str) -> None:
    c = _through(*steps)
    assert lc.log_run(c, "p") == current
    assert lc.log_run(c, "p", previous=True) == previous


def test_log_run_names_an_image_that_cannot_be_pulled() -> None:
    c = lc.waiting(new_pod(), "c0", "ErrImagePull", "not found", T0).container("c0")
    assert lc.log_run(c, "p") == WAITING + "image can't be pulled"
