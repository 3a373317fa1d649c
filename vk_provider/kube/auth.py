"""Authentication and authorization of callers of the kubelet endpoint, delegated to the cluster.

Like the kubelet's webhook mode: bearer tokens are checked with a TokenReview, and every caller
(token or client certificate) is authorized with a SubjectAccessReview on the ``nodes`` resource.
Answers are cached briefly so a streaming client does not cost a review per request.
"""

from __future__ import annotations

import asyncio

from vk_provider.domain.callers import Caller
from vk_provider.kube.session import KubeError, KubeSession


class ClusterAuth:
    """Implements :class:`vk_provider.http.server.Authorizer` with TokenReview and SubjectAccessReview."""

    def __init__(self, session: KubeSession, ttl: float = 60.0) -> None:
        self._s = session
        self._ttl = ttl
        self._tokens: dict[str, tuple[float, Caller | None]] = {}
        self._decisions: dict[tuple[Caller, str, str, str, str], tuple[float, bool]] = {}

    async def authenticate_token(self, token: str) -> Caller | None:
        now = asyncio.get_running_loop().time()
        hit = self._tokens.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        try:
            review = await self._s.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body)
        except KubeError:
            return None
        status = review.get("status", {})
        caller = None
        if status.get("authenticated"):
            user = status.get("user", {})
            caller = Caller(str(user.get("username", "")), tuple(user.get("groups") or ()), str(user.get("uid", "")))
        if len(self._tokens) > 1000:
            self._tokens.clear()
        self._tokens[token] = (now + self._ttl, caller)
        return caller

    async def authorize(self, caller: Caller, verb: str, node: str, subresource: str) -> bool:
        now = asyncio.get_running_loop().time()
        key = (caller, verb, "nodes", node, subresource)
        hit = self._decisions.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": caller.user,
                "groups": list(caller.groups),
                "uid": caller.uid,
                "resourceAttributes": {
                    "verb": verb,
                    "resource": "nodes",
                    "subresource": subresource,
                    "name": node,
                    "group": "",
                    "version": "v1",
                },
            },
        }
        try:
            review = await self._s.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=body)
        except KubeError:
            return False
        allowed = bool(review.get("status", {}).get("allowed"))
        if len(self._decisions) > 1000:
            self._decisions.clear()
        self._decisions[key] = (now + self._ttl, allowed)
        return allowed
