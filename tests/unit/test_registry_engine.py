"""database_url turns --db values into async SQLAlchemy URLs; UtcDateTime keeps times aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite

from vk_provider.registry.engine import database_url, sqlite_file
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
