"""The ImageCache controller and the CacheManager, with fakes and a fake clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from vk_provider.controllers.caches import CacheManager, CacheOptions, ImageCacheController
from vk_provider.controllers.clock import FakeClock
from vk_provider.controllers.pods import ImagePullError
from vk_provider.controllers.puller import CacheBuildResult, ProgressHandler
from vk_provider.domain import cachebuild as cb
from vk_provider.domain.annotations import AUTO_IMAGE_CACHE_SEED, IMAGE_SNAPSHOT_ID_SEED, MATCHED_IMAGE_CACHE
from vk_provider.domain.images import InvalidReference, parse_reference
from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest, Layer
from vk_provider.domain.node import rfc3339
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.records import CacheEvent, merge_cache_event

MB = 10**6
NGINX = "docker.io/library/nginx:1.7.9"
BUSYBOX = "docker.io/library/busybox:latest"
CATALOG = {
    NGINX: ImageManifest(
        NGINX, "sha256:" + "1" * 64, (Layer("base", 30 * MB, 80 * MB), Layer("app", 10 * MB, 20 * MB))
    ),
    BUSYBOX: ImageManifest(BUSYBOX, "sha256:" + "2" * 64, (Layer("bb", 2 * MB, 4 * MB),)),
    "docker.io/library/huge:1": ImageManifest(
        "docker.io/library/huge:1", "sha256:" + "3" * 64, (Layer("h", 10 * 2**30, 25 * 2**30),)
    ),
}


class FakeError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.is_not_found = status == 404
        self.is_already_exists = status == 409
        self.is_transient = status >= 500


class FakeStore:
    """The registry, in memory (CacheStore)."""

    def __init__(self, caches: Iterable[ImageCache] = ()) -> None:
        self.rows: dict[str, ImageCache] = {c.name: c for c in caches}
        self.events: dict[str, tuple[CacheEvent, ...]] = {}
        self.matched: list[tuple[str, datetime, Any, int]] = []
        self.fail_matches = 0
        self.progress_writes: list[tuple[str, int]] = []

    async def list_caches(self) -> tuple[ImageCache, ...]:
        return tuple(self.rows.values())

    async def get_cache_by_name(self, name: str) -> ImageCache | None:
        return self.rows.get(name)

    async def upsert_cache(self, cache: ImageCache, *, now: datetime) -> ImageCache:
        if any(c.imc_id == cache.imc_id and c.name != cache.name for c in self.rows.values()):
            raise ValueError("id taken")
        self.rows[cache.name] = cache
        return cache

    async def set_cache_status(self, name: str, *, now: datetime, **changes: Any) -> ImageCache | None:
        row = self.rows.get(name)
        if row is None:
            return None
        fields = {k: v for k, v in changes.items() if v is not None or k == "expires_at"}
        if "progress" in fields:
            self.progress_writes.append((name, fields["progress"]))
        row = replace(row, **fields)
        self.rows[name] = row
        return row

    async def append_cache_event(
        self, name: str, *, type: str, message: str, now: datetime
    ) -> tuple[CacheEvent, ...] | None:
        if name not in self.rows:
            return None
        self.events[name] = merge_cache_event(self.events.get(name, ()), type=type, message=message, now=now)
        return self.events[name]

    async def list_cache_events(self, name: str) -> tuple[CacheEvent, ...] | None:
        return self.events.get(name, ()) if name in self.rows else None

    async def mark_cache_matched(self, imc_id: str, now: datetime, **extra: Any) -> bool:
        if self.fail_matches:
            self.fail_matches -= 1
            raise RuntimeError("database is locked")
        self.matched.append((imc_id, now, extra.get("expires_at", "unchanged"), extra.get("count", 1)))
        return True

    async def delete_cache(self, name: str) -> bool:
        self.events.pop(name, None)
        return self.rows.pop(name, None) is not None


class FakeApi:
    """ImageCache objects on a pretend API server; records every status written."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.statuses: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[str] = []
        self.created: list[dict[str, Any]] = []

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name in self.objects:
            raise FakeError(409)
        self.created.append(body)
        self.objects[name] = {**body, "status": {}}
        return self.objects[name]

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        if name not in self.objects:
            raise FakeError(404)
        merged = {k: v for k, v in {**self.objects[name].get("status", {}), **status}.items() if v is not None}
        self.objects[name]["status"] = merged
        self.statuses.append((name, dict(merged)))
        return self.objects[name]

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.objects.pop(name, None)


