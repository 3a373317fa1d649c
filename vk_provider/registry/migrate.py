"""Running the Alembic migrations in ``migrations/`` from inside the agent or from the command line.

Owns the Alembic configuration and the connection migrations run on; the migrations themselves
live in ``migrations/versions``. The async functions run inside the caller's event loop: they
take a connection from the caller's engine and hand it to ``migrations/env.py`` through
``config.attributes["connection"]``, so Alembic never starts an event loop of its own. The
``*_sync`` wrappers are for ``vk-provider db …``, which has no loop yet.

On SQLite the migration transaction has foreign keys off (SQLite rebuilds a table to alter it,
and a rebuild of a referenced table would otherwise cascade deletes); the keys are checked
afterwards and switched back on before the connection returns to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from alembic.config import Config

from vk_provider.registry.engine import MIGRATION_OPTION, create_engine, database_url, is_sqlite

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# The newest revision in migrations/versions (a test holds it equal to Alembic's head). A database
# already there is not handed to Alembic at all, so the agent does not import it (~11 MB of RSS).
HEAD = "0001"
_T = TypeVar("_T")


class MigrationError(RuntimeError):
    """The database is not consistent after a migration (e.g. a foreign key check failed)."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for ``migrations/`` without reading alembic.ini."""
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationError(f"migrations not found in {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # '%' is interpolation syntax in Alembic's config parser.
        config.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    return config


def run_migrations_on(connection: Connection, action: Callable[[Config], None]) -> None:
    """Run an Alembic command on ``connection`` (a sync connection, e.g. inside ``run_sync``)."""
    config = alembic_config()
    config.attributes["connection"] = connection
    action(config)


def _pragma(connection: Connection, sql: str) -> list[tuple[object, ...]]:
    # On the DBAPI connection: through SQLAlchemy it would open a transaction, where
    # PRAGMA foreign_keys is silently ignored.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


_MIGRATION_LOCK = 0x766B7072  # "vkpr": the advisory lock key that serialises migrations


@asynccontextmanager
async def _engine_for(target: AsyncEngine | str, *, read_only: bool = False) -> AsyncIterator[AsyncEngine]:
    """The caller's engine (shared: the agent's running loop and pool), or one made for a path or
    URL (``read_only``: see ``create_engine``) and disposed afterwards."""
    if not isinstance(target, str):
        yield target
        return
    engine = create_engine(target, read_only=read_only)
    try:
        yield engine
    finally:
        await engine.dispose()


async def on_migration_connection(target: AsyncEngine | str, work: Callable[[Connection], _T]) -> _T:
    """Run ``work`` (sync, given a sync connection) on a connection meant for migrations.

    ``target`` is the caller's engine or a path/URL (see ``_engine_for``).
    """
    async with _engine_for(target) as engine, engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            # Agents sharing one database may start together: one migrates, the others wait
            # (a session-level advisory lock outlives the transactions alembic commits).
            await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            await connection.commit()
            try:
                return await connection.run_sync(work)
            finally:
                await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                await connection.commit()
        if not is_sqlite(engine):
            return await connection.run_sync(work)
        await connection.execution_options(**{MIGRATION_OPTION: True})
        try:
            result = await connection.run_sync(work)
            await connection.rollback()
            problems = await connection.run_sync(_pragma, "PRAGMA foreign_key_check")
        finally:
            await connection.run_sync(_pragma, "PRAGMA foreign_keys = ON")
        if problems:
            raise MigrationError(f"foreign key check failed after migration: {problems[:10]}")
        return result


async def upgrade(target: AsyncEngine | str, revision: str = "head") -> None:
    """Upgrade the database at ``target`` (an engine, path or URL) to ``revision``.

    Raises :class:`MigrationError` for a database a newer vk-provider made (a revision not in ``migrations/``).
    """
    stamped = await _stamped(target)
    if revision in ("head", HEAD) and stamped == HEAD:
        return  # already the newest schema
    refuse_unknown(stamped)
    if stamped is None:
        await _refuse_foreign(target)

    def work(connection: Connection) -> None:
        from alembic import command

        run_migrations_on(connection, lambda config: command.upgrade(config, revision))

    await on_migration_connection(target, work)


async def downgrade(target: AsyncEngine | str, revision: str) -> None:
    """Downgrade the database at ``target`` to ``revision`` (``base`` drops every table)."""

    def work(connection: Connection) -> None:
        from alembic import command

        run_migrations_on(connection, lambda config: command.downgrade(config, revision))

    await on_migration_connection(target, work)


async def current(target: AsyncEngine | str) -> str | None:
    """The revision the database is at, or None for an empty database."""

    from alembic.runtime.migration import MigrationContext

    # Only read: asking an empty file its revision must not turn it into a database.
    async with _engine_for(target, read_only=True) as engine, engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


async def _refuse_foreign(target: AsyncEngine | str) -> None:
    """A SQLite file with tables but no schema revision is something else's: the registry's tables
    are not mixed into it (on PostgreSQL a database may well hold other applications' tables)."""
    async with _engine_for(target) as engine:
        if not is_sqlite(engine):
            return
        others = await other_tables(engine)
    if others:
        raise MigrationError(f"it holds other tables ({others}) and no registry schema: not a vk-provider registry")


async def other_tables(target: AsyncEngine | str) -> str:
    """The database's tables besides Alembic's own, listed for a message ("" when there are none):
    a database without the registry's schema that holds some is something else's."""
    from sqlalchemy import inspect

    async with _engine_for(target, read_only=True) as engine, engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    tables = sorted(name for name in names if name != "alembic_version")
    return ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")


async def _stamped(target: AsyncEngine | str) -> str | None:
    """The revision recorded in ``alembic_version``, read with plain SQL (None: no such table, or
    not exactly one row; Alembic then decides)."""
    try:
        async with _engine_for(target) as engine, engine.connect() as connection:
            rows = (await connection.execute(text("SELECT version_num FROM alembic_version"))).all()
    except DBAPIError:
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


async def check_known(target: AsyncEngine | str) -> None:
    """Raise :class:`MigrationError` if the database is at a revision this vk-provider does not know."""
    refuse_unknown(await _stamped(target))


def refuse_unknown(stamped: str | None) -> None:
    if stamped is None or stamped == HEAD:
        return
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(stamped) is not None
    except CommandError:
        known = False
    if not known:
        raise MigrationError(
            f"its schema is at revision {stamped!r}, which this vk-provider does not know (its newest is {HEAD}): "
            "a newer vk-provider wrote it; use that one, or another database"
        )


def head_revision() -> str | None:
    """The newest revision in ``migrations/``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade_sync(db: str, revision: str = "head") -> None:
    """``vk-provider db upgrade``: for callers with no running event loop."""
    asyncio.run(upgrade(db, revision))


def downgrade_sync(db: str, revision: str) -> None:
    """``vk-provider db downgrade``."""
    asyncio.run(downgrade(db, revision))


def current_sync(db: str) -> str | None:
    """``vk-provider db current``."""
    return asyncio.run(current(db))
