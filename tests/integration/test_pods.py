"""Pods on the virtual node, against a real kube-apiserver (issue: run Pods)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.fixtures import pod_manifest, start_agent, unique
from tests.support.wait import wait_for
from vk_provider.domain import lifecycle as lc
from vk_provider.kube.pods import PodClient
from vk_provider.kube.session import MERGE_PATCH, KubeSession

FAST = {"pull": {"time_scale": 20, "jitter": 0}}


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    # `create`, not `apply`: apply would copy each object into an annotation (too big for the huge one).
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = cluster.get_json("pod", name, "-n", namespace)
    return found


def phase(cluster: Cluster, namespace: str, name: str) -> str:
    found = pod(cluster, namespace, name)
    return str(found["status"].get("phase", "")) if found else "<gone>"


def events_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]
    return sorted(items, key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events_of(cluster, namespace, name)]


def test_seed_pod_reaches_running_with_a_full_status(cluster: Cluster, workdir: Path, namespace: str) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        manifest = pod_manifest(
            "nginx-plain",
            agent.node_name,
            resources={"limits": {"cpu": "300m", "memory": "200Mi"}, "requests": {"cpu": "200m", "memory": "100Mi"}},
        )
        apply(cluster, namespace, manifest)
        wait_for(lambda: phase(cluster, namespace, "nginx-plain") == "Running", timeout=30, what="Running")
        wait_for(lambda: "Started" in reasons(cluster, namespace, "nginx-plain"), timeout=15, what="Started event")
        status = pod(cluster, namespace, "nginx-plain")["status"]  # type: ignore[index]
        assert status["hostIP"] == "127.0.0.1"
        assert status["podIP"].startswith("10.234.")
        assert status["startTime"]
        assert status["qosClass"] == "Burstable"  # set by the API server at creation, kept by the node
        conditions = {c["type"]: c for c in status["conditions"]}
        assert set(conditions) == {"PodScheduled", "Initialized", "ContainersReady", "Ready"}
        assert all(c["status"] == "True" and c["lastTransitionTime"] for c in conditions.values())
        [cs] = status["containerStatuses"]
        assert cs["image"] == "nginx:1.7.9"
        assert cs["imageID"].startswith("docker.io/library/nginx@sha256:")
        assert cs["containerID"].startswith("containerd://")
        assert cs["ready"] is True
        assert cs["started"] is True
        assert cs["restartCount"] == 0
        assert "startedAt" in cs["state"]["running"]
        assert cs["lastState"] == {}
        # kubectl describe lists the kubelet's events in order.
        described = cluster.kubectl("describe", "pod", "-n", namespace, "nginx-plain")
        section = described[described.index("Events:") :]
        positions = [section.index(r) for r in ("Pulling", "Pulled", "Created", "Started")]
        assert positions == sorted(positions), section
        pulled = next(e for e in events_of(cluster, namespace, "nginx-plain") if e["reason"] == "Pulled")
        assert "Successfully pulled image" in pulled["message"]
        assert "Image size:" in pulled["message"]
        assert pulled["involvedObject"]["fieldPath"] == "spec.containers{nginx}"
        assert pulled["source"]["component"] == "kubelet"
        # kubectl logs reaches the simulated log through the API server.
        logs = cluster.kubectl("logs", "-n", namespace, "nginx-plain")
        assert "started container nginx" in logs
        stamped = cluster.kubectl("logs", "-n", namespace, "nginx-plain", "--timestamps", "--tail=1")
        assert len(stamped.strip().splitlines()) == 1
        assert stamped.startswith("20")
        # Anonymous callers are turned away.
        port = cluster.get_json("node", agent.node_name)["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        anonymous = subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
             f"https://127.0.0.1:{port}/containerLogs/{namespace}/nginx-plain/nginx"],
            capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
        assert anonymous.stdout == "401"
        assert agent.stop() == 0


def ready(cluster: Cluster, namespace: str, name: str) -> str:
    found = pod(cluster, namespace, name) or {}
    return next((c["status"] for c in found.get("status", {}).get("conditions", []) if c["type"] == "Ready"), "")


def test_a_pod_marked_not_ready_by_another_writer_is_made_ready_again(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        apply(cluster, namespace, pod_manifest("marked", agent.node_name))
        wait_for(lambda: ready(cluster, namespace, "marked") == "True", timeout=30, what="Ready")
        # What kube-controller-manager does to the Pods of a node that went silent for 40 s.
        found = pod(cluster, namespace, "marked")
        assert found is not None
        for condition in found["status"]["conditions"]:
            if condition["type"] == "Ready":
                condition["status"] = "False"
        path = f"/api/v1/namespaces/{namespace}/pods/marked/status"
        cluster.kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(found))
        wait_for(lambda: ready(cluster, namespace, "marked") == "True", timeout=30, what="Ready written again")
        assert "status was changed by another writer" in agent.log
        assert agent.stop() == 0


def test_active_deadline_fails_the_pod_and_host_network_takes_the_nodes_ip(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        limited = pod_manifest("limited", agent.node_name)
        limited["spec"]["activeDeadlineSeconds"] = 40  # simulated: 2 s at time scale 20
        host = pod_manifest("host", agent.node_name)
        host["spec"]["hostNetwork"] = True
        apply(cluster, namespace, limited)
        apply(cluster, namespace, host)
        wait_for(lambda: phase(cluster, namespace, "limited") == "Failed", timeout=30, what="Failed at its deadline")

        def stopped() -> bool:
            found = pod(cluster, namespace, "limited") or {}
            return "terminated" in found["status"]["containerStatuses"][0]["state"]

        wait_for(stopped, timeout=30, what="its container stopped")  # Failed first, then stopped
        status = pod(cluster, namespace, "limited")["status"]  # type: ignore[index]
        assert (status["reason"], status["message"]) == (
            "DeadlineExceeded",
            "Pod was active on the node longer than the specified deadline",
        )
        assert "terminated" in status["containerStatuses"][0]["state"]
        wait_for(lambda: "DeadlineExceeded" in reasons(cluster, namespace, "limited"), timeout=15, what="event")
        wait_for(lambda: phase(cluster, namespace, "host") == "Running", timeout=30, what="host Running")
        status = pod(cluster, namespace, "host")["status"]  # type: ignore[index]
        assert status["podIP"] == status["hostIP"] == "127.0.0.1"
        assert status["podIPs"] == [{"ip": "127.0.0.1"}]
        assert phase(cluster, namespace, "limited") == "Failed"  # kept, not deleted
        assert agent.stop() == 0


def test_a_readiness_gate_holds_ready_until_its_controller_sets_its_condition(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    gate = "target-health.example.com/web"
    with start_agent(cluster, workdir, FAST) as agent:
        manifest = pod_manifest("gated", agent.node_name)
        manifest["spec"]["readinessGates"] = [{"conditionType": gate}]
        apply(cluster, namespace, manifest)
        wait_for(lambda: phase(cluster, namespace, "gated") == "Running", timeout=30, what="Running")
        found = pod(cluster, namespace, "gated")
        assert found is not None
        conditions = {c["type"]: c for c in found["status"]["conditions"]}
        assert conditions["ContainersReady"]["status"] == "True"
        assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "ReadinessGatesNotReady")
        # The gate's controller (a load balancer's, say) writes its condition.
        found["status"]["conditions"].append({"type": gate, "status": "True", "lastProbeTime": None})
        path = f"/api/v1/namespaces/{namespace}/pods/gated/status"
        cluster.kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(found))
        wait_for(lambda: ready(cluster, namespace, "gated") == "True", timeout=30, what="Ready once the gate is True")
        # The node's write of Ready (its conditions merged by type) left the gate's condition alone.
        kept = pod(cluster, namespace, "gated")
        assert kept is not None
        assert gate in {c["type"] for c in kept["status"]["conditions"]}
        assert agent.stop() == 0


def test_kubectl_set_image_restarts_the_container_from_the_new_image(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        apply(cluster, namespace, pod_manifest("web", agent.node_name))
        wait_for(lambda: ready(cluster, namespace, "web") == "True", timeout=30, what="Ready")
        cluster.kubectl("set", "image", "-n", namespace, "pod/web", "nginx=busybox:latest")

        def restarted() -> bool:
            found = pod(cluster, namespace, "web") or {}
            statuses = found.get("status", {}).get("containerStatuses") or [{}]
            c = statuses[0]
            return c.get("image") == "busybox:latest" and c.get("restartCount") == 1 and c.get("ready") is True

        wait_for(restarted, timeout=30, what="restarted from busybox")
        c = pod(cluster, namespace, "web")["status"]["containerStatuses"][0]  # type: ignore[index]
        assert c["imageID"].startswith("docker.io/library/busybox@sha256:")
        assert c["lastState"]["terminated"]["reason"] == "Completed"
        messages = [e["message"] for e in events_of(cluster, namespace, "web")]
        assert "Container nginx definition changed, will be restarted" in messages
        assert any('Pulling image "busybox:latest"' in m for m in messages), messages
        assert agent.stop() == 0


async def test_a_status_written_around_another_writers_condition_leaves_it_as_the_api_server_has_it(
    cluster: Cluster, namespace: str
) -> None:
    """The node's status write for a Pod with a readiness gate, against the real API server: its
    own conditions merge in by type, the gate's stays as its controller last wrote it, and the
    container states are replaced whole (a merge patch would put the gate's old value back)."""
    node = unique("vk-nobody")  # a Node nobody runs: the Pod garbage collector leaves its Pods
    cluster.kubectl(
        "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    )
    try:
        apply(cluster, namespace, pod_manifest("shared", node))
        found = pod(cluster, namespace, "shared")
        assert found is not None
        gate = {"type": "target-health.example.com/web", "status": "True", "lastProbeTime": None}
        found["status"]["conditions"] = [*found["status"].get("conditions", []), gate]
        path = f"/api/v1/namespaces/{namespace}/pods/shared/status"
        cluster.kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(found))
        # What the node made of the Pod before the gate was set: its conditions without it.
        t0 = lc.parse_time("2026-01-01T00:00:00Z")
        assert t0 is not None
        state = lc.accepted(restart_policy="Always", init_containers=[], containers=[("nginx", "nginx:1.7.9")],
                            host_ip="127.0.0.1", pod_ip="10.234.9.9", now=t0, gates=(str(gate["type"]),))  # fmt: skip
        running = lc.became_ready(lc.started(state, "nginx", "u", "docker.io/library/nginx@sha256:1", t0), "nginx", t0)
        uid = found["metadata"]["uid"]
        async with await KubeSession.connect(cluster.kubeconfig) as session:
            client = PodClient(session)
            await client.patch_status(namespace, "shared", uid, lc.render_status(state))
            await client.patch_status(namespace, "shared", uid, lc.render_status(running))
            status = pod(cluster, namespace, "shared")["status"]  # type: ignore[index]
            conditions = {c["type"]: c for c in status["conditions"]}
            assert conditions[gate["type"]]["status"] == "True"  # the gate's writer's, untouched
            assert conditions["Ready"]["status"] == "False"  # the node's (its gate was unknown to it)
            assert conditions["Ready"]["reason"] == "ReadinessGatesNotReady"
            assert conditions["ContainersReady"]["status"] == "True"
            assert "reason" not in conditions["ContainersReady"]  # ContainersNotReady cleared, not kept
            assert list(status["containerStatuses"][0]["state"]) == ["running"]  # waiting replaced, not kept
            # The same status as a JSON merge patch would replace the whole list: the gate's is gone.
            body = {"status": lc.render_status(running)}
            await session.request("PATCH", path, body=body, content_type=MERGE_PATCH, want_body=False)
            types = {c["type"] for c in pod(cluster, namespace, "shared")["status"]["conditions"]}  # type: ignore[index]
            assert gate["type"] not in types
    finally:
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_deployment_scales_up_and_down(cluster: Cluster, workdir: Path, namespace: str) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "nginx-deployment", "labels": {"app": "nginx"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "nginx"}},
                "template": {
                    "metadata": {"labels": {"app": "nginx"}},
                    "spec": {
                        "nodeName": agent.node_name,
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": "nginx", "image": "nginx:1.7.9", "imagePullPolicy": "IfNotPresent"}],
                    },
                },
            },
        }
        apply(cluster, namespace, deployment)

        def running() -> list[dict[str, Any]]:
            items = cluster.get_json("pods", "-n", namespace, "-l", "app=nginx")["items"]
            return [p for p in items if p["status"].get("phase") == "Running"]

        pods = wait_for(lambda: len(running()) == 2 and running(), timeout=40, what="2 Running Pods")
        ips = {p["status"]["podIP"] for p in pods}
        assert len(ips) == 2
        cluster.kubectl("scale", "-n", namespace, "deployment/nginx-deployment", "--replicas=0")
        wait_for(
            lambda: not cluster.get_json("pods", "-n", namespace, "-l", "app=nginx")["items"],
            timeout=5 + 10,
            what="both Pods removed within their grace period",
        )
        killing = [r for p in pods for r in reasons(cluster, namespace, p["metadata"]["name"]) if r == "Killing"]
        assert len(killing) == 2


