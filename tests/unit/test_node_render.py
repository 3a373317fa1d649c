"""The Node, status and Lease bodies."""

from __future__ import annotations

from datetime import UTC, datetime

from vk_provider.domain.node import NodeFacts, lease_object, merge_taints, node_endpoint, node_object, node_status

FACTS = NodeFacts(
    name="virtual-kubelet", provider="alibabacloud", cpu="1000", memory="4Ti", pods=1000,
    ephemeral_storage="10Ti", internal_ip="10.0.0.7", kubelet_port=10250, labels=(("zone", "a"),),
)  # fmt: skip
NOW = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)


def test_node_object_labels_taint_and_capacity() -> None:
    body = node_object(FACTS, NOW)
    labels = body["metadata"]["labels"]
    assert labels["type"] == "virtual-kubelet"
    assert labels["kubernetes.io/role"] == "agent"
    assert labels["kubernetes.io/hostname"] == "virtual-kubelet"
    assert labels["zone"] == "a"
    assert body["spec"]["taints"] == [
        {"key": "virtual-kubelet.io/provider", "value": "alibabacloud", "effect": "NoSchedule"}
    ]
    status = body["status"]
    assert status["capacity"] == {"cpu": "1000", "memory": "4Ti", "pods": "1000", "ephemeral-storage": "10Ti"}
    assert status["allocatable"] == status["capacity"]
    assert status["addresses"] == [{"type": "InternalIP", "address": "10.0.0.7"}]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}


def test_status_keeps_transition_time_and_moves_heartbeat() -> None:
    later = datetime(2026, 11, 27, 12, 5, tzinfo=UTC)
    status = node_status(FACTS, later, ready=True, transition=NOW)
    cond = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert cond["lastHeartbeatTime"] == "2026-11-27T12:05:00Z"
    assert cond["lastTransitionTime"] == "2026-11-27T12:00:00Z"
    not_ready = node_status(FACTS, later, ready=False, transition=later)
    assert next(c for c in not_ready["conditions"] if c["type"] == "Ready")["status"] == "False"


def test_lease_uses_microtime() -> None:
    lease = lease_object("n", "kube-node-lease", 40, NOW)
    assert lease["spec"] == {
        "holderIdentity": "n",
        "leaseDurationSeconds": 40,
        "renewTime": "2026-11-27T12:00:00.123456Z",
    }


def test_merge_taints_replaces_only_ours() -> None:
    other = {"key": "x", "effect": "NoExecute"}
    merged = merge_taints([other, {"key": "virtual-kubelet.io/provider", "value": "y", "effect": "NoSchedule"}], FACTS)
    assert merged == [other, {"key": "virtual-kubelet.io/provider", "value": "alibabacloud", "effect": "NoSchedule"}]


def test_status_patch_replaces_the_address_list() -> None:
    from vk_provider.domain.node import node_status_patch

    patch = node_status_patch(FACTS, NOW, ready=True, transition=NOW)
    assert patch["addresses"] == [{"$patch": "replace"}, {"type": "InternalIP", "address": "10.0.0.7"}]


def test_node_endpoint_reads_where_a_nodes_kubelet_listens() -> None:
    node = {
        "status": {
            "addresses": [{"type": "Hostname", "address": "h"}, {"type": "InternalIP", "address": "10.0.0.7"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }
    }
    assert node_endpoint(node) == ("10.0.0.7", 10250)
    assert node_endpoint({}) == ("", 0)
    assert node_endpoint({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.7"}]}}) == ("", 0)
    assert node_endpoint({"status": {"addresses": "x", "daemonEndpoints": {"kubeletEndpoint": {"Port": "y"}}}}) == (
        "",
        0,
    )
