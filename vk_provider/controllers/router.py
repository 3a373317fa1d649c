"""One Pod watch for all of an agent's virtual nodes: routes each Pod to its node's controller.

Implements the watch handler (``resync``/``upsert``/``delete``) and the http layer's ``PodView``
over several :class:`~vk_provider.controllers.pods.PodController`. Pods bound to nodes that are
not ours are ignored. A Pod whose ``spec.nodeName`` never changes once set (Kubernetes forbids
it) needs no hand-over between controllers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from vk_provider.controllers.logs import LogRun
from vk_provider.controllers.pods import PodController

JSON = dict[str, Any]


class PodRouter:
    def __init__(self, controllers: Sequence[PodController]) -> None:
        self.controllers = {c.node_name: c for c in controllers}
        self.synced = asyncio.Event()

    def _of(self, obj: JSON) -> PodController | None:
        return self.controllers.get(str((obj.get("spec") or {}).get("nodeName") or ""))

    async def resync(self, objects: list[JSON]) -> None:
        groups: dict[str, list[JSON]] = {name: [] for name in self.controllers}
        for obj in objects:
            node = str((obj.get("spec") or {}).get("nodeName") or "")
            if node in groups:
                groups[node].append(obj)
        for name, controller in self.controllers.items():
            await controller.resync(groups[name])
        self.synced.set()

    def tracks(self, uid: str, version: str) -> bool:
        """Whether one of the nodes runs this Pod and ``version`` is the Pod as its status
        reporter's last write left it: the upsert would then only look for a deletionTimestamp."""
        for c in self.controllers.values():
            if uid in c.workers:
                return c.reporter.wrote(uid, version)
        return False

    async def upsert(self, obj: JSON) -> None:
        controller = self._of(obj)
        if controller is not None:
            await controller.upsert(obj)

    async def delete(self, obj: JSON) -> None:
        controller = self._of(obj)
        if controller is not None:
            await controller.delete(obj)

    def pod_list(self) -> list[JSON]:
        return [pod for c in self.controllers.values() for pod in c.pod_list()]

    def node_of(self, namespace: str, pod: str) -> str | None:
        for c in self.controllers.values():
            found = c.node_of(namespace, pod)
            if found is not None:
                return found
        return None

    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> LogRun | str | None:
        for c in self.controllers.values():
            found = c.container_log(namespace, pod, container, previous=previous)
            if found is not None:
                return found
        return None
