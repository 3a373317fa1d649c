"""The node controller against a fake API and a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from vk_provider.controllers.clock import FakeClock
from vk_provider.controllers.node import NodeController, NodeTiming
from vk_provider.domain.node import NodeFacts


class FakeKubeError(Exception):
    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    @property
    def is_conflict(self) -> bool:
        return self.status == 409

    @property
    def is_not_found(self) -> bool:
        return self.status == 404

    @property
    def is_already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def is_transient(self) -> bool:
        return self.status in (0, 429) or self.status >= 500


@dataclass
class FakeNodeApi:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False
    conflicts_left: int = 0
    deleted: list[str] = field(default_factory=list)
    rv: int = 1

    def _check(self) -> None:
        if self.down:
            raise FakeKubeError(0, "Unreachable")

    async def get_node(self, name: str) -> dict[str, Any] | None:
        self._check()
        return self.nodes.get(name)

    async def create_node(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        name = body["metadata"]["name"]
        if name in self.nodes:
            raise FakeKubeError(409, "AlreadyExists")
        body["metadata"].update(uid=f"uid-{name}", resourceVersion=str(self.rv))
        self.nodes[name] = body
        return body

    async def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self._check()
        self.nodes[name]["metadata"]["labels"] = patch["metadata"]["labels"]
        return self.nodes[name]

    async def replace_taints(self, name: str, taints: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
        self._check()
        if self.conflicts_left:
            self.conflicts_left -= 1
            self.rv += 1
            self.nodes[name]["metadata"]["resourceVersion"] = str(self.rv)
            raise FakeKubeError(409, "Conflict")
        self.nodes[name]["spec"]["taints"] = taints
        return self.nodes[name]

    async def patch_node_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if name not in self.nodes:
            raise FakeKubeError(404, "NotFound")
        self.statuses.append(status)
        return self.nodes[name]

    async def delete_node(self, name: str) -> None:
        self._check()
        self.deleted.append(name)
        self.nodes.pop(name, None)

    async def renew_lease(self, body: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
        self._check()
        self.leases.append({"body": body, "owner": owner})
        return body


FACTS = NodeFacts(
    name="vk", provider="alibabacloud", cpu="8", memory="16Gi", pods=10, ephemeral_storage="100Gi",
    internal_ip="10.1.2.3", kubelet_port=10250,
)  # fmt: skip


def ready(status: dict[str, Any]) -> str:
    return str(next(c["status"] for c in status["conditions"] if c["type"] == "Ready"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_heartbeat_cadence(clock: FakeClock) -> None:
    api = FakeNodeApi()
    ctl = NodeController(api, FACTS, NodeTiming(lease_renew_interval=10, status_interval=60), clock)
    task = asyncio.create_task(ctl.run())
    await clock.advance(0)
    assert "vk" in api.nodes
    assert len(api.leases) == 1
    assert len(api.statuses) == 1
    assert ready(api.statuses[0]) == "True"
    assert api.leases[0]["owner"]["uid"] == "uid-vk"
    await clock.advance(60)
    assert len(api.leases) == 7  # every 10 s
    assert len(api.statuses) == 2  # the full status at least every 60 s
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_outage_backs_off_and_recovers(clock: FakeClock) -> None:
    api = FakeNodeApi()
    ctl = NodeController(api, FACTS, NodeTiming(lease_renew_interval=10, max_backoff=8), clock)
    task = asyncio.create_task(ctl.run())
    await clock.advance(0)
    api.down = True
    await clock.advance(60)
    leases_before = len(api.leases)
    api.down = False
    await clock.advance(9)  # back-off never exceeds 8 s
    assert len(api.leases) > leases_before
    assert ready(api.statuses[-1]) == "True"  # status rewritten right after recovery
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_node_deleted_by_someone_else_is_registered_again(clock: FakeClock) -> None:
    api = FakeNodeApi()
    ctl = NodeController(api, FACTS, NodeTiming(lease_renew_interval=10, status_interval=10), clock)
    task = asyncio.create_task(ctl.run())
    await clock.advance(0)
    api.nodes.clear()
    await clock.advance(30)
    assert "vk" in api.nodes
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_existing_node_is_adopted_and_other_taints_kept(clock: FakeClock) -> None:
    api = FakeNodeApi(conflicts_left=2)
    other = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}
    stale = {"key": "virtual-kubelet.io/provider", "value": "old", "effect": "NoSchedule"}
    api.nodes["vk"] = {
        "metadata": {"name": "vk", "uid": "u1", "resourceVersion": "1"},
        "spec": {"taints": [other, stale]},
    }
    ctl = NodeController(api, FACTS, NodeTiming(), clock)
    await ctl.register()
    taints = api.nodes["vk"]["spec"]["taints"]
    assert other in taints
    assert {"key": "virtual-kubelet.io/provider", "value": "alibabacloud", "effect": "NoSchedule"} in taints
    assert stale not in taints
    assert api.nodes["vk"]["metadata"]["labels"]["type"] == "virtual-kubelet"


@pytest.mark.parametrize(("mode", "expect_deleted"), [("not-ready", False), ("delete", True)])
async def test_shutdown_modes(clock: FakeClock, mode: str, expect_deleted: bool) -> None:
    api = FakeNodeApi()
    ctl = NodeController(api, FACTS, NodeTiming(on_shutdown=mode), clock)  # type: ignore[arg-type]
    await ctl.register()
    await ctl.shutdown()
    assert (api.deleted == ["vk"]) is expect_deleted
    if not expect_deleted:
        assert ready(api.statuses[-1]) == "False"


async def test_shutdown_errors_are_swallowed(clock: FakeClock) -> None:
    api = FakeNodeApi()
    ctl = NodeController(api, FACTS, NodeTiming(), clock)
    await ctl.register()
    api.down = True
    await ctl.shutdown()  # must not raise
