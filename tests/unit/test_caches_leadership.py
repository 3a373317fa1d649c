"""Two agents, one registry, one cluster: only the leader acts on caches; every agent matches Pods.

Two ImageCacheControllers share a fake registry (the PostgreSQL database) and a fake API server
(the cluster's ImageCache objects); a tiny watch delivers every object to both after each change.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.unit.test_caches_controller import FakeApi, FakeBuilder, FakeManifests, FakeStore, obj, pod
from vk_provider.controllers.caches import CacheManager, CacheOptions, ImageCacheController
from vk_provider.controllers.clock import FakeClock
from vk_provider.domain import cachebuild as cb
from vk_provider.domain.annotations import AUTO_IMAGE_CACHE_SEED, IMAGE_SNAPSHOT_ID_SEED
from vk_provider.domain.model import CachePhase, ImageCache

AUTO = {AUTO_IMAGE_CACHE_SEED: "true"}
BUSYBOX = "docker.io/library/busybox:latest"


class SharedStore(FakeStore):
    """The shared registry: also answers by name and applies hits to the row."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[tuple[str, str]] = []  # (agent, method)

    async def get_cache_by_name(self, name: str) -> ImageCache | None:
        return self.rows.get(name)

    async def mark_cache_matched(self, imc_id: str, now: datetime, **extra: Any) -> bool:
        await super().mark_cache_matched(imc_id, now, **extra)
        for name, row in self.rows.items():
            if row.imc_id == imc_id:
                self.rows[name] = replace(row, last_matched_at=now, expires_at=extra.get("expires_at", row.expires_at))
                return True
        return False


class AgentStore:
    """One agent's handle on the shared registry, recording which agent wrote what."""

    def __init__(self, shared: SharedStore, agent: str) -> None:
        self._shared = shared
        self._agent = agent

    def __getattr__(self, method: str) -> Any:
        target = getattr(self._shared, method)
        if method.startswith(("upsert", "set_", "append", "delete", "mark")):

            async def recorded(*args: Any, **kwargs: Any) -> Any:
                self._shared.writers.append((self._agent, method))
                return await target(*args, **kwargs)

            return recorded
        return target


class AgentApi:
    """One agent's view of the cluster's objects, recording what it wrote."""

    def __init__(self, cluster: FakeApi) -> None:
        self.cluster = cluster
        self.status_writes = 0
        self.created: list[str] = []

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body["metadata"]["name"])
        return await self.cluster.create(body)

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status_writes += 1
        return await self.cluster.patch_status(name, status)

    async def delete(self, name: str) -> None:
        await self.cluster.delete(name)


class Leadership:
    def __init__(self, leading: bool) -> None:
        self.is_leader = leading
        self.on_change: Callable[[bool], Awaitable[None]] | None = None

    async def change(self, leading: bool) -> None:
        self.is_leader = leading
        assert self.on_change is not None
        await self.on_change(leading)


class Agent:
    """An agent on the world's registry, or with ``own_store`` on a registry of its own (SQLite)."""

    def __init__(self, name: str, world: World, leading: bool, own_store: SharedStore | None = None) -> None:
        self.name = name
        self.api = AgentApi(world.cluster)
        self.builder = FakeBuilder(world.clock)
        self.leadership = Leadership(leading)
        self.controller = ImageCacheController(
            api=self.api,
            store=AgentStore(own_store or world.store, name),
            manifests=FakeManifests(),
            builder=self.builder,
            clock=world.clock,
            rng=random.Random(name),
            options=CacheOptions(snapshot_seconds=5, sweep_interval_seconds=3600, shared_registry=own_store is None),
            leadership=self.leadership,
        )
        self.manager = CacheManager(self.controller, FakeManifests(), world.clock)


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = SharedStore()
        self.cluster = FakeApi()
        self.a = Agent("a", self, leading=True)
        self.b = Agent("b", self, leading=False)

    async def watch(self) -> None:
        """Both agents' watches deliver every object as it is now."""
        for agent in (self.a, self.b):
            for body in list(self.cluster.objects.values()):
                await agent.controller.upsert(body)

    async def run(self, seconds: float, step: float = 1.0) -> None:
        """Let simulated time pass, the watches delivering changes as they happen."""
        for _ in range(int(seconds / step)):
            await self.clock.advance(step)
            await self.watch()

    def writers(self) -> set[str]:
        return {agent for agent, _ in self.store.writers}


async def started(made: World) -> AsyncIterator[World]:
    await made.a.controller.resync([])
    await made.b.controller.resync([])
    yield made
    for agent in (made.a, made.b):
        builds = list(agent.controller._builds.values())
        for task in builds:
            task.cancel()
        await asyncio.gather(*builds, return_exceptions=True)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async for made in started(World()):
        yield made


