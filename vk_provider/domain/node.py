"""What the virtual Node looks like to the API server: its object, status and Lease bodies.

PURE: builds plain dicts from a :class:`NodeFacts` value and ``now``; no clock, no I/O. The node
controller decides *when* to send them; this module decides *what* they say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JSON = dict[str, Any]
TAINT_KEY = "virtual-kubelet.io/provider"


@dataclass(frozen=True, slots=True)
class NodeFacts:
    name: str
    provider: str
    cpu: str
    memory: str
    pods: int
    ephemeral_storage: str
    internal_ip: str
    kubelet_port: int
    labels: tuple[tuple[str, str], ...] = field(default=())
    operating_system: str = "linux"
    architecture: str = "amd64"
    kubelet_version: str = "v1.20.2-vk-provider"
    agent_version: str = ""


def rfc3339(moment: datetime) -> str:
    """Kubernetes' wire form of a timestamp (seconds precision, UTC, ``Z``)."""
    return moment.replace(microsecond=0, tzinfo=None).isoformat() + "Z"  # strftime's twice as slow


def rfc3339_micro(moment: datetime) -> str:
    """MicroTime wire form (Leases, events.k8s.io eventTime)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


VIRTUAL_KUBELET_TYPE = "virtual-kubelet"  # the "type" label of every virtual Node


def node_labels(facts: NodeFacts) -> dict[str, str]:
    labels = {
        "type": VIRTUAL_KUBELET_TYPE,
        "kubernetes.io/role": "agent",
        "kubernetes.io/hostname": facts.name,
        "kubernetes.io/os": facts.operating_system,
        "kubernetes.io/arch": facts.architecture,
        "beta.kubernetes.io/os": facts.operating_system,
        "beta.kubernetes.io/arch": facts.architecture,
        "node.kubernetes.io/exclude-from-external-load-balancers": "true",
    }
    labels.update(dict(facts.labels))
    return labels


def node_taint(facts: NodeFacts) -> JSON:
    return {"key": TAINT_KEY, "value": facts.provider, "effect": "NoSchedule"}


def node_object(facts: NodeFacts, now: datetime, *, ready: bool = True) -> JSON:
    """The whole Node as first created (the status is also sent separately, see :func:`node_status`)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": facts.name,
            "labels": node_labels(facts),
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "vk-provider.io/agent-version": facts.agent_version,
            },
        },
        "spec": {"taints": [node_taint(facts)]},
        "status": node_status(facts, now, ready=ready, transition=now),
    }


def node_metadata_patch(facts: NodeFacts) -> JSON:
    """A strategic-merge patch that restores our labels and taint on an existing Node."""
    return {
        "metadata": {"labels": node_labels(facts)},
        "spec": {"taints": [node_taint(facts)]},
    }


def merge_taints(existing: list[JSON], facts: NodeFacts) -> list[JSON]:
    """Our taint replaces any other value of the same key; other taints (e.g. controllers') stay."""
    ours = node_taint(facts)
    kept = [t for t in existing if not (t.get("key") == TAINT_KEY and t.get("effect") == ours["effect"])]
    return [*kept, ours]


def node_status(facts: NodeFacts, now: datetime, *, ready: bool, transition: datetime) -> JSON:
    """The full NodeStatus. ``transition`` is when Ready last changed (kept stable between heartbeats)."""
    capacity = {
        "cpu": facts.cpu,
        "memory": facts.memory,
        "pods": str(facts.pods),
        "ephemeral-storage": facts.ephemeral_storage,
    }
    heartbeat = rfc3339(now)
    since = rfc3339(transition)

    def condition(kind: str, status: str, reason: str, message: str) -> JSON:
        return {
            "type": kind,
            "status": status,
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": since,
            "reason": reason,
            "message": message,
        }

    ready_condition = (
        condition("Ready", "True", "KubeletReady", "vk-provider is ready")
        if ready
        else condition("Ready", "False", "KubeletNotReady", "vk-provider is shutting down")
    )
    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "conditions": [
            ready_condition,
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("NetworkUnavailable", "False", "RouteCreated", "virtual network is ready"),
        ],
        # Only the InternalIP: the API server dials the first address type it prefers that the
        # Node lists, and a virtual node's name is usually not resolvable (virtual-kubelet does
        # the same).
        "addresses": [{"type": "InternalIP", "address": facts.internal_ip}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": facts.kubelet_port}},
        "nodeInfo": {
            "machineID": facts.name,
            "systemUUID": facts.name,
            "bootID": facts.name,
            "kernelVersion": "vk-provider",
            "osImage": "Alibaba Cloud ECI (simulated by vk-provider)",
            "containerRuntimeVersion": "vk-provider://simulated",
            "kubeletVersion": facts.kubelet_version,
            "kubeProxyVersion": facts.kubelet_version,
            "operatingSystem": facts.operating_system,
            "architecture": facts.architecture,
        },
    }


def node_status_patch(facts: NodeFacts, now: datetime, *, ready: bool, transition: datetime) -> JSON:
    """:func:`node_status` as a strategic-merge patch that replaces the address list whole.

    A plain strategic merge keeps addresses an earlier version of the Node listed (e.g. a
    Hostname the API server would then try to resolve); ``$patch: replace`` drops them.
    """
    status = node_status(facts, now, ready=ready, transition=transition)
    status["addresses"] = [{"$patch": "replace"}, *status["addresses"]]
    return status


def lease_object(name: str, namespace: str, duration_seconds: int, now: datetime) -> JSON:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": duration_seconds,
            "renewTime": rfc3339_micro(now),
        },
    }


def node_endpoint(node: JSON) -> tuple[str, int]:
    """Where a Node's kubelet listens: its first InternalIP and ``daemonEndpoints`` port; ("", 0)
    when it does not say (or says it in a form we do not read)."""
    status = node.get("status") or {}
    try:
        port = int(((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port") or 0)
        host = next(
            (str(a.get("address") or "") for a in status.get("addresses") or () if a.get("type") == "InternalIP"), ""
        )
    except (AttributeError, TypeError, ValueError):
        return "", 0
    return (host, port) if host and port else ("", 0)