def test_job_completes_and_exit_codes_follow_restart_policy(cluster: Cluster, workdir: Path, namespace: str) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"annotations": {"vk-provider.io/run-seconds": "2"}},
                    "spec": {
                        "nodeName": agent.node_name,
                        "restartPolicy": "Never",
                        "containers": [{"name": "work", "image": "busybox:1.36"}],
                    },
                },
            },
        }
        apply(cluster, namespace, job)
        never = pod_manifest(
            "fails", agent.node_name, image="busybox:1.36", restart_policy="Never",
            annotations={"vk-provider.io/run-seconds": "1", "vk-provider.io/exit-code": "1"},
        )  # fmt: skip
        always = pod_manifest(
            "crashes", agent.node_name, image="busybox:1.36", restart_policy="Always",
            annotations={"vk-provider.io/run-seconds": "1", "vk-provider.io/exit-code": "3"},
        )  # fmt: skip
        apply(cluster, namespace, never)
        apply(cluster, namespace, always)
        wait_for(
            lambda: (cluster.get_json("job", "once", "-n", namespace)["status"].get("succeeded") or 0) == 1,
            timeout=40,
            what="the Job to complete",
        )
        wait_for(lambda: phase(cluster, namespace, "fails") == "Failed", timeout=30, what="Failed")
        [cs] = pod(cluster, namespace, "fails")["status"]["containerStatuses"]  # type: ignore[index]
        assert cs["state"]["terminated"]["exitCode"] == 1
        assert cs["state"]["terminated"]["reason"] == "Error"
        assert cs["restartCount"] == 0
        # kubectl logs reads the run that exited; there is no run before it (the kubelet's 400).
        assert "exited with code 1" in cluster.kubectl("logs", "-n", namespace, "fails")
        no_previous = cluster.kubectl_raw("logs", "-n", namespace, "fails", "--previous")
        assert no_previous.returncode != 0
        assert 'previous terminated container "nginx" in pod "fails" not found' in no_previous.stderr
        assert "(BadRequest)" in no_previous.stderr

        def restarts() -> int:
            found = pod(cluster, namespace, "crashes")
            statuses = found["status"].get("containerStatuses") if found else None
            return int(statuses[0]["restartCount"]) if statuses else 0

        wait_for(lambda: restarts() >= 2, timeout=30, what="restartCount to grow")
        crashed = pod(cluster, namespace, "crashes")["status"]  # type: ignore[index]
        assert crashed["phase"] == "Running"
        [cs] = crashed["containerStatuses"]
        last = cs["lastState"].get("terminated")
        assert last is not None
        assert last["exitCode"] == 3
        # --previous reads the run before the latest: one run, from its pull to its exit.
        previous = cluster.kubectl("logs", "-n", namespace, "crashes", "--previous")
        assert previous.count("started container nginx") == 1
        assert previous.rstrip().endswith("exited with code 3")

        def backoffs() -> list[dict[str, Any]]:
            return [e for e in events_of(cluster, namespace, "crashes") if e["reason"] == "BackOff"]

        # Each back-off is the same Event: one object whose count grows, as a kubelet's does.
        wait_for(lambda: sum(e.get("count", 1) for e in backoffs()) >= 2, timeout=20, what="2 back-offs told")
        [backoff] = backoffs()
        assert backoff["type"] == "Warning"
        assert backoff["count"] >= 2
        assert backoff["lastTimestamp"] >= backoff["firstTimestamp"]


