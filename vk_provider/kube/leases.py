"""Lease objects (``coordination.k8s.io/v1``) for leader election: the REST calls only.

Owns the paths and the optimistic-concurrency writes (an update carries the resourceVersion that
was read, so two candidates cannot both win one round: the second gets 409 Conflict). When to
read, write or give up is ``controllers.leader``'s business.
"""

from __future__ import annotations

from vk_provider.kube.session import JSON, KubeError, KubeSession

API_VERSION = "coordination.k8s.io/v1"


def _collection(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class LeaseClient:
    """Implements :class:`vk_provider.controllers.leader.LeaseApi` over a :class:`KubeSession`,
    outside its rate limit (renewals must not queue behind bulk writes).

    Every method raises :class:`KubeError` on failure (409 on a lost race, 403 when RBAC lacks
    ``get``/``create``/``update`` on leases in the namespace).
    """

    def __init__(self, session: KubeSession) -> None:
        self._s = session

    async def get(self, namespace: str, name: str) -> JSON | None:
        """The Lease, or None if there is none."""
        try:
            return await self._s.request("GET", f"{_collection(namespace)}/{name}", limited=False)
        except KubeError as exc:
            if exc.is_not_found:
                return None
            raise

    async def create(self, namespace: str, name: str, spec: JSON) -> JSON:
        """Create the Lease; 409 AlreadyExists if another candidate created it first."""
        body = {"apiVersion": API_VERSION, "kind": "Lease", "metadata": {"name": name}, "spec": spec}
        return await self._s.request("POST", _collection(namespace), body=body, limited=False)

    async def update(self, namespace: str, name: str, spec: JSON, resource_version: str) -> JSON:
        """Replace the Lease's spec if it is still at ``resource_version`` (else 409 Conflict)."""
        body = {
            "apiVersion": API_VERSION,
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": resource_version},
            "spec": spec,
        }
        return await self._s.request("PUT", f"{_collection(namespace)}/{name}", body=body, limited=False)
