"""An Event to post about a Pod, as data (the kube layer turns it into a core/v1 Event).

PURE.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventSpec:
    namespace: str
    pod_name: str
    pod_uid: str
    reason: str
    message: str
    type: str = "Normal"
    field_path: str = ""
    component: str = "kubelet"
    host: str = ""  # the node that reports it (empty: the agent's first node)


def container_field_path(name: str, init: bool = False) -> str:
    """The involvedObject.fieldPath the kubelet uses for a container."""
    return f"spec.initContainers{{{name}}}" if init else f"spec.containers{{{name}}}"
