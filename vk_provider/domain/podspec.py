"""A compact, typed record of what the node needs from a Pod object.

PURE. The pod controller keeps these instead of whole API objects (10,000 tracked Pods must stay
small). :func:`pod_facts` never raises on odd input: missing fields get Kubernetes' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import filterfalse
from operator import attrgetter
from sys import intern
from typing import Any

from vk_provider.domain.lifecycle import parse_time
from vk_provider.domain.quantity import milli, parse_quantity, whole

# Annotation prefixes the node reads; others are not kept in memory. Strings that replicas share
# (namespace, node, images, container names, labels) are interned: stored once, not per Pod.
KEPT_ANNOTATION_PREFIXES = ("k8s.aliyun.com/", "vk-provider.io/")


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    image: str
    pull_policy: str
    init: bool = False
    cpu_milli: int = 0
    memory: int = 0


_is_init = attrgetter("init")


@dataclass(frozen=True, slots=True)
class PodFacts:
    uid: str
    namespace: str
    name: str
    node_name: str
    created: datetime | None
    restart_policy: str
    grace_seconds: int
    containers: tuple[ContainerSpec, ...]
    annotations: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    pull_secrets: tuple[str, ...] = ()
    host_network: bool = False  # spec.hostNetwork: the Pod's IP is the node's
    active_deadline: int | None = None  # spec.activeDeadlineSeconds
    readiness_gates: tuple[str, ...] = ()  # spec.readinessGates' condition types

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def init_containers(self) -> tuple[ContainerSpec, ...]:
        return tuple(filter(_is_init, self.containers))

    @property
    def main_containers(self) -> tuple[ContainerSpec, ...]:
        return tuple(filterfalse(_is_init, self.containers))

    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)

    def requests(self) -> tuple[int, int]:
        """(cpu millicores, memory bytes) the scheduler would count: max(sum of main, largest init)."""
        main_cpu = sum(c.cpu_milli for c in self.main_containers)
        main_mem = sum(c.memory for c in self.main_containers)
        init_cpu = max((c.cpu_milli for c in self.init_containers), default=0)
        init_mem = max((c.memory for c in self.init_containers), default=0)
        return max(main_cpu, init_cpu), max(main_mem, init_mem)


def _default_policy(image: str) -> str:
    # Kubernetes' default: Always for :latest or no tag, IfNotPresent otherwise.
    tail = image.rsplit("/", 1)[-1]
    if "@" in tail:
        return "IfNotPresent"
    if ":" not in tail or tail.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def _container(raw: Mapping[str, Any], init: bool) -> ContainerSpec:
    image = str(raw.get("image") or "")
    requests = (raw.get("resources") or {}).get("requests") or {}
    limits = (raw.get("resources") or {}).get("limits") or {}
    # Like the API server's defaulting: requests default to limits when only limits are set.
    cpu = parse_quantity(str(requests.get("cpu", limits.get("cpu", "0"))))
    mem = parse_quantity(str(requests.get("memory", limits.get("memory", "0"))))
    return ContainerSpec(
        name=intern(str(raw.get("name") or "")),
        image=intern(image),
        pull_policy=intern(str(raw.get("imagePullPolicy") or _default_policy(image))),
        init=init,
        cpu_milli=milli(cpu) if cpu is not None and cpu > 0 else 0,
        memory=whole(mem) if mem is not None and mem > 0 else 0,
    )


def pod_facts(obj: Mapping[str, Any]) -> PodFacts:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    containers = [_container(c, True) for c in spec.get("initContainers") or ()]
    containers += [_container(c, False) for c in spec.get("containers") or ()]
    annotations = tuple(
        sorted(
            (k, str(v)) for k, v in (meta.get("annotations") or {}).items() if k.startswith(KEPT_ANNOTATION_PREFIXES)
        )
    )
    grace = spec.get("terminationGracePeriodSeconds")
    return PodFacts(
        uid=str(meta.get("uid", "")),
        namespace=intern(str(meta.get("namespace", "default"))),
        name=str(meta.get("name", "")),
        node_name=intern(str(spec.get("nodeName", ""))),
        created=parse_time(meta.get("creationTimestamp")),
        restart_policy=intern(str(spec.get("restartPolicy") or "Always")),
        grace_seconds=int(grace) if isinstance(grace, int) and grace >= 0 else 30,
        containers=tuple(containers),
        annotations=annotations,
        labels=tuple(sorted((intern(k), intern(str(v))) for k, v in (meta.get("labels") or {}).items())),
        pull_secrets=tuple(str(s.get("name", "")) for s in spec.get("imagePullSecrets") or () if isinstance(s, dict)),
        host_network=spec.get("hostNetwork") is True,
        active_deadline=active_deadline_of(spec),
        readiness_gates=tuple(
            intern(gate["conditionType"])
            for gate in spec.get("readinessGates") or ()
            if isinstance(gate, dict) and isinstance(gate.get("conditionType"), str)
        ),
    )


def active_deadline_of(spec: Mapping[str, Any]) -> int | None:
    """``spec.activeDeadlineSeconds``, if it is one (a positive whole number)."""
    value = spec.get("activeDeadlineSeconds")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
