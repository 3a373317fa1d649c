"""The agent joins a real cluster as a virtual node and keeps it Ready (issue: foundation)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import NODE_GRACE_SECONDS
from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.wait import wait_for


def unique_node() -> str:
    return f"vk-{uuid.uuid4().hex[:8]}"


def ready_status(cluster: Cluster, name: str) -> str | None:
    node = cluster.get_json("node", name)
    if node is None:
        return None
    for cond in node["status"].get("conditions", []):
        if cond["type"] == "Ready":
            return str(cond["status"])
    return None


def test_node_registered_with_labels_taint_and_status(cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    with AgentProcess(cluster, workdir, node_name=name) as agent:
        agent.wait_ready()
        node = cluster.get_json("node", name)
        labels = node["metadata"]["labels"]
        assert labels["type"] == "virtual-kubelet"
        assert labels["kubernetes.io/role"] == "agent"
        assert labels["kubernetes.io/hostname"] == name
        assert {
            "key": "virtual-kubelet.io/provider",
            "value": "alibabacloud",
            "effect": "NoSchedule",
        } in node["spec"]["taints"]
        status = node["status"]
        for resource in ("cpu", "memory", "pods", "ephemeral-storage"):
            assert resource in status["capacity"]
            assert status["allocatable"][resource] == status["capacity"][resource]
        assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
        assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0
        assert status["nodeInfo"]["operatingSystem"] == "linux"
        kinds = {c["type"] for c in status["conditions"]}
        assert {"Ready", "MemoryPressure", "DiskPressure", "PIDPressure"} <= kinds
        lease = cluster.get_json("lease", "-n", "kube-node-lease", name)
        assert lease["spec"]["holderIdentity"] == name
        assert lease["spec"]["leaseDurationSeconds"] == 10
        assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
        # kubectl's own view agrees
        assert "Ready" in cluster.kubectl("get", "node", name)
        assert agent.stop() == 0


def test_node_stays_ready_past_the_grace_period_and_goes_not_ready_when_silent(cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    agent = AgentProcess(cluster, workdir, node_name=name).start()
    try:
        agent.wait_ready()
        first_renew = cluster.get_json("lease", "-n", "kube-node-lease", name)["spec"]["renewTime"]
        # Watch the Node for twice the node-lifecycle controller's grace period: Ready throughout.
        deadline = time.monotonic() + 2 * NODE_GRACE_SECONDS + 2
        while time.monotonic() < deadline:
            assert ready_status(cluster, name) == "True", agent.log[-2000:]
            time.sleep(1)
        assert cluster.get_json("lease", "-n", "kube-node-lease", name)["spec"]["renewTime"] != first_renew
        # Negative control: killed without a chance to clean up, the Node is marked Unknown.
        agent.stop(signal.SIGKILL)
        wait_for(lambda: ready_status(cluster, name) == "Unknown", timeout=4 * NODE_GRACE_SECONDS, what="Unknown")
    finally:
        if agent.alive():
            agent.stop(signal.SIGKILL)


def test_sigterm_stops_cleanly_and_restart_reuses_the_node(cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    agent = AgentProcess(cluster, workdir, node_name=name).start()
    agent.wait_ready()
    uid = cluster.get_json("node", name)["metadata"]["uid"]
    started = time.monotonic()
    code = agent.stop(signal.SIGTERM)
    assert time.monotonic() - started < 5
    assert code == 0, agent.log
    for bad in ("Traceback", "Task was destroyed", "Unclosed", "unclosed", "Exception ignored"):
        assert bad not in agent.log, agent.log
    assert ready_status(cluster, name) == "False"  # left NotReady by default
    assert agent.log.count("(a new file: no caches or Pod starts from earlier runs)") == 1

    again = AgentProcess(cluster, workdir, node_name=name).start()
    try:
        again.wait_ready()
        assert cluster.get_json("node", name)["metadata"]["uid"] == uid
        assert "ERROR" not in again.log
        # The same registry file again (the log is the first run's, continued): not new this time.
        assert again.log.count("registry database") == 2
        assert again.log.count("(a new file: no caches or Pod starts from earlier runs)") == 1
    finally:
        assert again.stop() == 0


def test_a_second_agent_for_a_node_another_agent_runs_refuses_to_start(cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    with AgentProcess(cluster, workdir, node_name=name) as first:
        first.wait_ready()
        second = AgentProcess(cluster, workdir / "second", node_name=name).start()
        assert second.proc is not None
        code = second.proc.wait(timeout=30)
        second.stop()
        assert code == 1, second.log
        assert f"node {name} is run by another vk-provider agent now" in second.log
        assert "choose another --node-name" in second.log
        assert "registered node" not in second.log
        assert "re-using existing node" not in second.log
        assert first.alive()
        assert ready_status(cluster, name) == "True"  # the first agent's Node, untouched
        assert first.stop() == 0  # leaves the Node NotReady
    # Once the first agent has stopped, the node is free to take.
    again = AgentProcess(cluster, workdir / "second", node_name=name).start()
    try:
        again.wait_ready()
    finally:
        assert again.stop() == 0


def test_sigint_with_delete_on_shutdown_removes_the_node(cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    agent = AgentProcess(cluster, workdir, node_name=name, settings={"node": {"on_shutdown": "delete"}}).start()
    agent.wait_ready()
    assert agent.stop(signal.SIGINT) == 0
    assert cluster.get_json("node", name) is None


@pytest.fixture
def private_cluster(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Cluster:
    """A second control plane this test may stop and start (the shared one must stay up)."""
    from tests.conftest import KCM_ARGS
    from tests.support.cluster import start_control_plane

    if not cluster.managed:
        pytest.fail("the API-server outage test needs the project's own control plane (unset VK_TEST_KUBECONFIG)")
    return start_control_plane(tmp_path_factory.mktemp("outage-cp"), kcm_args=KCM_ARGS)


def test_agent_recovers_when_the_api_server_returns(private_cluster: Cluster, workdir: Path) -> None:
    name = unique_node()
    agent = AgentProcess(private_cluster, workdir, node_name=name).start()
    try:
        agent.wait_ready()
        pid = agent.proc.pid if agent.proc else None
        private_cluster.down()
        wait_for(lambda: "heartbeat failed" in agent.log, timeout=20, what="the agent to notice the outage")
        assert agent.alive()
        private_cluster.up()
        before = time.time()
        wait_for(lambda: "heartbeat resumed" in agent.log, timeout=30, what="the agent to recover")
        agent.wait_ready()
        lease = private_cluster.get_json("lease", "-n", "kube-node-lease", name)
        assert lease["spec"]["renewTime"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before - 1))
        assert agent.proc is not None
        assert agent.proc.pid == pid
        assert agent.alive()
    finally:
        agent.stop()
        private_cluster.down()
