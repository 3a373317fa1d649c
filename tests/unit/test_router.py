"""The Pod router sends each Pod to its node's controller and ignores other nodes' Pods."""

from __future__ import annotations

from typing import Any

from vk_provider.controllers.router import PodRouter


class Recorder:
    def __init__(self, name: str) -> None:
        self.node_name = name
        self.calls: list[tuple[str, Any]] = []

    async def resync(self, objects: list[dict[str, Any]]) -> None:
        self.calls.append(("resync", [o["metadata"]["name"] for o in objects]))

    async def upsert(self, obj: dict[str, Any]) -> None:
        self.calls.append(("upsert", obj["metadata"]["name"]))

    async def delete(self, obj: dict[str, Any]) -> None:
        self.calls.append(("delete", obj["metadata"]["name"]))

    def pod_list(self) -> list[dict[str, Any]]:
        return [{"node": self.node_name}]

    def node_of(self, namespace: str, pod: str) -> str | None:
        return self.node_name if pod.startswith(self.node_name) else None

    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> None:
        return None


def pod(name: str, node: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"nodeName": node}}


async def test_routes_by_node_name() -> None:
    a, b = Recorder("a"), Recorder("b")
    router = PodRouter([a, b])  # type: ignore[list-item]
    await router.resync([pod("a1", "a"), pod("x1", "other"), pod("b1", "b"), pod("a2", "a")])
    assert router.synced.is_set()
    await router.upsert(pod("b2", "b"))
    await router.upsert(pod("x2", "other"))
    await router.delete(pod("a1", "a"))
    assert a.calls == [("resync", ["a1", "a2"]), ("delete", "a1")]
    assert b.calls == [("resync", ["b1"]), ("upsert", "b2")]
    assert router.pod_list() == [{"node": "a"}, {"node": "b"}]
    assert router.node_of("ns", "b-pod") == "b"
    assert router.node_of("ns", "zzz") is None
