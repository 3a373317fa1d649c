"""The node controller: registers the virtual Node and keeps it Ready.

It owns the Node object, its status and its Lease: the Lease is renewed every
``lease_renew_interval`` and the full status is written at least every ``status_interval`` (like
the kubelet's node-status-update-frequency and virtual-kubelet's node controller). API failures
never end it: it retries with capped exponential back-off and recovers when the server returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from vk_provider.controllers.clock import Clock
from vk_provider.domain import node as render
from vk_provider.domain.node import JSON, NodeFacts

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"


class NodeApi(Protocol):
    """What the node controller needs from the API server.

    Every method raises an exception with ``is_transient`` / ``is_conflict`` / ``is_not_found``
    attributes (``KubeError``) on failure; none of them retries by itself.
    """

    async def get_node(self, name: str) -> JSON | None: ...
    async def create_node(self, body: JSON) -> JSON: ...
    async def patch_node(self, name: str, patch: JSON) -> JSON: ...
    async def replace_taints(self, name: str, taints: list[JSON], resource_version: str) -> JSON: ...
    async def patch_node_status(self, name: str, status: JSON) -> JSON: ...
    async def delete_node(self, name: str) -> None: ...
    async def renew_lease(self, body: JSON, owner: JSON | None) -> JSON: ...


@dataclass(frozen=True, slots=True)
class NodeTiming:
    lease_duration_seconds: int = 40
    lease_renew_interval: float = 10.0
    status_interval: float = 60.0
    max_backoff: float = 10.0
    on_shutdown: Literal["not-ready", "delete"] = "not-ready"


class NodeController:
    def __init__(self, api: NodeApi, facts: NodeFacts, timing: NodeTiming, clock: Clock) -> None:
        self._api = api
        self._facts = facts
        self._timing = timing
        self._clock = clock
        self._uid: str | None = None
        self._ready_since: datetime | None = None
        self._last_status_at: float | None = None
        self.heartbeats = 0
        self.status_updates = 0

    @property
    def name(self) -> str:
        return self._facts.name

    async def register(self) -> None:
        """Create the Node, or take over an existing one of the same name; then report Ready.

        Raises on failure; the caller decides whether to retry (see :meth:`run`).
        """
        now = self._clock.now()
        self._ready_since = now
        existing = await self._api.get_node(self.name)
        if existing is None:
            try:
                created = await self._api.create_node(render.node_object(self._facts, now))
                self._uid = created["metadata"]["uid"]
                log.info("registered node %s", self.name)
            except Exception as exc:
                if not getattr(exc, "is_already_exists", False):
                    raise
                existing = await self._api.get_node(self.name)
        if existing is not None:
            await self._adopt(existing)
        await self._write_status(ready=True)
        await self._renew_lease()

    async def _adopt(self, existing: JSON) -> None:
        """Re-use a Node left by an earlier run: restore our labels and taint, keep other taints."""
        for _attempt in range(5):
            self._uid = existing["metadata"]["uid"]
            await self._api.patch_node(self.name, {"metadata": render.node_metadata_patch(self._facts)["metadata"]})
            taints = render.merge_taints(list(existing.get("spec", {}).get("taints") or []), self._facts)
            try:
                await self._api.replace_taints(self.name, taints, existing["metadata"]["resourceVersion"])
                log.info("re-using existing node %s", self.name)
                return
            except Exception as exc:
                if not getattr(exc, "is_conflict", False):
                    raise
                fresh = await self._api.get_node(self.name)
                if fresh is None:
                    raise
                existing = fresh
        raise RuntimeError(f"node {self.name}: taints kept conflicting with another writer")

    async def run(self) -> None:
        """Heartbeat forever (until cancelled). Registers first if :meth:`register` was not called."""
        backoff = 0.0
        failing = False
        while True:
            try:
                if self._uid is None:
                    await self.register()
                else:
                    await self._renew_lease()
                    due = self._last_status_at is None or (
                        self._clock.monotonic() - self._last_status_at >= self._timing.status_interval
                    )
                    if due or failing:
                        await self._write_status(ready=True)
                if failing:
                    log.info("node %s: API server reachable again; heartbeat resumed", self.name)
                failing, backoff = False, 0.0
                await self._clock.sleep(self._timing.lease_renew_interval)
            except Exception as exc:
                if getattr(exc, "is_not_found", False):
                    log.warning("node %s was deleted by someone else; registering it again", self.name)
                    self._uid = None
                if not failing:
                    log.warning("node %s: heartbeat failed (%s); retrying with back-off", self.name, exc)
                failing = True
                backoff = min(self._timing.max_backoff, max(0.5, backoff * 2))
                await self._clock.sleep(backoff)

    async def shutdown(self) -> None:
        """Leave the Node NotReady, or delete it, as configured. Best effort: errors are logged."""
        try:
            if self._timing.on_shutdown == "delete":
                await self._api.delete_node(self.name)
                log.info("deleted node %s", self.name)
            elif self._uid is not None:
                self._ready_since = self._clock.now()
                await self._write_status(ready=False)
                log.info("marked node %s NotReady", self.name)
        except Exception as exc:
            log.warning("node %s: could not update the Node on shutdown: %s", self.name, exc)

    async def _write_status(self, *, ready: bool) -> None:
        now = self._clock.now()
        status = render.node_status_patch(self._facts, now, ready=ready, transition=self._ready_since or now)
        await self._api.patch_node_status(self.name, status)
        self._last_status_at = self._clock.monotonic()
        self.status_updates += 1

    async def _renew_lease(self) -> None:
        owner = None
        if self._uid:
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self._uid}
        body = render.lease_object(self.name, LEASE_NAMESPACE, self._timing.lease_duration_seconds, self._clock.now())
        await self._api.renew_lease(body, owner)
        self.heartbeats += 1
