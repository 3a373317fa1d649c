"""database_url turns --db values into async SQLAlchemy URLs; UtcDateTime keeps times aware UTC."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite

from vk_provider.registry.engine import create_engine, database_url, sqlite_file
from vk_provider.registry.schema import UtcDateTime


@pytest.mark.parametrize(
    ("db", "expected"),
    [
        ("/var/lib/vk/registry.db", "sqlite+aiosqlite:////var/lib/vk/registry.db"),
        ("registry.db", f"sqlite+aiosqlite:///{Path('registry.db').resolve()}"),
        (":memory:", "sqlite+aiosqlite:///:memory:"),
        ("sqlite:////tmp/r.db", "sqlite+aiosqlite:////tmp/r.db"),
        ("sqlite+aiosqlite:////tmp/r.db", "sqlite+aiosqlite:////tmp/r.db"),
        ("postgresql://vk:pw@db:5432/vk", "postgresql+asyncpg://vk:pw@db:5432/vk"),
        ("postgresql+asyncpg://vk@db/vk", "postgresql+asyncpg://vk@db/vk"),
    ],
)
def test_database_url(db: str, expected: str) -> None:
    assert database_url(db) == expected


def test_database_url_expands_home() -> None:
    assert database_url("~/r.db") == f"sqlite+aiosqlite:///{Path.home() / 'r.db'}"


@pytest.mark.parametrize("path", ["/tmp/a?b.db", "/tmp/odd dir #1/r%20x.db", "/tmp/100%.db"])
def test_a_path_with_url_characters_names_its_own_file(path: str) -> None:
    assert sqlite_file(path) == Path(path)  # not cut at ? or #, nor %-decoded


EAST = timezone(timedelta(hours=8))


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (datetime(2025, 1, 1, 8, 0, tzinfo=EAST), datetime(2025, 1, 1, 0, 0, tzinfo=UTC)),
        (datetime(2025, 1, 1, 0, 0, tzinfo=UTC), datetime(2025, 1, 1, 0, 0, tzinfo=UTC)),
        (None, None),
    ],
)
def test_utc_datetime_binds_utc(value: datetime | None, stored: datetime | None) -> None:
    bound = UtcDateTime().process_bind_param(value, sqlite.dialect())
    assert bound == stored
    assert bound is None or bound.utcoffset() == timedelta(0)


def test_utc_datetime_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        UtcDateTime().process_bind_param(datetime(2025, 1, 1), sqlite.dialect())


@pytest.mark.parametrize(
    "read",
    [datetime(2025, 1, 1, 0, 0), datetime(2025, 1, 1, 8, 0, tzinfo=EAST)],
    ids=["naive from sqlite", "aware from postgresql"],
)
def test_utc_datetime_reads_aware_utc(read: datetime) -> None:
    value = UtcDateTime().process_result_value(read, sqlite.dialect())
    assert value == datetime(2025, 1, 1, 0, 0, tzinfo=UTC)
    assert value is not None
    assert value.tzinfo is UTC


def _wal_database(path: Path) -> None:
    made = sqlite3.connect(path)
    made.execute("PRAGMA journal_mode = WAL")
    made.execute("CREATE TABLE t (x)")
    made.execute("INSERT INTO t VALUES (1)")
    made.commit()
    made.close()


async def _read_only_count(path: Path) -> int:
    engine = create_engine(str(path), read_only=True)
    try:
        async with engine.connect() as connection:
            return int((await connection.exec_driver_sql("SELECT count(*) FROM t")).scalar_one())
    finally:
        await engine.dispose()


async def test_a_read_only_look_at_a_wal_database_leaves_no_files_behind(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    _wal_database(path)
    before = path.read_bytes()
    assert await _read_only_count(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.db"]  # no r.db-wal, r.db-shm
    assert path.read_bytes() == before


async def test_a_read_only_look_leaves_the_wal_files_of_a_database_another_connection_has_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    _wal_database(path)
    writer = sqlite3.connect(path)
    try:
        writer.execute("INSERT INTO t VALUES (2)")  # not committed: in the log, not the database
        assert await _read_only_count(path) == 1
        assert {p.name for p in tmp_path.iterdir()} == {"r.db", "r.db-wal", "r.db-shm"}
        writer.commit()
    finally:
        writer.close()
    assert await _read_only_count(path) == 2
