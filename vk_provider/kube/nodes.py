"""Node and Lease API calls for the node controller.

Owns the REST paths and the create-or-update dance; decides nothing about timing or content.
"""

from __future__ import annotations

from typing import Any

from vk_provider.kube.session import JSON, MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeError, KubeSession

LEASE_NAMESPACE = "kube-node-lease"


class NodeClient:
    """Implements :class:`vk_provider.controllers.node.NodeApi` over a :class:`KubeSession`."""

    def __init__(self, session: KubeSession) -> None:
        self._s = session

    async def get_node(self, name: str) -> JSON | None:
        try:
            return await self._s.request("GET", f"/api/v1/nodes/{name}")
        except KubeError as exc:
            if exc.is_not_found:
                return None
            raise

    async def list_nodes(self, label_selector: str) -> list[JSON]:
        """The Nodes with these labels (one request: read once, at start-up)."""
        body = await self._s.request("GET", "/api/v1/nodes", query={"labelSelector": label_selector})
        return list(body.get("items") or [])

    async def create_node(self, body: JSON) -> JSON:
        return await self._s.request("POST", "/api/v1/nodes", body=body)

    async def patch_node(self, name: str, patch: JSON) -> JSON:
        return await self._s.request("PATCH", f"/api/v1/nodes/{name}", body=patch, content_type=STRATEGIC_MERGE_PATCH)

    async def replace_taints(self, name: str, taints: list[JSON], resource_version: str) -> JSON:
        # Taints are a list without a merge key in strategic merge: send them whole, guarded by
        # the resourceVersion we read so another writer's change is not overwritten blindly.
        patch: dict[str, Any] = {
            "metadata": {"resourceVersion": resource_version},
            "spec": {"taints": taints},
        }
        return await self._s.request("PATCH", f"/api/v1/nodes/{name}", body=patch, content_type=MERGE_PATCH)

    async def patch_node_status(self, name: str, status: JSON) -> JSON:
        return await self._s.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            body={"status": status},
            content_type=STRATEGIC_MERGE_PATCH,
        )

    async def delete_node(self, name: str) -> None:
        try:
            await self._s.request("DELETE", f"/api/v1/nodes/{name}")
        except KubeError as exc:
            if not exc.is_not_found:
                raise

    async def renew_lease(self, body: JSON, owner: JSON | None) -> JSON:
        """Create the Lease, or update its spec if it exists."""
        meta = body["metadata"]
        path = f"/apis/coordination.k8s.io/v1/namespaces/{meta['namespace']}/leases"
        if owner is not None:
            meta = {**meta, "ownerReferences": [owner]}
            body = {**body, "metadata": meta}

        # Outside the rate limit: a heartbeat queued behind bulk writes would let the Node go NotReady.
        async def renew() -> JSON:
            spec = {"spec": body["spec"]}
            return await self._s.request(
                "PATCH", f"{path}/{meta['name']}", body=spec, content_type=MERGE_PATCH, limited=False
            )

        try:
            return await renew()
        except KubeError as exc:
            if not exc.is_not_found:
                raise
        try:
            return await self._s.request("POST", path, body=body, limited=False)
        except KubeError as exc:
            if exc.is_already_exists:  # someone created it between our two calls: update it
                return await renew()
            raise

    async def server_version(self, timeout: float) -> str:
        info = await self._s.request("GET", "/version", timeout=timeout)
        return str(info.get("gitVersion", "unknown"))