async def follower_made_auto_cache(world: World) -> str:
    """The follower's miss creates an automatic cache; the leader builds it. Its name."""
    await world.b.manager.resolve(pod("p", ["busybox"], AUTO))
    await world.watch()
    await world.run(30)
    return world.b.api.created[0]


async def test_only_the_leader_builds_and_both_index_the_cache(world: World) -> None:
    world.cluster.objects["web"] = obj("web", ["nginx:1.7.9", "busybox"])
    await world.watch()
    await world.run(60)
    row = world.store.rows["web"]
    assert row.phase is CachePhase.READY
    assert world.cluster.objects["web"]["status"]["imageCacheId"] == row.imc_id
    assert world.writers() == {"a"}
    assert (world.b.api.status_writes, world.b.builder.pulled) == (0, [])
    assert world.a.controller.caches["web"] == row
    assert world.b.controller.caches["web"] == row
    assert not world.b.controller.leading


async def test_a_follower_miss_creates_the_object_and_the_leader_builds_it(world: World) -> None:
    miss = await world.b.manager.resolve(pod("first", ["nginx:1.7.9"], AUTO))
    assert miss.outcome == "miss"
    assert len(world.b.api.created) == 1
    name = world.b.api.created[0]
    reserved_id = world.cluster.objects[name]["metadata"]["annotations"][cb.ID_ANNOTATION]
    assert world.store.rows == {}  # the follower wrote no row: the leader does, from the object
    # A second miss on the follower shares the reserved cache rather than making another.
    again = await world.b.manager.resolve(pod("second", ["nginx:1.7.9"], AUTO))
    assert (again.outcome, len(world.cluster.created)) == ("miss", 1)
    assert reserved_id in again.events[-1].message

    await world.watch()
    await world.run(60)
    assert world.store.rows[name].phase is CachePhase.READY
    assert world.store.rows[name].imc_id == reserved_id
    assert world.writers() == {"a"}
    auto_hit = await world.b.manager.resolve(pod("third", ["nginx:1.7.9"], AUTO))
    explicit = await world.b.manager.resolve(pod("fourth", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: reserved_id}))
    assert (auto_hit.outcome, auto_hit.imc_id) == ("auto_hit", reserved_id)
    assert (explicit.outcome, explicit.imc_id) == ("explicit_hit", reserved_id)
    assert await world.b.manager.flush_hits()
    assert ("b", "mark_cache_matched") in world.store.writers  # hits are the follower's own to record


async def test_the_new_leader_finishes_a_build_the_old_one_left(world: World) -> None:
    world.cluster.objects["big"] = obj("big", ["nginx:1.7.9"])
    await world.watch()
    await world.run(2)
    assert world.store.rows["big"].phase is CachePhase.CREATING
    imc_id = world.store.rows["big"].imc_id

    await world.a.leadership.change(False)
    assert not world.a.controller.building("big")
    writes_before = len(world.store.writers)
    await world.run(10)
    assert len(world.store.writers) == writes_before  # nobody leads: nothing is written
    assert world.store.rows["big"].phase is CachePhase.CREATING

    await world.b.leadership.change(True)
    await world.run(60)
    row = world.store.rows["big"]
    assert (row.phase, row.imc_id) == (CachePhase.READY, imc_id)
    assert world.cluster.objects["big"]["status"]["phase"] == "Ready"
    assert world.b.builder.pulled
    assert world.b.api.status_writes > 0
    assert world.a.controller.caches["big"].phase is CachePhase.READY  # the old leader follows the new one


async def test_an_object_made_while_nobody_led_is_built_by_the_next_leader(world: World) -> None:
    await world.a.leadership.change(False)
    await world.b.manager.resolve(pod("lonely", ["busybox"], AUTO))
    await world.watch()
    await world.run(5)
    name = world.b.api.created[0]
    assert name not in world.store.rows
    await world.a.leadership.change(True)
    await world.run(30)
    assert world.store.rows[name].phase is CachePhase.READY