class FakeManifests:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str, tuple[str, ...]]] = []

    def manifest(self, image: str) -> ImageManifest | InvalidReference | None:
        ref = parse_reference(image)
        if isinstance(ref, InvalidReference):
            return ref
        return CATALOG.get(ref.normalized)

    async def resolve(
        self, image: str, *, namespace: str = "", pull_secrets: Sequence[str] = ()
    ) -> ImageManifest | InvalidReference | ImagePullError:
        self.asked.append((image, namespace, tuple(pull_secrets)))
        found = self.manifest(image)
        return ImagePullError("ErrImagePull", f"{image} is nowhere") if found is None else found


class FakeBuilder:
    """Pulls a layer per simulated second per 10 MB, reporting progress after each layer."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pulled: list[str] = []

    async def pull_for_cache(
        self,
        manifests: Sequence[ImageManifest],
        on_progress: ProgressHandler | None = None,
        *,
        skip_layers: Iterable[str] = (),
    ) -> CacheBuildResult:
        skip = set(skip_layers)
        layers = [layer for m in manifests for layer in m.layers if layer.digest not in skip]
        total = sum(layer.size for layer in layers)
        done = 0
        if on_progress is not None:
            await on_progress(0, total)
        for layer in layers:
            await self.clock.sleep(layer.size / (10 * MB))
            done += layer.size
            self.pulled.append(layer.digest)
            if on_progress is not None:
                await on_progress(done, total)
        return CacheBuildResult(seconds=total / (10 * MB), bytes_downloaded=done, total_bytes=total)


def obj(name: str, images: list[str], *, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"images": images, **spec},
        "status": status or {},
    }


class World:
    def __init__(
        self, store: FakeStore | None = None, options: CacheOptions | None = None, api: FakeApi | None = None
    ) -> None:
        self.clock = FakeClock()
        self.store = store or FakeStore()
        self.api = api or FakeApi()
        self.builder = FakeBuilder(self.clock)
        self.manifests = FakeManifests()
        self.controller = ImageCacheController(
            api=self.api,
            store=self.store,
            manifests=self.manifests,
            builder=self.builder,
            clock=self.clock,
            rng=random.Random(1),
            options=options or CacheOptions(snapshot_seconds=5),
        )
        self.manager = CacheManager(self.controller, FakeManifests(), self.clock)

    async def add(self, body: dict[str, Any]) -> None:
        """kubectl apply: the object is on the server, then the watch delivers it."""
        self.api.objects[body["metadata"]["name"]] = body
        await self.controller.upsert(body)

    async def deliver_created(self) -> None:
        """The watch delivers objects the controller created."""
        for body in list(self.api.created):
            await self.controller.upsert(self.api.objects.get(body["metadata"]["name"], body))
        self.api.created.clear()

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.api.objects[name]["status"]
        return status


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    await w.controller.resync([])
    yield w
    for task in list(w.controller._builds.values()):
        task.cancel()
    await asyncio.gather(*w.controller._builds.values(), return_exceptions=True)


def pod(name: str, images: Sequence[str], annotations: dict[str, str] | None = None) -> PodFacts:
    return PodFacts(
        uid=f"uid-{name}",
        namespace="default",
        name=name,
        node_name="vk",
        created=None,
        restart_policy="Always",
        grace_seconds=30,
        containers=tuple(ContainerSpec(f"c{i}", image, "IfNotPresent") for i, image in enumerate(images)),
        annotations=tuple(sorted((annotations or {}).items())),
    )


# ------------------------------------------------------------------ builds


async def test_a_new_cache_is_built_to_ready_with_progress_and_events(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9", "busybox"], retentionDays=2))
    await world.clock.advance(100)
    status = world.status("web")
    assert cb.is_imc_id(status["imageCacheId"])
    assert status["phase"] == "Ready"
    assert status["progress"] == "100%"
    phases = [s["phase"] for n, s in world.api.statuses if n == "web"]
    assert phases.index("Preparing") < phases.index("Creating") < phases.index("Ready")
    progresses = {s["progress"] for _, s in world.api.statuses}
    assert any(0 < cb.parse_progress(p) < 100 for p in progresses), progresses
    messages = [e["message"] for e in status["events"]]
    assert f"Successfully pulled image {NGINX} in 4.0s" in messages
    assert f"Successfully pulled image {BUSYBOX} in 0.2s" in messages
    assert messages[-1] == f"Successfully created image cache {status['imageCacheId']}"
    row = world.store.rows["web"]
    assert row.phase is CachePhase.READY
    assert row.imc_id == status["imageCacheId"]
    assert [i.reference for i in row.images] == [NGINX, BUSYBOX]
    assert row.expires_at == row.created_at + timedelta(days=2)
    assert world.controller.caches["web"] == row


async def test_an_image_listed_twice_is_held_and_counted_once(world: World) -> None:
    await world.add(obj("dup", ["nginx:1.7.9", "docker.io/library/nginx:1.7.9", "nginx:1.7.9", "busybox"]))
    await world.clock.advance(100)
    status = world.status("dup")
    assert status["phase"] == "Ready"
    row = world.store.rows["dup"]
    assert [i.reference for i in row.images] == [NGINX, BUSYBOX]
    assert row.image_bytes == CATALOG[NGINX].size + CATALOG[BUSYBOX].size
    pulled = [e["message"] for e in status["events"] if e["message"].startswith("Successfully pulled")]
    assert [m.split(" in ")[0] for m in pulled] == [
        f"Successfully pulled image {NGINX}",
        f"Successfully pulled image {BUSYBOX}",
    ]


async def test_too_big_or_unknown_images_fail_with_a_message_and_24_hours(world: World) -> None:
    await world.add(obj("big", ["huge:1"]))
    await world.add(obj("unknown", ["nowhere/nothing:1"]))
    await world.clock.advance(1)
    for name, words in (
        ("big", "imageCacheSize of 20 GiB"),
        ("unknown", "cannot be resolved: nowhere/nothing:1 is nowhere"),
    ):
        status = world.status(name)
        assert status["phase"] == "Failed"
        assert words in status["message"]
        assert world.store.rows[name].expires_at == world.clock.now() - timedelta(seconds=1) + timedelta(hours=24)
        assert status["events"][-1]["type"] == "Warning"


async def test_a_build_left_by_a_killed_agent_is_resumed_under_its_id() -> None:
    left = ImageCache(
        imc_id="imc-aaaaaaaaaaaaaaaaaaaa",
        name="web",
        phase=CachePhase.CREATING,
        size_gib=20,
        images=(CachedImage(NGINX, 40 * MB),),
        automatic=False,
        created_at=datetime(2026, 1, 1, tzinfo=FakeClock().now().tzinfo),
        progress=40,
    )
    w = World(FakeStore([left]))
    body = obj("web", ["nginx:1.7.9"], status={"imageCacheId": left.imc_id, "phase": "Creating", "progress": "40%"})
    w.api.objects["web"] = body
    await w.controller.resync([body])
    await w.clock.advance(100)
    assert w.status("web")["phase"] == "Ready"
    assert w.status("web")["imageCacheId"] == left.imc_id
    assert list(w.store.rows) == ["web"]
    created = [e for e in w.status("web")["events"] if e["message"].startswith("Successfully created")]
    assert len(created) == 1


async def test_image_changes_are_refused_while_building_and_applied_when_ready(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(1)
    assert world.status("web")["phase"] == "Creating"
    await world.add(obj("web", ["nginx:1.7.9", "busybox"], status=world.status("web")))
    await world.clock.advance(100)
    assert world.status("web")["phase"] == "Ready"
    assert world.status("web")["message"].startswith(cb.REFUSAL_PREFIX)
    assert [i.reference for i in world.store.rows["web"].images] == [NGINX]
    # The same refused spec delivered again (e.g. our own status write) stays refused.
    await world.add(obj("web", ["nginx:1.7.9", "busybox"], status=world.status("web")))
    await world.clock.advance(100)
    assert [i.reference for i in world.store.rows["web"].images] == [NGINX]
    # A new change, in Ready, is applied.
    await world.add(obj("web", ["busybox", "nginx:1.7.9"], status=world.status("web")))
    await world.clock.advance(100)
    phases = [s["phase"] for _, s in world.api.statuses]
    assert "Updating" in phases
    assert world.status("web")["phase"] == "Ready"
    assert "message" not in world.status("web")
    assert [i.reference for i in world.store.rows["web"].images] == [BUSYBOX, NGINX]


async def test_a_failed_update_keeps_the_old_images(world: World) -> None:
    await world.add(obj("web", ["busybox"]))
    await world.clock.advance(100)
    resolve = world.manifests.resolve

    async def resolve_slowly(image: str, **kwargs: Any) -> ImageManifest | InvalidReference | ImagePullError:
        await world.clock.sleep(5)  # a registry takes its time
        return await resolve(image, **kwargs)

    world.manifests.resolve = resolve_slowly  # type: ignore[method-assign]
    await world.add(obj("web", ["huge:1"], status=world.status("web")))
    await world.clock.settle()
    assert world.status("web")["phase"] == "Updating"
    # The watch brings the object back with the agent's own Updating status: the spec asks for
    # exactly what is being built, which is no refused change.
    await world.controller.upsert(world.api.objects["web"])
    await world.clock.advance(100)
    assert world.status("web")["phase"] == "UpdateFailed"
    assert "imageCacheSize of 20 GiB" in world.status("web")["message"]  # the update's own reason
    assert [i.reference for i in world.store.rows["web"].images] == [BUSYBOX]


async def test_deleting_the_object_cancels_the_build_and_deletes_the_row(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(1)
    await world.controller.delete(world.api.objects["web"])
    assert "web" not in world.store.rows
    assert "web" not in world.controller.caches
    assert not world.controller.building("web")


async def test_a_relist_forgets_caches_whose_object_is_gone(world: World) -> None:
    await world.add(obj("web", ["busybox"]))
    await world.clock.advance(100)
    await world.controller.resync([])
    assert world.store.rows == {}


async def test_the_sweep_deletes_expired_caches_object_and_row(world: World) -> None:
    await world.add(obj("short", ["busybox"], retentionDays=1))
    await world.add(obj("forever", ["busybox"]))
    await world.clock.advance(100)
    runner = asyncio.create_task(world.controller.run())
    await world.clock.advance(timedelta(days=1).total_seconds() + 60)
    assert world.api.deleted == ["short"]
    assert set(world.store.rows) == {"forever"}
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_manual_quota_is_quota_full_or_evicts_with_lru() -> None:
    w = World(options=CacheOptions(manual_quota=1, snapshot_seconds=0))
    await w.controller.resync([])
    await w.add(obj("first", ["busybox"]))
    await w.add(obj("second", ["busybox"]))
    await w.clock.advance(100)
    assert w.status("second")["phase"] == "Failed"
    assert w.status("second")["message"].startswith("QuotaFull")

    lru = World(options=CacheOptions(manual_quota=1, lru_for_manual=True, snapshot_seconds=0))
    await lru.controller.resync([])
    await lru.add(obj("first", ["busybox"]))
    await lru.clock.advance(100)
    await lru.add(obj("second", ["busybox"]))
    await lru.clock.advance(100)
    assert lru.api.deleted == ["first"]
    assert set(lru.store.rows) == {"second"}
    assert lru.status("second")["phase"] == "Ready"


class ManyStepsBuilder(FakeBuilder):
    """Reports progress a hundred times, 50 ms apart: a build at a high time scale."""

    async def pull_for_cache(
        self,
        manifests: Sequence[ImageManifest],
        on_progress: ProgressHandler | None = None,
        *,
        skip_layers: Iterable[str] = (),
    ) -> CacheBuildResult:
        total = sum(m.size for m in manifests)
        for step in range(1, 101):
            await self.clock.sleep(0.05)
            if on_progress is not None:
                await on_progress(total * step // 100, total)
        return CacheBuildResult(seconds=5.0, bytes_downloaded=total, total_bytes=total)


async def test_a_builds_progress_is_written_at_most_once_a_second(world: World) -> None:
    world.controller.builder = ManyStepsBuilder(world.clock)
    await world.add(obj("quick", ["nginx:1.7.9"]))
    await world.clock.advance(60)
    progress = [status["progress"] for name, status in world.api.statuses if name == "quick"]
    assert world.status("quick")["phase"] == "Ready"
    assert len(set(progress)) <= 5 + 3, progress  # 5 s of pulling; 0 %, the snapshot's share, 100 %
    assert progress[-1] == "100%"
    rows = [row for row in world.store.progress_writes if row[0] == "quick"]  # the registry's too
    assert len(rows) <= 5 + 3, rows


async def test_a_ready_object_from_another_registry_is_adopted_without_a_build(world: World) -> None:
    status = {"imageCacheId": "imc-bbbbbbbbbbbbbbbbbbbb", "phase": "Ready", "progress": "100%"}
    await world.add(obj("old", ["busybox"], status=status))
    await world.clock.advance(100)
    assert world.store.rows["old"].phase is CachePhase.READY
    assert world.store.rows["old"].imc_id == "imc-bbbbbbbbbbbbbbbbbbbb"
    assert world.builder.pulled == []


async def test_an_object_adopted_with_other_images_than_its_spec_asks_is_updated(world: World) -> None:
    # Built with nginx by another leader, then spec.images edited while no agent ran.
    status = {
        "imageCacheId": "imc-bbbbbbbbbbbbbbbbbbbb",
        "phase": "Ready",
        "progress": "100%",
        "images": [NGINX],
    }
    await world.add(obj("edited", ["busybox"], status=status))
    await world.clock.advance(100)
    assert "Updating" in [status["phase"] for name, status in world.api.statuses if name == "edited"]
    row = world.store.rows["edited"]
    assert (row.imc_id, row.phase) == ("imc-bbbbbbbbbbbbbbbbbbbb", CachePhase.READY)
    assert [image.reference for image in row.images] == [BUSYBOX]
    assert world.builder.pulled  # built, not taken as built
    assert world.status("edited")["images"] == [BUSYBOX]


@pytest.mark.parametrize("phase", ["Creating", "Updating"])
async def test_a_build_another_leader_left_is_resumed_with_its_images_and_an_edit_made_meanwhile_refused(
    world: World, phase: str
) -> None:
    # Another leader was building nginx when it stopped; then spec.images was edited.
    status = {"imageCacheId": "imc-cccccccccccccccccccc", "phase": phase, "progress": "40%", "images": [NGINX]}
    await world.add(obj("left", ["nginx:1.7.9", "busybox"], status=status))
    await world.clock.advance(100)
    row = world.store.rows["left"]
    assert (row.imc_id, row.phase) == ("imc-cccccccccccccccccccc", CachePhase.READY)
    assert [image.reference for image in row.images] == [NGINX]  # the build it was making
    assert world.status("left")["message"].startswith(cb.REFUSAL_PREFIX)
    verb = "update" if phase == "Updating" else "create"
    messages = [event["message"] for event in world.status("left")["events"]]
    assert f"Start to {verb} image cache imc-cccccccccccccccccccc" in messages


async def test_the_status_lists_the_images_a_cache_holds_and_from_its_start_those_an_update_makes(
    world: World,
) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(100)
    assert world.status("web")["images"] == [NGINX]
    written = len(world.api.statuses)
    await world.add(obj("web", ["busybox"], status=world.status("web")))
    await world.clock.advance(0)  # the update's first step
    first = world.api.statuses[written][1]
    assert (first["phase"], first["images"]) == ("Updating", [BUSYBOX])
    await world.clock.advance(100)
    assert (world.status("web")["phase"], world.status("web")["images"]) == ("Ready", [BUSYBOX])


async def test_a_failed_update_lists_the_images_the_cache_still_holds(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(100)
    await world.add(obj("web", ["nowhere.example/missing:1"], status=world.status("web")))
    await world.clock.advance(100)
    assert (world.status("web")["phase"], world.status("web")["images"]) == ("UpdateFailed", [NGINX])


class PruningApi(FakeApi):
    """An API server whose ImageCache CRD predates ``status.images``: it drops them."""

    async def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return await super().patch_status(name, {k: v for k, v in status.items() if k != "images"})


async def test_a_crd_that_drops_the_status_images_is_noticed_and_not_written_to_for_ever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World(api=PruningApi())
    await world.controller.resync([])
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(100)
    assert world.status("web")["phase"] == "Ready"
    assert not world.controller.status_images
    assert "drops status.images" in caplog.text
    written = len(world.api.statuses)
    for _ in range(3):  # the watch brings the object back, as written
        await world.controller.upsert(world.api.objects["web"])
    assert len(world.api.statuses) == written


# ------------------------------------------------------------------ the Pod side


async def test_a_miss_creates_one_automatic_cache_shared_by_a_burst(world: World) -> None:
    auto = {AUTO_IMAGE_CACHE_SEED: "true"}
    decisions = await asyncio.gather(*(world.manager.resolve(pod(f"p{i}", ["nginx:1.7.9"], auto)) for i in range(50)))
    assert len(world.api.created) == 1
    body = world.api.created[0]
    assert body["spec"] == {"images": [NGINX], "imageCacheSize": 30}
    assert body["metadata"]["name"] == "auto-create-for-" + decisions[0].annotations["k8s.aliyun.com/eci-instance-id"]
    imc_id = body["metadata"]["annotations"][cb.ID_ANNOTATION]
    assert {d.outcome for d in decisions} == {"miss"}
    for decision in decisions:
        assert [e.reason for e in decision.events] == ["ImageCacheMissed", "ImageCacheAutoCreated"]
        assert imc_id in decision.events[1].message
        assert decision.events[0].component == "EciService"
        assert decision.present_images == frozenset()
        assert decision.failure is None
    assert world.store.rows[body["metadata"]["name"]].automatic
    # The watch delivers the object: the build starts under the reserved id.
    await world.deliver_created()
    await world.clock.advance(100)
    assert world.status(body["metadata"]["name"])["imageCacheId"] == imc_id
    assert world.status(body["metadata"]["name"])["phase"] == "Ready"

    hit = await world.manager.resolve(pod("later", ["nginx:1.7.9", "busybox"], auto))
    assert hit.outcome == "partial"
    assert hit.imc_id == imc_id
    assert hit.present_images == frozenset({NGINX})
    assert hit.annotations[MATCHED_IMAGE_CACHE] == imc_id
    assert [e.reason for e in hit.events] == ["SuccessfulHitImageCache"]
    now = world.clock.now()
    assert world.store.matched == []  # written in the background, not on the Pod's path
    name = body["metadata"]["name"]
    written = len(world.api.statuses)
    assert await world.manager.flush_hits()
    assert world.store.matched == [(imc_id, now, now + timedelta(days=30), 1)]
    assert world.controller.by_id(imc_id).last_matched_at == now  # type: ignore[union-attr]
    # The object says so too (it showed the unused automatic cache's expiry until then).
    assert world.status(name)["expireDateTime"] == rfc3339(now + timedelta(days=30))
    assert [n for n, _ in world.api.statuses[written:]] == [name]
    # More hits within a minute move the expiry by less: the registry follows, the object is not rewritten.
    await world.clock.advance(30)
    await world.manager.resolve(pod("again", ["nginx:1.7.9", "busybox"], auto))
    assert await world.manager.flush_hits()
    assert world.store.matched[-1][2] == world.clock.now() + timedelta(days=30)
    assert len(world.api.statuses) == written + 1
    await world.clock.advance(60)
    await world.manager.resolve(pod("later-still", ["nginx:1.7.9", "busybox"], auto))
    assert await world.manager.flush_hits()
    assert world.status(name)["expireDateTime"] == rfc3339(world.clock.now() + timedelta(days=30))
    # An expiry on the object that is not a time (edited by hand, and not yet corrected because that
    # status write failed) is written over, not a crash of the hit writer.
    world.controller._statuses[name] = {**world.status(name), "expireDateTime": "soon"}
    await world.manager.resolve(pod("after-edit", ["nginx:1.7.9", "busybox"], auto))
    assert await world.manager.flush_hits()
    assert world.status(name)["expireDateTime"] == rfc3339(world.clock.now() + timedelta(days=30))


async def test_a_pod_taken_again_after_a_restart_keeps_its_decision(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(30)
    ready_id = world.status("web")["imageCacheId"]
    auto = {AUTO_IMAGE_CACHE_SEED: "true"}
    first = await world.manager.resolve(pod("a", ["nginx:1.7.9"], auto))
    assert first.outcome == "auto_hit"
    assert await world.manager.flush_hits()
    assert len(world.store.matched) == 1
    # The next agent run takes the Pod, with what the first wrote with its status.
    again = await world.manager.resolve(pod("a", ["nginx:1.7.9"], {**auto, **first.annotations}))
    assert again.outcome == "auto_hit"
    assert again.imc_id == ready_id
    assert again.present_images == frozenset({NGINX})
    assert again.events == ()
    assert dict(again.annotations) == {}
    assert "after an agent restart" in again.explanation
    await world.manager.flush_hits()
    assert len(world.store.matched) == 1  # the hit is not counted twice
    # A miss taken again creates no second automatic cache.
    missed = await world.manager.resolve(pod("b", ["busybox"], auto))
    assert len(world.api.created) == 1
    world.api.created.clear()
    again = await world.manager.resolve(pod("b", ["busybox"], {**auto, **missed.annotations}))
    assert again.outcome == "miss"
    assert again.events == ()
    assert world.api.created == []


async def test_explicit_ids_hit_or_fail(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.add(obj("slow", ["huge:1"], imageCacheSize=30))
    await world.clock.advance(1)
    slow_id = world.status("slow")["imageCacheId"]
    assert world.status("slow")["phase"] == "Creating"
    await world.clock.advance(30)
    ready_id = world.status("web")["imageCacheId"]

    hit = await world.manager.resolve(pod("a", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
    assert hit.outcome == "explicit_hit"
    assert hit.present_images == frozenset({NGINX})
    assert await world.manager.flush_hits()
    assert world.store.matched[-1][2] == "unchanged"  # a manual cache keeps its expiry

    missing = await world.manager.resolve(pod("b", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: "imc-nothere"}))
    assert missing.outcome == "failed"
    assert missing.failure == ("ImageCacheNotFound", "The specified image cache imc-nothere does not exist.")
    assert missing.imc_id == "imc-nothere"

    creating = await world.manager.resolve(pod("c", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: slow_id}))
    assert creating.failure == (
        "ImageCacheNotComplete",
        f"The production for specified image cache {slow_id} is not yet complete.",
    )
    assert [e.type for e in creating.events] == ["Normal"]

    # A cache that failed will never complete: the Pod's status says why (the Event keeps ECI's words).
    await world.add(obj("big", ["huge:1"]))  # 25 GiB uncompressed in the default 20 GiB
    await world.clock.advance(1)
    assert world.status("big")["phase"] == "Failed"
    big_id = world.status("big")["imageCacheId"]
    failed = await world.manager.resolve(pod("d", ["huge:1"], {IMAGE_SNAPSHOT_ID_SEED: big_id}))
    reason, message = failed.failure or ("", "")
    assert reason == "ImageCacheNotComplete"
    assert message.startswith(f"The production for specified image cache {big_id} is not yet complete. It failed (")
    assert world.status("big")["message"] in message
    assert message.endswith(") and will not complete.")
    assert [e.message for e in failed.events] == [
        f"The production for specified image cache {big_id} is not yet complete."
    ]


async def test_no_annotation_means_no_cache(world: World) -> None:
    decision = await world.manager.resolve(pod("plain", ["nginx:1.7.9"]))
    assert decision.outcome == "none"
    assert decision.events == ()
    assert world.api.created == []


async def test_automatic_caches_at_quota_evict_the_least_recently_used() -> None:
    w = World(options=CacheOptions(automatic_quota=1, snapshot_seconds=0))
    await w.controller.resync([])
    auto = {AUTO_IMAGE_CACHE_SEED: "true"}
    await w.manager.resolve(pod("a", ["nginx:1.7.9"], auto))
    await w.deliver_created()
    await w.clock.advance(10)
    first = next(iter(w.store.rows))
    await w.manager.resolve(pod("b", ["busybox"], auto))
    assert w.api.deleted == [first]
    assert len(w.store.rows) == 1
    assert first not in w.store.rows


async def test_a_failed_automatic_cache_is_not_made_again_for_the_same_images(world: World) -> None:
    auto = {AUTO_IMAGE_CACHE_SEED: "true"}
    first = await world.manager.resolve(pod("a", ["nowhere/nothing:1"], auto))
    assert [e.reason for e in first.events] == ["ImageCacheMissed", "ImageCacheAutoCreated"]
    await world.deliver_created()
    await world.clock.advance(1)
    (failed,) = world.controller.caches.values()
    assert failed.phase is CachePhase.FAILED
    # The rest of the Deployment: no cache per Pod, each failing the same way.
    for name in ("b", "c"):
        decision = await world.manager.resolve(pod(name, ["nowhere/nothing:1"], auto))
        assert decision.outcome == "miss"
        assert [e.reason for e in decision.events] == ["ImageCacheMissed"]
        assert failed.imc_id in decision.explanation
        assert "cannot be resolved" in decision.explanation  # the build's own reason
    assert world.api.created == []
    assert list(world.controller.caches) == [failed.name]
    # Deleted (or expired), it no longer stands in the way.
    await world.controller.remove(failed.name)
    again = await world.manager.resolve(pod("d", ["nowhere/nothing:1"], auto))
    assert [e.reason for e in again.events] == ["ImageCacheMissed", "ImageCacheAutoCreated"]


async def test_an_automatic_cache_that_cannot_be_created_is_forgotten(world: World) -> None:
    auto = {AUTO_IMAGE_CACHE_SEED: "true"}

    async def refuse(body: dict[str, Any]) -> dict[str, Any]:
        raise FakeError(403)

    world.api.create = refuse  # type: ignore[method-assign]
    decision = await world.manager.resolve(pod("a", ["nginx:1.7.9"], auto))
    assert world.store.rows == {}
    assert world.controller.caches == {}
    # The Pod is not told of a cache that was never made; its record says why.
    assert decision.outcome == "miss"
    assert [e.reason for e in decision.events] == ["ImageCacheMissed"]
    assert "not created: creating its object failed: 403" in decision.explanation


async def test_builds_resolve_images_with_the_caches_pull_secrets(world: World) -> None:
    await world.add(obj("private", ["busybox"], imagePullSecrets=["team-a:reg", "team-a:reg2", "team-b:other"]))
    await world.add(obj("public", ["nginx:1.7.9"]))
    await world.clock.advance(100)
    assert ("busybox", "team-a", ("reg", "reg2")) in world.manifests.asked
    assert ("nginx:1.7.9", "", ()) in world.manifests.asked
    assert world.status("private")["phase"] == "Ready"


async def test_hits_are_coalesced_and_a_failed_write_is_kept(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(30)
    ready_id = world.status("web")["imageCacheId"]
    for i in range(5):
        await world.manager.resolve(pod(f"p{i}", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
    first = world.clock.now()
    world.store.fail_matches = 1
    assert not await world.manager.flush_hits()
    assert world.store.matched == []
    await world.clock.advance(5)
    await world.manager.resolve(pod("p5", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
    assert await world.manager.flush_hits()
    # One write for six hits, with the time of the last; nothing lost to the failure.
    assert world.store.matched == [(ready_id, world.clock.now(), "unchanged", 6)]
    assert world.clock.now() > first


def annotated(body: dict[str, Any], **annotations: str) -> dict[str, Any]:
    body["metadata"]["annotations"] = {f"k8s.aliyun.com/{key.replace('_', '-')}": v for key, v in annotations.items()}
    return body


async def test_reuse_skips_layers_other_ready_caches_hold(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(30)
    assert world.status("web")["phase"] == "Ready"
    world.builder.pulled.clear()
    await world.add(annotated(obj("reusing", ["nginx:1.7.9", "busybox"]), imc_enable_reuse="true"))
    await world.add(obj("plain", ["nginx:1.7.9", "busybox"]))
    await world.clock.advance(60)
    assert world.status("reusing")["phase"] == "Ready"
    assert world.status("plain")["phase"] == "Ready"
    # nginx's layers come from "web" for the reusing cache; the plain one pulls everything.
    assert sorted(world.builder.pulled) == ["app", "base", "bb", "bb"]


async def test_flash_cache_is_usable_before_its_snapshot(world: World) -> None:
    await world.add(annotated(obj("flash", ["busybox"]), imc_enable_flash="true"))
    await world.add(obj("slow", ["busybox"]))
    await world.clock.advance(2)  # busybox pulls in 0.2 s; the snapshot step takes 5 s
    assert world.status("flash")["phase"] == "Ready"
    assert world.status("slow")["phase"] == "Creating"
    await world.clock.advance(5)
    assert world.status("slow")["phase"] == "Ready"
    flash_id = world.status("flash")["imageCacheId"]
    hit = await world.manager.resolve(pod("p", ["busybox"], {IMAGE_SNAPSHOT_ID_SEED: flash_id}))
    assert hit.outcome == "explicit_hit"


async def test_size_and_retention_changes_reach_the_row_and_the_status(world: World) -> None:
    await world.add(obj("web", ["busybox"], retentionDays=2))
    await world.clock.advance(30)
    created = world.store.rows["web"].created_at
    assert world.status("web")["phase"] == "Ready"
    await world.add(obj("web", ["busybox"], retentionDays=10, imageCacheSize=40))
    row = world.store.rows["web"]
    assert (row.size_gib, row.expires_at) == (40, created + timedelta(days=10))
    assert world.status("web")["expireDateTime"].startswith((created + timedelta(days=10)).strftime("%Y-%m-%dT"))
    await world.add(obj("web", ["busybox"], imageCacheSize=40))  # retention removed: never expires
    assert world.store.rows["web"].expires_at is None
    assert world.status("web").get("expireDateTime") is None
    assert world.store.rows["web"].phase is CachePhase.READY  # no rebuild for either change


async def test_the_hit_writer_lets_a_burst_gather_into_one_write(world: World) -> None:
    await world.add(obj("web", ["nginx:1.7.9"]))
    await world.clock.advance(30)
    ready_id = world.status("web")["imageCacheId"]
    writer = asyncio.create_task(world.manager.run())
    try:
        await world.manager.resolve(pod("p0", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
        await world.clock.advance(world.manager.linger_seconds / 2)  # the writer is waiting for more
        assert world.store.matched == []
        await world.manager.resolve(pod("p1", ["nginx:1.7.9"], {IMAGE_SNAPSHOT_ID_SEED: ready_id}))
        last = world.clock.now()
        await world.clock.advance(world.manager.linger_seconds)
        assert world.store.matched == [(ready_id, last, "unchanged", 2)]
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
