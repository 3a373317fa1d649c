"""The registry against a real SQLite file: migrations, repository round trips, views, concurrency.

Needs the ``sqlite3`` command line tool (``apt-get install sqlite3``) for the view tests: users
query the file with it while the agent writes, so that is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, inspect, text

from vk_provider.domain.model import CachedImage, CachePhase, ImageCache, ImageManifest, Layer
from vk_provider.domain.records import CacheOutcome, ImagePullRecord, PodStartRecord
from vk_provider.registry import UNSET, CacheConflictError, Registry, migrate, open_registry
from vk_provider.registry.engine import WRITE_OPTION
from vk_provider.registry.migrate import current, downgrade, head_revision, upgrade, upgrade_sync
from vk_provider.registry.schema import VIEW_NAMES, Base

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "layers",
    "images",
    "image_layers",
    "caches",
    "cache_images",
    "cache_events",
    "pod_starts",
    "pod_start_images",
}
NGINX = CachedImage("docker.io/library/nginx:1.7.9", size=39_000_000, digest="sha256:n")
REDIS = CachedImage("docker.io/library/redis:7", size=45_000_000, digest="sha256:r")
BUSYBOX = CachedImage("docker.io/library/busybox:1.36", size=2_000_000, digest="sha256:b")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def cache(name: str, n: int = 0, **changes: Any) -> ImageCache:
    base = ImageCache(
        imc_id=f"imc-{name}",
        name=name,
        phase=CachePhase.READY,
        size_gib=20,
        images=(NGINX, REDIS),
        automatic=False,
        created_at=at(n),
        progress=100,
    )
    return replace(base, **changes)


def layer(n: int) -> Layer:
    return Layer(digest=f"sha256:{n:064x}", size=1000 * n, uncompressed_size=2500 * n)


def pod_start(uid: str, **changes: Any) -> PodStartRecord:
    base = PodStartRecord(
        pod_uid=uid,
        namespace="default",
        name=f"pod-{uid}",
        node="virtual-kubelet",
        outcome=CacheOutcome.AUTO_HIT,
        imc_id="imc-a",
        reason="matched 2/2 images",
        images=(
            ImagePullRecord(NGINX.reference, bytes_pulled=0, pull_seconds=0.0, from_cache=True),
            ImagePullRecord(BUSYBOX.reference, bytes_pulled=2_000_000, pull_seconds=1.5),
        ),
        resolve_seconds=0.05,
        snapshot_attach_seconds=2.0,
        container_start_seconds=0.3,
        startup_seconds=4.0,
        created_at=at(0),
        started_at=at(1),
        labels=(("app", "web"), ("tier", "front")),
    )
    return replace(base, **changes)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
async def registry(db_path: Path) -> AsyncIterator[Registry]:
    opened = await open_registry(str(db_path))
    await upgrade(opened.engine)
    try:
        yield opened
    finally:
        await opened.close()


async def sql(registry: Registry, query: str) -> list[tuple[Any, ...]]:
    async with registry.engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(text(query))]


async def sqlite3_json(db_path: Path, query: str) -> list[dict[str, Any]]:
    """Run ``query`` with the real sqlite3 CLI, as a user would."""
    assert shutil.which("sqlite3"), "the sqlite3 command line tool is needed: apt-get install sqlite3"
    process = await asyncio.create_subprocess_exec(
        "sqlite3", "-json", str(db_path), query, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    return json.loads(out) if out.strip() else []


# ---- engine and migrations -------------------------------------------------------------------


async def test_every_connection_is_tuned_for_sharing(registry: Registry) -> None:
    async with registry.engine.connect() as connection:
        values = {
            pragma: (await connection.exec_driver_sql(f"PRAGMA {pragma}")).scalar_one()
            for pragma in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
        }
    assert values == {"journal_mode": "wal", "busy_timeout": 5000, "foreign_keys": 1, "synchronous": 1}


async def assert_migrations_round_trip(registry: Registry) -> None:
    """upgrade head -> downgrade base -> upgrade head on a populated database (any backend)."""
    await registry.upsert_cache(cache("a"), now=T0)
    await registry.save_manifest(ImageManifest(NGINX.reference, "sha256:n", (layer(1),)))
    await registry.record_pod_start(pod_start("u1"))
    assert await current(registry.engine) == head_revision() == "0001"

    await downgrade(registry.engine, "base")
    async with registry.engine.connect() as connection:
        names = await connection.run_sync(lambda c: (set(inspect(c).get_table_names()), inspect(c).get_view_names()))
    assert names == ({"alembic_version"}, [])
    assert await current(registry.engine) is None

    await upgrade(registry.engine)
    assert await current(registry.engine) == "0001"
    async with registry.engine.connect() as connection:
        tables, views = await connection.run_sync(
            lambda c: (set(inspect(c).get_table_names()), set(inspect(c).get_view_names()))
        )
    assert tables == TABLES | {"alembic_version"}
    assert views == VIEW_NAMES
    await registry.upsert_cache(cache("b"), now=T0)
    assert [c.name for c in await registry.list_caches()] == ["b"]


async def test_migrations_round_trip_on_a_populated_database(registry: Registry, db_path: Path) -> None:
    await assert_migrations_round_trip(registry)
    # The pooled connections still enforce foreign keys after the migration turned them off.
    assert (await sql(registry, "PRAGMA foreign_keys")) == [(1,)]


def test_the_known_head_is_alembics_head() -> None:
    assert head_revision() == migrate.HEAD


def test_a_database_at_the_newest_schema_is_not_handed_to_alembic(db_path: Path) -> None:
    """The agent upgrades on every start; when nothing is due, Alembic is not even imported."""
    script = (
        "import asyncio, sys\n"
        "from vk_provider.registry import migrate\n"
        "asyncio.run(migrate.upgrade(sys.argv[1]))\n"
        "print('alembic' in sys.modules)\n"
    )

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", script, str(db_path)], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert run() == "True"  # a new database: Alembic creates the schema
    assert run() == "False"  # at the head already: a plain SELECT said so
    assert asyncio.run(current(str(db_path))) == migrate.HEAD


async def test_models_and_migrations_agree(registry: Registry) -> None:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "include_object": lambda o, name, type_, r, c: name not in VIEW_NAMES},
        )
        return list(compare_metadata(context, Base.metadata))

    async with registry.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_upgrade_from_a_path_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "registry.db"
    await upgrade(str(path))
    assert await current(str(path)) == "0001"


def test_sync_wrapper_for_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    upgrade_sync(str(path))
    assert (
        subprocess.run(
            ["sqlite3", str(path), "SELECT version_num FROM alembic_version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == "0001"
    )


@pytest.mark.parametrize("how", ["x-argument", "environment"])
def test_alembic_command_line(tmp_path: Path, how: str) -> None:
    path = tmp_path / "alembic.db"
    env = {k: v for k, v in os.environ.items() if k != "VK_PROVIDER_DB"}
    args = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini")]
    if how == "x-argument":
        args += ["-x", f"db={path}"]
    else:
        env["VK_PROVIDER_DB"] = str(path)

    def alembic(*command: str) -> str:
        done = subprocess.run([*args, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    alembic("upgrade", "head")
    assert alembic("current").split()[0] == "0001"
    alembic("downgrade", "base")
    assert alembic("current").strip() == ""


# ---- caches ----------------------------------------------------------------------------------


async def test_cache_round_trip(registry: Registry) -> None:
    stored = cache(
        "a",
        labels=(("team", "x"), ("env", "prod")),
        expires_at=at(60 * 24),
        last_matched_at=at(5),
        message="ok",
        automatic=True,
        phase=CachePhase.CREATING,
        progress=40,
    )
    assert await registry.upsert_cache(stored, now=T0) == stored
    assert await registry.get_cache_by_name("a") == stored
    assert await registry.get_cache_by_id("imc-a") == stored
    assert await registry.get_cache_by_name("missing") is None
    assert await registry.get_cache_by_id("imc-missing") is None
    read = await registry.get_cache_by_id("imc-a")
    assert read is not None
    assert read.created_at.tzinfo is UTC


async def test_upsert_updates_by_name_and_keeps_usage(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    assert await registry.mark_cache_matched("imc-a", at(10))
    updated = await registry.upsert_cache(cache("a", images=(BUSYBOX,), size_gib=40), now=at(11))
    assert updated.images == (BUSYBOX,)
    assert updated.size_gib == 40
    assert updated.last_matched_at == at(10)  # a resync from the CR must not forget the match
    assert await sql(registry, "SELECT hit_count, image_count FROM cache_overview") == [(1, 1)]


async def test_an_imc_id_belongs_to_one_cache(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    with pytest.raises(CacheConflictError, match="ImageCache ID"):
        await registry.upsert_cache(cache("b", imc_id="imc-a"), now=T0)
    assert [c.name for c in await registry.list_caches()] == ["a"]


async def test_list_caches_by_name(registry: Registry) -> None:
    await registry.upsert_caches([cache("b", 1), cache("a", 2, images=()), cache("c", 3)], now=T0)
    listed = await registry.list_caches()
    assert [(c.name, len(c.images)) for c in listed] == [("a", 0), ("b", 2), ("c", 2)]


async def test_match_candidates_are_ready_and_unexpired(registry: Registry) -> None:
    now = at(100)
    await registry.upsert_caches(
        [
            cache("ready-forever", 1),
            cache("ready-until-later", 2, expires_at=at(101)),
            cache("expired", 3, expires_at=at(100)),
            cache("creating", 4, phase=CachePhase.CREATING),
            cache("failed", 5, phase=CachePhase.FAILED),
            cache("updating", 6, phase=CachePhase.UPDATING),
            cache("ready-newest", 7, images=(BUSYBOX,)),
        ],
        now=T0,
    )
    candidates = await registry.list_match_candidates(now)
    assert [c.name for c in candidates] == ["ready-newest", "ready-until-later", "ready-forever"]
    assert candidates[0].images == (BUSYBOX,)
    assert candidates[1].images == (NGINX, REDIS)


async def test_ten_thousand_candidates_in_a_fixed_number_of_queries(registry: Registry) -> None:
    caches = [
        cache(
            f"c{i:05d}",
            i,
            phase=CachePhase.READY if i % 4 else CachePhase.CREATING,
            images=tuple(CachedImage(f"registry/app{i}-{j}:v1", size=i + j) for j in range(i % 3 + 1)),
        )
        for i in range(10_000)
    ]
    assert await registry.upsert_caches(caches, now=T0) == 10_000
    selects: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(registry.engine.sync_engine, "before_cursor_execute", count)
    try:
        candidates = await registry.list_match_candidates(at(0))
    finally:
        event.remove(registry.engine.sync_engine, "before_cursor_execute", count)
    assert len(selects) == 2  # the caches, then all their images: never one query per cache
    expected = sorted((c for c in caches if c.phase is CachePhase.READY), key=lambda c: c.created_at, reverse=True)
    assert candidates == tuple(expected)


async def test_set_cache_status(registry: Registry) -> None:
    await registry.upsert_cache(cache("a", phase=CachePhase.CREATING, progress=0, expires_at=at(99)), now=T0)
    changed = await registry.set_cache_status("a", now=at(1), progress=50, message="pulling")
    assert changed is not None
    assert (changed.phase, changed.progress, changed.message, changed.expires_at) == (
        CachePhase.CREATING,
        50,
        "pulling",
        at(99),
    )
    done = await registry.set_cache_status(
        "a", now=at(2), phase=CachePhase.READY, progress=100, expires_at=None, images=(BUSYBOX,)
    )
    assert done == replace(changed, phase=CachePhase.READY, progress=100, expires_at=None, images=(BUSYBOX,))
    assert await registry.get_cache_by_name("a") == done
    assert await registry.set_cache_status("missing", now=at(3), phase=CachePhase.FAILED) is None
    assert UNSET is not None  # the default that keeps expires_at, as exercised by the first call


async def test_cache_events_are_counted_and_capped(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    for i in range(55):
        await registry.append_cache_event("a", type="Normal", message=f"step {i}", now=at(i))
    events = await registry.append_cache_event("a", type="Normal", message="step 54", now=at(60))
    assert events is not None
    assert len(events) == 50
    assert (events[0].message, events[-1].message, events[-1].count) == ("step 5", "step 54", 2)
    assert (events[-1].first_timestamp, events[-1].last_timestamp) == (at(54), at(60))
    assert await registry.list_cache_events("a") == events
    assert await registry.append_cache_event("missing", type="Normal", message="x", now=T0) is None
    assert await registry.list_cache_events("missing") is None


async def test_mark_cache_matched(registry: Registry) -> None:
    await registry.upsert_cache(cache("a", automatic=True, expires_at=at(10)), now=T0)
    assert await registry.mark_cache_matched("imc-a", at(1))
    assert await registry.mark_cache_matched("imc-a", at(2), expires_at=at(2 + 30 * 24 * 60))
    stored = await registry.get_cache_by_id("imc-a")
    assert stored is not None
    assert (stored.last_matched_at, stored.expires_at) == (at(2), at(2 + 30 * 24 * 60))
    assert await sql(registry, "SELECT hit_count FROM caches") == [(2,)]
    assert not await registry.mark_cache_matched("imc-missing", at(3))


async def test_delete_cache_keeps_pod_history(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    await registry.append_cache_event("a", type="Normal", message="created", now=T0)
    await registry.record_pod_start(pod_start("u1", imc_id="imc-a"))
    assert await registry.delete_cache("a")
    assert not await registry.delete_cache("a")
    assert await registry.get_cache_by_name("a") is None
    counts = await sql(
        registry,
        "SELECT (SELECT count(*) FROM cache_images), (SELECT count(*) FROM cache_events), "
        "(SELECT count(*) FROM pod_starts WHERE imc_id = 'imc-a')",
    )
    assert counts == [(0, 0, 1)]


async def test_list_expired(registry: Registry) -> None:
    await registry.upsert_caches(
        [
            cache("late", expires_at=at(5)),
            cache("never"),
            cache("early", expires_at=at(1)),
            cache("later", expires_at=at(9)),
        ],
        now=T0,
    )
    assert [c.name for c in await registry.list_expired(at(5))] == ["early", "late"]


async def test_least_recently_used_and_counts(registry: Registry) -> None:
    await registry.upsert_caches(
        [
            cache("auto-old-unused", 1, automatic=True),
            cache("auto-used-late", 0, automatic=True, last_matched_at=at(50)),
            cache("auto-used-early", 2, automatic=True, last_matched_at=at(3)),
            cache("auto-new-unused", 10, automatic=True),
            cache("manual", 0),
        ],
        now=T0,
    )
    lru = await registry.list_least_recently_used(automatic=True)
    assert [c.name for c in lru] == ["auto-old-unused", "auto-used-early", "auto-new-unused", "auto-used-late"]
    first_two = await registry.list_least_recently_used(automatic=True, limit=2)
    assert first_two == lru[:2]
    assert first_two[0].images == (NGINX, REDIS)
    assert [c.name for c in await registry.list_least_recently_used(automatic=False)] == ["manual"]
    counts = [await registry.count_caches(automatic=flag) for flag in (True, False, None)]
    assert counts == [4, 1, 5]


async def test_concurrent_writers_do_not_lock_each_other_out(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    # Each append reads then writes: with deferred transactions, interleaved appends fail with
    # "database is locked" or lose updates; every occurrence must be counted.
    await asyncio.gather(
        *(registry.append_cache_event("a", type="Normal", message="same", now=at(i)) for i in range(20)),
        *(registry.mark_cache_matched("imc-a", at(i)) for i in range(20)),
        *(registry.record_pod_start(pod_start(f"u{i}")) for i in range(20)),
    )
    events = await registry.list_cache_events("a")
    assert events is not None
    assert [e.count for e in events] == [20]
    assert await sql(registry, "SELECT hit_count, pod_starts FROM cache_overview") == [(20, 20)]


# ---- image manifests -------------------------------------------------------------------------


async def test_manifest_round_trip_and_shared_layers_stored_once(registry: Registry) -> None:
    nginx = ImageManifest("docker.io/library/nginx:1.7.9", "sha256:n", (layer(1), layer(2), layer(3)))
    redis = ImageManifest("docker.io/library/redis:7", "sha256:r", (layer(1), layer(4)), source="registry")
    empty = ImageManifest("example.com/scratch:1", "sha256:s", (), source="synthetic")
    for manifest in (nginx, redis, empty):
        await registry.save_manifest(manifest, resolved_at=T0)
    assert await registry.get_manifest(nginx.reference) == nginx
    assert await registry.get_manifest(redis.reference) == redis
    assert await registry.get_manifest(empty.reference) == empty
    assert await registry.get_manifest("docker.io/library/missing:1") is None
    assert await registry.get_manifests([redis.reference, "nope", nginx.reference]) == {
        redis.reference: redis,
        nginx.reference: nginx,
    }
    assert await sql(registry, "SELECT count(*) FROM layers") == [(4,)]
    overview = await sql(registry, "SELECT reference, layer_count, shared_layers, size_bytes FROM image_overview")
    assert sorted(overview) == [
        (nginx.reference, 3, 1, nginx.size),
        (redis.reference, 2, 1, redis.size),
        (empty.reference, 0, 0, 0),
    ]


async def test_save_manifest_replaces_the_image(registry: Registry) -> None:
    old = ImageManifest("docker.io/library/nginx:latest", "sha256:old", (layer(1), layer(2)))
    new = ImageManifest("docker.io/library/nginx:latest", "sha256:new", (layer(3),), source="registry")
    await registry.save_manifest(old)
    await registry.save_manifest(new)
    assert await registry.get_manifest(new.reference) == new
    assert await sql(registry, "SELECT count(*) FROM images") == [(1,)]


async def test_save_manifest_without_replace_keeps_the_stored_one(registry: Registry) -> None:
    fetched = ImageManifest("docker.io/library/nginx:latest", "sha256:reg", (layer(1),), source="registry")
    catalog = ImageManifest("docker.io/library/nginx:latest", "sha256:cat", (layer(2), layer(3)))
    other = ImageManifest("docker.io/library/redis:7", "sha256:r", (layer(4),), source="synthetic")
    await registry.save_manifest(fetched)
    await registry.save_manifest(catalog, replace=False)
    await registry.save_manifest(other, replace=False)
    assert await registry.get_manifest(fetched.reference) == fetched
    assert await registry.get_manifest(other.reference) == other  # new: stored
    assert await sql(registry, "SELECT digest FROM layers ORDER BY digest") == [(layer(1).digest,), (layer(4).digest,)]


# ---- Pod starts ------------------------------------------------------------------------------


async def test_pod_start_is_recorded_once(registry: Registry) -> None:
    record = pod_start("u1")
    assert await registry.record_pod_start(record)
    assert not await registry.record_pod_start(replace(record, startup_seconds=99.0))
    assert await registry.list_pod_starts() == (record,)
    assert await sql(registry, "SELECT count(*), sum(bytes_pulled) FROM pod_starts") == [(1, 2_000_000)]


async def test_a_start_replaces_a_failed_record_of_the_same_pod(registry: Registry) -> None:
    failed = pod_start("u1", outcome=CacheOutcome.FAILED, images=(), startup_seconds=0.0)
    assert await registry.record_pod_starts([failed]) == [True]
    # An agent restarted before the Failed status was written: the Pod started after all.
    assert await registry.record_pod_starts([pod_start("u1"), pod_start("u2")]) == [True, True]
    assert [(r.pod_uid, r.outcome) for r in await registry.list_pod_starts()] == [
        ("u1", CacheOutcome.AUTO_HIT),
        ("u2", CacheOutcome.AUTO_HIT),
    ]
    assert await sql(registry, "SELECT count(*) FROM pod_start_images") == [(4,)]
    # ...but a failure never replaces a start, nor another failure.
    u3 = replace(failed, pod_uid="u3")
    assert await registry.record_pod_starts([replace(failed, pod_uid="u2"), u3]) == [False, True]
    assert await registry.record_pod_starts([u3]) == [False]
    assert await sql(registry, "SELECT cache_outcome, count(*) FROM pod_starts GROUP BY 1 ORDER BY 1") == [
        ("auto_hit", 2),
        ("failed", 1),
    ]


async def test_pod_starts_batch_in_one_transaction(registry: Registry) -> None:
    await registry.record_pod_start(pod_start("u0"))
    batch = [pod_start("u1"), pod_start("u0"), pod_start("u2"), pod_start("u1")]
    assert await registry.record_pod_starts(batch) == [True, False, True, False]
    assert await registry.record_pod_starts([]) == []
    assert [r.pod_uid for r in await registry.list_pod_starts()] == ["u0", "u1", "u2"]
    assert await sql(registry, "SELECT count(*) FROM pod_start_images") == [(6,)]
    # Which Pods have a record (an agent restarting checks the Pods it finds running), in chunks.
    failed = pod_start("u3", outcome=CacheOutcome.FAILED, imc_id=None)
    await registry.record_pod_start(failed)
    asked = [f"x{i}" for i in range(1200)] + ["u2", "u0", "u3", "u2"]
    assert await registry.recorded_pod_uids(asked) == {"u0", "u2", "u3"}
    assert await registry.recorded_pod_uids([]) == set()


async def test_forget_pod_starts_by_uid_and_label_takes_their_hits_off(registry: Registry) -> None:
    await registry.upsert_cache(cache("a"), now=T0)
    run = (("vk-provider.io/simulation", "burst"), ("vk-provider.io/simulation-seed", "7"))
    other = (("vk-provider.io/simulation", "burst"), ("vk-provider.io/simulation-seed", "8"))
    records = [
        pod_start("u1", labels=run),
        pod_start("u2", labels=run),
        pod_start("u3", labels=other),  # another seed: stays
        pod_start("u4", labels=(), outcome=CacheOutcome.MISS, imc_id=None),  # unlabelled, named by UID
        pod_start("u5", labels=()),  # stays
        pod_start("u6", labels=run, outcome=CacheOutcome.PARTIAL),  # a hit too: the cache was used
    ]
    await registry.record_pod_starts(records)
    await registry.mark_cache_matched("imc-a", at(1), count=4)  # fewer than its 5 hit records (say, reset)
    forgotten = await registry.forget_pod_starts(["u4", "u1", "nope"], labels=dict(run))
    assert forgotten == 4
    assert [r.pod_uid for r in await registry.list_pod_starts()] == ["u3", "u5"]
    assert await sql(registry, "SELECT count(*) FROM pod_start_images") == [(4,)]
    assert await sql(registry, "SELECT hit_count FROM caches WHERE name = 'a'") == [(1,)]
    assert await registry.forget_pod_starts(["u3", "u5"]) == 2
    assert await sql(registry, "SELECT hit_count FROM caches WHERE name = 'a'") == [(0,)]  # never below zero
    assert await registry.forget_pod_starts(["u3"], labels=dict(run)) == 0
    assert await sql(registry, "SELECT hit_count FROM caches WHERE name = 'a'") == [(0,)]


async def test_pod_starts_by_label_and_forget_unused_caches(registry: Registry) -> None:
    run = {"vk-provider.io/simulation": "burst", "vk-provider.io/simulation-seed": "7"}
    for name, labels in (("a", run), ("b", run), ("c", run), ("d", {})):
        await registry.upsert_cache(cache(name, automatic=True, labels=tuple(labels.items())), now=T0)
    await registry.record_pod_starts(
        [
            pod_start("u1", imc_id="imc-b", labels=tuple(run.items())),
            pod_start("u2", imc_id="imc-b", labels=(("app", "web"),)),  # an agent's: no run labels
            pod_start("u3", imc_id="imc-b", labels=tuple(run.items())),
        ]
    )
    keys = tuple(run)
    assert await registry.pod_starts_by_label("imc-b", keys) == {("burst", "7"): 2, (None, None): 1}
    assert await registry.pod_starts_by_label("imc-a", keys) == {}
    # a: the run's and unused, gone; b: used; c: kept by name; d: not the run's.
    assert await registry.forget_unused_caches(run, keep=["c"]) == ["a"]
    assert [c.name for c in await registry.list_caches()] == ["b", "c", "d"]


async def test_a_transaction_writes_all_or_nothing(registry: Registry) -> None:
    await registry.upsert_cache(cache("kept"), now=T0)
    seen: list[str] = []

    async def stopped_half_way() -> None:
        async with registry.transaction():
            await registry.record_pod_starts([pod_start("u1")])
            await registry.upsert_cache(cache("new"), now=T0)
            seen.extend(c.name for c in await registry.list_caches())  # it reads its own writes
            await registry.delete_cache("kept")
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        await stopped_half_way()
    assert seen == ["kept", "new"]
    assert [c.name for c in await registry.list_caches()] == ["kept"]
    assert await registry.list_pod_starts() == ()
    async with registry.transaction():
        await registry.record_pod_starts([pod_start("u1")])
        async with registry.transaction():  # nested: the same one
            await registry.upsert_cache(cache("new"), now=T0)
    assert [c.name for c in await registry.list_caches()] == ["kept", "new"]
    assert [r.pod_uid for r in await registry.list_pod_starts()] == ["u1"]


async def test_list_pod_starts_filters(registry: Registry) -> None:
    records = [
        pod_start("u1", started_at=at(1)),
        pod_start("u2", started_at=at(2), namespace="other", images=()),
        pod_start("u3", started_at=at(3), outcome=CacheOutcome.MISS, imc_id=None),
        pod_start("u4", started_at=at(4)),
    ]
    for record in reversed(records):
        await registry.record_pod_start(record)
    assert await registry.list_pod_starts() == tuple(records)
    assert [r.pod_uid for r in await registry.list_pod_starts(namespace="default")] == ["u1", "u3", "u4"]
    assert [r.pod_uid for r in await registry.list_pod_starts(since=at(2), until=at(4))] == ["u2", "u3"]
    assert [r.pod_uid for r in await registry.list_pod_starts(limit=2)] == ["u1", "u2"]
    assert (await registry.list_pod_starts(namespace="other"))[0].images == ()


# ---- views, read with the sqlite3 CLI while the agent writes ----------------------------------


async def test_views_answer_while_a_writer_holds_the_database(registry: Registry, db_path: Path) -> None:
    await registry.upsert_cache(cache("a", 1, images=(NGINX, REDIS)), now=T0)
    await registry.upsert_cache(cache("b", 2, images=(BUSYBOX,), automatic=True), now=T0)
    await registry.mark_cache_matched("imc-a", at(5))
    await registry.mark_cache_matched("imc-a", at(6))
    await registry.record_pod_start(pod_start("u1", startup_seconds=4.0))
    await registry.record_pod_start(pod_start("u2", startup_seconds=6.0))
    await registry.record_pod_start(
        pod_start(
            "u3",
            outcome=CacheOutcome.MISS,
            imc_id=None,
            startup_seconds=50.0,
            images=(ImagePullRecord(NGINX.reference, bytes_pulled=39_000_000, pull_seconds=45.0),),
        )
    )

    writer = await registry.engine.connect()
    try:
        writer = await writer.execution_options(**{WRITE_OPTION: True})
        await writer.execute(text("UPDATE caches SET hit_count = 1000"))  # holds the write lock, uncommitted

        overview = await sqlite3_json(
            db_path, "SELECT name, images, image_count, hit_count, pod_starts FROM cache_overview ORDER BY name"
        )
        assert overview == [
            {
                "name": "a",
                "images": f"{NGINX.reference} {REDIS.reference}",
                "image_count": 2,
                "hit_count": 2,
                "pod_starts": 2,
            },
            {"name": "b", "images": BUSYBOX.reference, "image_count": 1, "hit_count": 0, "pod_starts": 0},
        ]
        by_outcome = await sqlite3_json(
            db_path,
            "SELECT cache_outcome, pods, avg_startup_seconds, min_startup_seconds, max_startup_seconds, "
            "total_bytes_pulled FROM pod_start_by_outcome ORDER BY cache_outcome",
        )
        assert by_outcome == [
            {
                "cache_outcome": "auto_hit",
                "pods": 2,
                "avg_startup_seconds": 5.0,
                "min_startup_seconds": 4.0,
                "max_startup_seconds": 6.0,
                "total_bytes_pulled": 4_000_000,
            },
            {
                "cache_outcome": "miss",
                "pods": 1,
                "avg_startup_seconds": 50.0,
                "min_startup_seconds": 50.0,
                "max_startup_seconds": 50.0,
                "total_bytes_pulled": 39_000_000,
            },
        ]
        per_image = await sqlite3_json(
            db_path,
            "SELECT image, cache_outcome, pods, from_cache, avg_pull_seconds FROM pod_start_per_image "
            "ORDER BY image, cache_outcome",
        )
        assert per_image == [
            {
                "image": BUSYBOX.reference,
                "cache_outcome": "auto_hit",
                "pods": 2,
                "from_cache": 0,
                "avg_pull_seconds": 1.5,
            },
            {
                "image": NGINX.reference,
                "cache_outcome": "auto_hit",
                "pods": 2,
                "from_cache": 2,
                "avg_pull_seconds": 0.0,
            },
            {"image": NGINX.reference, "cache_outcome": "miss", "pods": 1, "from_cache": 0, "avg_pull_seconds": 45.0},
        ]
        times = await sqlite3_json(
            db_path, "SELECT created_at, datetime(created_at) AS t FROM cache_overview WHERE name = 'a'"
        )
        assert times == [{"created_at": "2025-03-01 12:01:00.000000", "t": "2025-03-01 12:01:00"}]
        await writer.commit()
    finally:
        await writer.close()
    assert await sqlite3_json(db_path, "SELECT DISTINCT hit_count FROM caches") == [{"hit_count": 1000}]