async def test_the_leader_sees_follower_hits_before_it_deletes_an_expired_cache(world: World) -> None:
    runner = asyncio.create_task(world.a.controller.run())
    hits = asyncio.create_task(world.b.manager.run())  # the follower records its hits in the background
    try:
        name = await follower_made_auto_cache(world)
        assert world.store.rows[name].phase is CachePhase.READY
        # Days later the follower keeps using it; the leader's own index knows nothing of those hits.
        for day in range(1, 40):
            await world.clock.advance(24 * 3600)
            hit = await world.b.manager.resolve(pod(f"day{day}", ["busybox"], AUTO))
            assert hit.outcome == "auto_hit", day
        assert name in world.store.rows
        last_hit = world.clock.now()
        await world.clock.advance(3600)  # the leader's next sweep reads the hits from the registry
        assert world.a.controller.caches[name].last_matched_at == last_hit
        # Unused until the expiry its last (follower) hit set, it goes.
        expires = world.store.rows[name].expires_at
        assert expires is not None
        assert expires - last_hit > timedelta(days=7)
        await world.clock.advance((expires - world.clock.now()).total_seconds() - 3600)
        assert name in world.store.rows
        await world.clock.advance(7200)
        assert name not in world.store.rows
        assert name not in world.cluster.objects
    finally:
        runner.cancel()
        hits.cancel()
        await asyncio.gather(runner, hits, return_exceptions=True)


