"""Who is calling the kubelet endpoint, and which node subresource a request path reads.

PURE: the mapping mirrors the kubelet's authorizer (``/stats`` → ``stats``, ``/metrics`` →
``metrics``, ``/logs`` → ``log``, everything else → ``proxy``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""


def node_subresource(path: str) -> str:
    if path.startswith("/stats"):
        return "stats"
    if path.startswith("/metrics"):
        return "metrics"
    if path.startswith("/logs"):
        return "log"
    return "proxy"


def verb_for(method: str) -> str:
    return {
        "GET": "get",
        "HEAD": "get",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }.get(method.upper(), "get")
