"""One agent process runs several virtual nodes (issue: scale)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.agent import AgentProcess
from tests.support.cluster import Cluster
from tests.support.fixtures import pod_manifest, unique
from tests.support.wait import wait_for


def test_three_nodes_from_one_process(cluster: Cluster, workdir: Path, namespace: str) -> None:
    prefix = unique("vkm")
    names = [f"{prefix}-{i}" for i in range(3)]
    agent = AgentProcess(
        cluster, workdir, node_name=prefix, settings={"node": {"count": 3}, "pull": {"time_scale": 20}}
    )
    with agent:

        def ready(name: str) -> bool:
            node = cluster.get_json("node", name)
            return bool(node) and any(
                c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
            )

        wait_for(lambda: all(ready(n) for n in names), timeout=30, what="3 Ready nodes")
        assert cluster.get_json("node", prefix) is None  # the prefix itself is not a node
        leases = {n: cluster.get_json("lease", "-n", "kube-node-lease", n) for n in names}
        assert all(lease is not None for lease in leases.values())
        pods = [pod_manifest(f"p{i}-{j}", name) for i, name in enumerate(names) for j in range(2)]
        cluster.kubectl("create", "-n", namespace, "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))  # fmt: skip

        def running() -> dict[str, str]:
            items = cluster.get_json("pods", "-n", namespace)["items"]
            return {p["metadata"]["name"]: p["status"].get("phase", "") for p in items}

        wait_for(lambda: list(running().values()).count("Running") == 6, timeout=40, what="6 Running Pods")
        items = cluster.get_json("pods", "-n", namespace)["items"]
        ips = {p["status"]["podIP"] for p in items}
        assert len(ips) == 6  # unique across the agent's nodes
        by_node = {p["spec"]["nodeName"] for p in items}
        assert by_node == set(names)
        events = cluster.get_json("events", "-n", namespace)["items"]
        started = [e for e in events if e["reason"] == "Started"]
        assert {e["source"]["host"] for e in started} == set(names)  # each node reports its own Pods
        # kubectl logs reaches a Pod on any of the nodes.
        assert "started container nginx" in cluster.kubectl("logs", "-n", namespace, "p2-1")
        assert agent.stop() == 0
    for name in names:
        node = cluster.get_json("node", name)
        assert next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["status"] == "False"