async def test_a_follower_without_the_row_indexes_the_status(world: World) -> None:
    """A follower whose registry lacks the row (not shared) still matches against the cache."""
    ready_id = "imc-" + "a" * 20
    status = {"imageCacheId": ready_id, "phase": "Ready", "progress": "100%"}
    await world.b.controller.upsert(obj("elsewhere", ["busybox:1.36"], status=status))
    assert world.b.controller.caches["elsewhere"].phase is CachePhase.READY
    hit = await world.b.manager.resolve(pod("p", ["busybox:1.36"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
    assert (hit.outcome, hit.imc_id) == ("explicit_hit", ready_id)
    assert world.b.api.status_writes == 0
    assert "elsewhere" not in world.store.rows


async def test_a_cache_deleted_while_nobody_led_is_forgotten_by_the_next_leader(world: World) -> None:
    world.cluster.objects["gone"] = obj("gone", ["nginx:1.7.9"])
    await world.watch()
    await world.run(60)
    assert world.store.rows["gone"].phase is CachePhase.READY
    await world.a.leadership.change(False)  # e.g. killed: nobody leads for a while
    body = world.cluster.objects.pop("gone")
    for agent in (world.a, world.b):
        await agent.controller.delete(body)
    assert "gone" in world.store.rows  # a follower leaves rows to the leader
    await world.b.leadership.change(True)
    # Its index came from the registry's rows: the one whose object is gone must not come back.
    assert "gone" not in world.b.controller.caches
    assert "gone" not in world.store.rows
    hit = await world.b.manager.resolve(pod("late", ["nginx:1.7.9"], AUTO))
    assert hit.outcome == "miss"


@pytest.mark.parametrize("listed", [True, False], ids=["status lists images", "status of an older agent"])
async def test_a_follower_with_a_registry_of_its_own_follows_the_object_not_its_stale_row(
    world: World, listed: bool
) -> None:
    # Agent a built "web" (nginx) and then stopped leading; b changed it to busybox. a's registry
    # is its own (SQLite): its row still says nginx, and it must follow the object instead (the
    # images its status lists; a status written by an older agent lists none: then its spec's).
    world.cluster.objects["web"] = obj("web", ["nginx:1.7.9"])
    await world.watch()
    await world.run(60)
    stale = world.store.rows["web"]
    private = SharedStore()
    private.rows["web"] = stale
    own = Agent("own", world, leading=False, own_store=private)
    await own.controller.resync([])
    changed = {**world.cluster.objects["web"], "spec": {"images": ["busybox"]}}
    changed["status"] = {**changed["status"], "phase": "Updating", "progress": "40%", "images": [BUSYBOX]}
    if not listed:
        del changed["status"]["images"]
    await own.controller.upsert(changed)
    followed = own.controller.caches["web"]
    assert (followed.imc_id, followed.phase) == (stale.imc_id, CachePhase.UPDATING)
    assert [image.reference for image in followed.images] == [BUSYBOX]
    assert private.writers == []  # a follower writes nothing


async def test_a_leader_with_a_registry_of_its_own_takes_what_it_followed_and_builds_nothing_again(
    world: World,
) -> None:
    world.cluster.objects["web"] = obj("web", ["nginx:1.7.9"])
    await world.watch()
    await world.run(60)
    stale = world.store.rows["web"]
    private = SharedStore()
    private.rows["web"] = stale  # its own row: nginx, Ready
    own = Agent("own", world, leading=False, own_store=private)
    controller, builder, leadership = own.controller, own.builder, own.leadership
    # Meanwhile another leader changed the cache to busybox and finished it.
    done = {**world.cluster.objects["web"], "spec": {"images": ["busybox"]}}
    done["status"] = {**done["status"], "phase": "Ready", "progress": "100%", "images": [BUSYBOX]}
    await controller.resync([done])
    await leadership.change(True)
    await world.clock.advance(60)
    assert builder.pulled == []  # not built again
    row = private.rows["web"]
    assert (row.imc_id, row.phase) == (stale.imc_id, CachePhase.READY)
    assert [image.reference for image in row.images] == [BUSYBOX]


class OwnRegistries(World):
    """Two agents with a registry each (SQLite files of their own): only the objects connect them."""

    def __init__(self) -> None:
        super().__init__()
        self.stores = {"a": SharedStore(), "b": SharedStore()}
        self.a = Agent("a", self, leading=True, own_store=self.stores["a"])
        self.b = Agent("b", self, leading=False, own_store=self.stores["b"])


@pytest.fixture
async def own() -> AsyncIterator[OwnRegistries]:
    async for made in started(OwnRegistries()):
        assert isinstance(made, OwnRegistries)
        yield made


async def test_a_follower_with_a_registry_of_its_own_keeps_alive_a_cache_it_uses(own: OwnRegistries) -> None:
    world = own
    runner = asyncio.create_task(world.a.controller.run())  # the leader's sweep
    hits = asyncio.create_task(world.b.manager.run())  # the follower records its hits in the background
    try:
        name = await follower_made_auto_cache(world)
        leader = world.stores["a"].rows
        assert leader[name].phase is CachePhase.READY
        leader_writes = world.a.api.status_writes
        # Only the follower uses it, for 40 days: past the 30 days an automatic cache lives unused.
        for day in range(1, 41):
            await world.clock.advance(24 * 3600)
            hit = await world.b.manager.resolve(pod(f"day{day}", ["busybox"], AUTO))
            assert hit.outcome == "auto_hit", day
            last_hit = world.clock.now()
            await world.run(2)  # the follower shows the expiry its hit moved; the leader's watch brings it
        # The leader took the follower's hits into its own registry, without writing the status back.
        row = leader[name]
        assert row.last_matched_at is not None
        assert abs(row.last_matched_at - last_hit) <= timedelta(minutes=1)
        assert row.expires_at == row.last_matched_at + timedelta(days=30)
        assert world.a.api.status_writes == leader_writes
        assert {method for _, method in world.stores["b"].writers} == {"mark_cache_matched"}  # its own hits only
        # Unused from then on, it goes 30 days after the follower's last hit.
        assert row.expires_at is not None
        await world.clock.advance((row.expires_at - world.clock.now()).total_seconds() - 3600)
        assert name in leader
        await world.clock.advance(7200)
        assert name not in leader
        assert name not in world.cluster.objects
    finally:
        runner.cancel()
        hits.cancel()
        await asyncio.gather(runner, hits, return_exceptions=True)


async def test_an_expiry_no_hit_could_set_is_not_taken_by_the_leader(own: OwnRegistries) -> None:
    name = await follower_made_auto_cache(own)
    row = own.stores["a"].rows[name]
    assert row.expires_at is not None
    far = own.clock.now() + timedelta(days=365)  # edited by hand: no hit made now sets that
    await own.cluster.patch_status(name, {"expireDateTime": cb.rfc3339(far)})
    await own.watch()
    assert own.stores["a"].rows[name].expires_at == row.expires_at
    assert own.cluster.objects[name]["status"]["expireDateTime"] == cb.rfc3339(row.expires_at)  # put back


async def test_an_agent_that_starts_after_an_edit_nobody_led_builds_it(own: OwnRegistries) -> None:
    """spec.images edited while no agent ran: a fresh agent (a SQLite file of its own) follows the
    images the status says the cache holds, serves no hit on the edited ones, and builds them once
    it leads."""
    world = own
    world.cluster.objects["web"] = obj("web", ["nginx:1.7.9"])
    await world.watch()
    await world.run(60)
    imc_id = world.stores["a"].rows["web"].imc_id
    await world.a.leadership.change(False)  # stopped; then the spec is edited
    edited = {**world.cluster.objects["web"], "spec": {"images": ["busybox"]}}
    world.cluster.objects["web"] = edited
    new = Agent("new", world, leading=False, own_store=SharedStore())  # a new SQLite file
    controller, builder, leadership = new.controller, new.builder, new.leadership
    await controller.resync([edited])
    followed = controller.caches["web"]
    assert [image.reference for image in followed.images] == ["docker.io/library/nginx:1.7.9"]
    decision = await new.manager.resolve(pod("p", ["busybox"], {IMAGE_SNAPSHOT_ID_SEED: imc_id}))
    assert decision.imc_id == imc_id
    assert decision.present_images == frozenset()  # the cache never pulled busybox

    await leadership.change(True)
    await world.clock.advance(60)
    assert builder.pulled  # built, not taken as built
    status = world.cluster.objects["web"]["status"]
    assert (status["phase"], status["imageCacheId"], status["images"]) == (
        "Ready",
        imc_id,
        [BUSYBOX],
    )