def test_a_crash_loop_at_a_high_time_scale_is_held_to_the_kubelets_event_budget(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    # At time scale 600 the crash loop's longest back-off (5 min) is 0.5 s of wall time, and so is
    # the spam filter's refill: 25 Events at once, then one per 5 simulated minutes.
    refill = 300 / 600
    with start_agent(cluster, workdir, {"pull": {"time_scale": 600, "jitter": 0}}) as agent:
        crashes = pod_manifest(
            "crashes", agent.node_name, image="busybox:1.36", restart_policy="Always",
            annotations={"vk-provider.io/run-seconds": "1", "vk-provider.io/exit-code": "3"},
        )  # fmt: skip
        began = time.monotonic()
        apply(cluster, namespace, crashes)

        def restarts() -> int:
            found = pod(cluster, namespace, "crashes")
            statuses = found["status"].get("containerStatuses") if found else None
            return int(statuses[0]["restartCount"]) if statuses else 0

        wait_for(lambda: restarts() >= 30, timeout=90, what="30 restarts")
        made = 3 * restarts()  # at least Pulled, Created and Started for each run
        events = [e for e in events_of(cluster, namespace, "crashes") if e["source"]["component"] == "kubelet"]
        posted = sum(e.get("count", 1) for e in events)
        budget = 25 + (time.monotonic() - began) / refill + 1
        assert posted <= budget < made, (posted, budget, made)
        metrics = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{agent.node_name}/proxy/metrics")
        [filtered] = re.findall(r"^vk_provider_events_filtered_total (\d+)", metrics, re.MULTILINE)
        assert int(filtered) > 0
        assert "more than 25 Events from kubelet at once" in agent.log


def test_agent_killed_mid_start_then_restarted_runs_every_pod_once(
    cluster: Cluster, workdir: Path, namespace: str
) -> None:
    node = unique("vk")
    slow = {"pull": {"time_scale": 1, "jitter": 0}}
    agent = start_agent(cluster, workdir, slow, node=node)
    names = [f"p{i}" for i in range(20)]
    auto = {"k8s.aliyun.com/eci-image-cache": "true"}  # each misses; one automatic cache is made for all
    manifests = [pod_manifest(n, node, image="nginx:1.7.9", annotations=auto) for n in names]
    with agent:
        apply(cluster, namespace, {"apiVersion": "v1", "kind": "List", "items": manifests})
        try:

            def creating() -> bool:
                items = cluster.get_json("pods", "-n", namespace)["items"]
                return len(items) == 20 and all(
                    p["status"].get("phase") == "Pending" and p["status"].get("podIP") for p in items
                )

            def missed() -> bool:
                events = cluster.get_json("events", "-n", namespace)["items"]
                return {e["involvedObject"]["name"] for e in events if e["reason"] == "ImageCacheMissed"} == set(names)

            wait_for(creating, timeout=20, what="20 Pods taken and pulling")
            wait_for(missed, timeout=20, what="the misses told")
            assert agent.stop(signal.SIGKILL) != 0
            assert any(phase(cluster, namespace, n) == "Pending" for n in names)

            restarted = AgentProcess(cluster, workdir, node_name=node, settings=slow).start()
            try:
                restarted.wait_ready()
                wait_for(
                    lambda: all(phase(cluster, namespace, n) == "Running" for n in names), timeout=60, what="20 Running"
                )
                for n in names:
                    [cs] = pod(cluster, namespace, n)["status"]["containerStatuses"]  # type: ignore[index]
                    assert cs["restartCount"] == 0
                    # Taken again, a Pod keeps its decision (a miss, though the cache may be Ready by now):
                    # not resolved, told or counted a second time.
                    told = [r for r in reasons(cluster, namespace, n) if r.startswith(("ImageCache", "SuccessfulHit"))]
                    assert told == ["ImageCacheMissed", "ImageCacheAutoCreated"]
                started_before = {n: running_since(cluster, namespace, n) for n in names}
                assert restarted.stop() == 0
                # Every start is stored by a clean stop. Take three away, as a kill right after they
                # started would have: the next agent finds them running, unrecorded, and says so.
                with contextlib.closing(sqlite3.connect(restarted.db)) as db, db:
                    assert db.execute("SELECT count(*) FROM pod_starts").fetchone() == (20,)
                    db.execute("DELETE FROM pod_starts WHERE name IN ('p3', 'p7', 'p11')")
                logged = len(restarted.log)
                # A second restart keeps Running Pods as they are: same startedAt, no restarts.
                again = AgentProcess(cluster, workdir, node_name=node, settings=slow).start()
                try:
                    again.wait_ready()
                    for n in names:
                        [cs] = pod(cluster, namespace, n)["status"]["containerStatuses"]  # type: ignore[index]
                        assert cs["state"]["running"]["startedAt"] == started_before[n]
                        assert cs["restartCount"] == 0
                    started_events = [r for n in names for r in reasons(cluster, namespace, n) if r == "Started"]
                    assert len(started_events) == 20

                    def warned() -> str:
                        lines = again.log[logged:].splitlines()
                        return next((line for line in lines if "not in the registry" in line), "")

                    wait_for(lambda: bool(warned()), timeout=20, what="the unrecorded starts named")
                    assert "3 Pods were running when the agent started" in warned()
                    assert {f"{namespace}/p{i}" for i in (3, 7, 11)} == set(re.findall(rf"{namespace}/p\d+", warned()))
                    metrics = cluster.kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/metrics")
                    assert "vk_provider_pod_starts_unrecorded_total 3" in metrics
                finally:
                    again.stop()
            finally:
                if restarted.alive():
                    restarted.stop()
        finally:
            # The automatic cache is cluster-scoped: left Ready, later tests' nginx Pods would hit it.
            caches = [f"auto-create-for-{i}" for i in instance_ids(cluster, namespace)]
            if caches:
                cluster.kubectl("delete", "imagecache", *caches, "--ignore-not-found", "--wait=false", check=False)


def instance_ids(cluster: Cluster, namespace: str) -> list[str]:
    pods = cluster.get_json("pods", "-n", namespace)["items"]
    found = ((p["metadata"].get("annotations") or {}).get("k8s.aliyun.com/eci-instance-id") for p in pods)
    return [i for i in found if i]


def running_since(cluster: Cluster, namespace: str, name: str) -> str:
    found = pod(cluster, namespace, name)
    assert found is not None
    return str(found["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])


def test_bad_input_never_stops_the_agent(cluster: Cluster, workdir: Path, namespace: str) -> None:
    with start_agent(cluster, workdir, FAST) as agent:
        node = agent.node_name
        apply(cluster, namespace, pod_manifest("bad-image", node, image="NGINX::not valid"))
        apply(cluster, namespace, pod_manifest("bad-annotation", node,
                                               annotations={"vk-provider.io/run-seconds": "soon"}))  # fmt: skip
        apply(cluster, namespace, pod_manifest("huge-annotation", node,
                                               annotations={"vk-provider.io/exit-code": "9" * 200_000}))  # fmt: skip
        apply(cluster, namespace, pod_manifest("too-big", node,
                                               resources={"requests": {"cpu": "5000"}}))  # fmt: skip
        apply(cluster, namespace, pod_manifest("after", node))

        def waiting_reason(name: str) -> str:
            found = pod(cluster, namespace, name)
            statuses = (found or {}).get("status", {}).get("containerStatuses") or [{}]
            return str(statuses[0].get("state", {}).get("waiting", {}).get("reason", ""))

        wait_for(lambda: waiting_reason("bad-image") == "InvalidImageName", timeout=20, what="InvalidImageName")
        assert "InspectFailed" in reasons(cluster, namespace, "bad-image")
        # A container that never started has no log yet: the kubelet's 400, through kubectl.
        waiting = cluster.kubectl_raw("logs", "-n", namespace, "bad-image")
        assert waiting.returncode != 0
        assert 'container "nginx" in pod "bad-image" is waiting to start: InvalidImageName' in waiting.stderr
        wait_for(lambda: phase(cluster, namespace, "bad-annotation") == "Running", timeout=20, what="Running")
        warnings = [e for e in events_of(cluster, namespace, "bad-annotation") if e["type"] == "Warning"]
        assert any("run-seconds" in e["message"] for e in warnings)
        wait_for(lambda: phase(cluster, namespace, "huge-annotation") == "Running", timeout=20, what="Running")
        assert "InvalidWorkloadAnnotation" in reasons(cluster, namespace, "huge-annotation")
        wait_for(lambda: phase(cluster, namespace, "too-big") == "Failed", timeout=20, what="OutOfcpu")
        assert pod(cluster, namespace, "too-big")["status"]["reason"] == "OutOfcpu"  # type: ignore[index]
        assert "OutOfcpu" in reasons(cluster, namespace, "too-big")
        wait_for(lambda: phase(cluster, namespace, "after") == "Running", timeout=20, what="the next Pod Running")
        assert agent.alive()
        assert "Traceback" not in agent.log
