"""The registry on a real PostgreSQL server (issue 9): migrations, repository, views, sharing.

The server is the test session's own (``tests/support/postgres.py``: Debian's binaries, a
private cluster on a loopback port). The repository checks are test_registry.py's own, run here
on PostgreSQL, so both backends answer the same values to the same calls.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from tests.integration import test_registry as sqlite_suite
from tests.integration.test_registry import (
    BUSYBOX,
    NGINX,
    REDIS,
    ROOT,
    T0,
    at,
    cache,
    layer,
    pod_start,
    sql,
)
from tests.support.postgres import PostgresServer, fresh_database, shared_postgres
from vk_provider.domain.model import ImageManifest
from vk_provider.domain.records import CacheOutcome, ImagePullRecord
from vk_provider.registry import Registry, open_registry
from vk_provider.registry.migrate import upgrade
from vk_provider.registry.schema import VIEW_NAMES, Base

# test_registry.py's repository checks that hold on any backend (the others are about SQLite:
# pragmas, the sqlite3 tool, files).
SHARED_CHECKS = (
    "test_cache_round_trip",
    "test_upsert_updates_by_name_and_keeps_usage",
    "test_an_imc_id_belongs_to_one_cache",
    "test_list_caches_by_name",
    "test_match_candidates_are_ready_and_unexpired",
    "test_ten_thousand_candidates_in_a_fixed_number_of_queries",
    "test_set_cache_status",
    "test_cache_events_are_counted_and_capped",
    "test_mark_cache_matched",
    "test_delete_cache_keeps_pod_history",
    "test_list_expired",
    "test_least_recently_used_and_counts",
    "test_concurrent_writers_do_not_lock_each_other_out",
    "test_manifest_round_trip_and_shared_layers_stored_once",
    "test_save_manifest_replaces_the_image",
    "test_pod_start_is_recorded_once",
    "test_pod_starts_batch_in_one_transaction",
    "test_a_start_replaces_a_failed_record_of_the_same_pod",
    "test_list_pod_starts_filters",
    "test_forget_pod_starts_by_uid_and_label_takes_their_hits_off",
    "test_pod_starts_by_label_and_forget_unused_caches",
    "test_a_transaction_writes_all_or_nothing",
)


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> PostgresServer:
    return shared_postgres(request.config)


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
async def pg_registry(pg_database: str) -> AsyncIterator[Registry]:
    opened = await open_registry(pg_database)
    await upgrade(opened.engine)
    try:
        yield opened
    finally:
        await opened.close()


def test_the_url_selects_asyncpg(pg_registry: Registry) -> None:
    assert pg_registry.engine.dialect.name == "postgresql"
    assert pg_registry.engine.dialect.driver == "asyncpg"


# ---- migrations ------------------------------------------------------------------------------


async def test_migrations_round_trip_on_a_populated_database(pg_registry: Registry) -> None:
    await sqlite_suite.assert_migrations_round_trip(pg_registry)


async def test_models_and_migrations_agree(pg_registry: Registry) -> None:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "include_object": lambda o, name, type_, r, c: name not in VIEW_NAMES},
        )
        return list(compare_metadata(context, Base.metadata))

    async with pg_registry.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_times_are_timestamptz(pg_registry: Registry, postgres: PostgresServer, pg_database: str) -> None:
    types = postgres.psql(
        "SELECT DISTINCT data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name IN ('created_at', 'started_at', 'expires_at')",
        database=pg_database.rsplit("/", 1)[1],
    )
    assert types.split() == ["timestamp", "with", "time", "zone"]


def test_the_command_line_migrates_postgresql(pg_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VK_PROVIDER_DB"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(sys.executable, "-m", "vk_provider", "db", "upgrade", "--db", pg_database)
    assert run(sys.executable, "-m", "vk_provider", "db", "current", "--db", pg_database).split()[0] == "0001"
    alembic = (sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"db={pg_database}")
    run(*alembic, "downgrade", "base")
    assert run(*alembic, "current").strip() == ""


# ---- the repository: the same checks as on SQLite --------------------------------------------


@pytest.mark.parametrize("check", SHARED_CHECKS)
async def test_repository_answers_as_on_sqlite(check: str, pg_registry: Registry) -> None:
    await getattr(sqlite_suite, check)(pg_registry)


async def test_two_agents_write_one_registry_at_once(pg_database: str, pg_registry: Registry) -> None:
    """Two engines (two agents) on one database: no insert race fails, no count is lost."""
    other = await open_registry(pg_database)
    try:
        await pg_registry.upsert_cache(cache("a"), now=T0)
        manifests = [
            ImageManifest(NGINX.reference, "sha256:n", (layer(1), layer(2), layer(3))),
            ImageManifest(REDIS.reference, "sha256:r", (layer(3), layer(2), layer(4))),
        ]
        await asyncio.gather(
            *(registry.save_manifest(m) for registry in (pg_registry, other) for m in manifests for _ in range(3)),
            *(
                registry.append_cache_event("a", type="Normal", message="hit", now=at(i))
                for registry in (pg_registry, other)
                for i in range(10)
            ),
            *(registry.mark_cache_matched("imc-a", at(i)) for registry in (pg_registry, other) for i in range(10)),
            *(registry.record_pod_start(pod_start("same-pod")) for registry in (pg_registry, other)),
        )
        assert await other.get_manifests([m.reference for m in manifests]) == {m.reference: m for m in manifests}
        events = await other.list_cache_events("a")
        assert events is not None
        assert [e.count for e in events] == [20]
        assert await sql(pg_registry, "SELECT hit_count, pod_starts FROM cache_overview") == [(20, 1)]
        assert await sql(pg_registry, "SELECT count(*) FROM layers") == [(4,)]
    finally:
        await other.close()


# ---- views, read with psql -------------------------------------------------------------------


async def test_views_answer(pg_registry: Registry, postgres: PostgresServer, pg_database: str) -> None:
    await pg_registry.upsert_cache(cache("a", 1, images=(NGINX, REDIS)), now=T0)
    await pg_registry.upsert_cache(cache("b", 2, images=(BUSYBOX,), automatic=True), now=T0)
    await pg_registry.mark_cache_matched("imc-a", at(5))
    await pg_registry.mark_cache_matched("imc-a", at(6))
    await pg_registry.record_pod_start(pod_start("u1", startup_seconds=4.0))
    await pg_registry.record_pod_start(pod_start("u2", startup_seconds=6.0))
    await pg_registry.record_pod_start(
        pod_start(
            "u3",
            outcome=CacheOutcome.MISS,
            imc_id=None,
            startup_seconds=50.0,
            images=(ImagePullRecord(NGINX.reference, bytes_pulled=39_000_000, pull_seconds=45.0),),
        )
    )
    await pg_registry.save_manifest(ImageManifest(NGINX.reference, "sha256:n", (layer(1), layer(2))))
    await pg_registry.save_manifest(ImageManifest(REDIS.reference, "sha256:r", (layer(2),)))
    database = pg_database.rsplit("/", 1)[1]

    def psql(query: str) -> list[list[str]]:
        return [line.split("|") for line in postgres.psql(query, database=database).splitlines()]

    assert psql(
        "SELECT name, images, image_count, hit_count, pod_starts, automatic FROM cache_overview ORDER BY name"
    ) == [
        ["a", f"{NGINX.reference} {REDIS.reference}", "2", "2", "2", "f"],
        ["b", BUSYBOX.reference, "1", "0", "0", "t"],
    ]
    assert psql(
        "SELECT cache_outcome, pods, avg_startup_seconds, min_startup_seconds, max_startup_seconds, "
        "total_bytes_pulled FROM pod_start_by_outcome ORDER BY cache_outcome"
    ) == [["auto_hit", "2", "5", "4", "6", "4000000"], ["miss", "1", "50", "50", "50", "39000000"]]
    assert psql(
        "SELECT image, cache_outcome, pods, from_cache, avg_pull_seconds FROM pod_start_per_image "
        "ORDER BY image, cache_outcome"
    ) == [
        [BUSYBOX.reference, "auto_hit", "2", "0", "1.5"],
        [NGINX.reference, "auto_hit", "2", "2", "0"],
        [NGINX.reference, "miss", "1", "0", "45"],
    ]
    assert psql("SELECT reference, layer_count, shared_layers FROM image_overview ORDER BY reference") == [
        [NGINX.reference, "2", "1"],
        [REDIS.reference, "1", "1"],
    ]
    # Through SQLAlchemy, as the report reads them: averages of integers are numeric on PostgreSQL.
    rows = await sql(pg_registry, "SELECT avg_bytes_pulled, total_bytes_pulled FROM pod_start_by_outcome ORDER BY 1")
    assert rows == [(Decimal(2_000_000), 4_000_000), (Decimal(39_000_000), 39_000_000)]
