"""Opening the registry database: URL handling and the async engine with SQLite tuned for sharing.

Owns how connections are made (pragmas, transaction start); it does not touch the schema
(``migrate``) nor the data (``repository``).

SQLite is shared with people running ``sqlite3`` on the same file while the agent writes, so
every connection uses WAL (readers never block the writer and never see half a transaction), a
busy timeout (a writer waits for the lock instead of failing), enforced foreign keys, and
``synchronous=NORMAL`` (durable enough with WAL, and no fsync per commit). SQLAlchemy, not the
``sqlite3`` driver, emits BEGIN, so that write transactions can start with ``BEGIN IMMEDIATE``:
taking the write lock up front is what lets the busy timeout work; a deferred transaction that
read first and then tries to write fails at once with "database is locked" when another
connection wrote in between, whatever the timeout.

PostgreSQL (``postgresql://…``, through asyncpg: ``pip install vk-provider[postgres]``) lets
several agents share one registry. Its connections need no tuning; the pool checks a connection
before handing it out, so a restarted database server costs a reconnect rather than an error.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from vk_provider.registry.repository import Registry

BUSY_TIMEOUT_MS = 5000
WRITE_OPTION = "vk_provider_write"
"""Execution option: a transaction begun on a connection carrying it is a write transaction."""
MIGRATION_OPTION = "vk_provider_migration"
"""Execution option: the connection runs migrations (foreign keys off while tables are rebuilt)."""

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def database_url(db: str) -> str:
    """Turn the ``--db`` value into an async SQLAlchemy URL.

    A plain path becomes ``sqlite+aiosqlite:///<absolute path>``; a URL passes through, except
    that a URL naming no async driver (``sqlite://``, ``postgresql://``) gets the async one.
    """
    if "://" not in db:
        if db == ":memory:":
            return "sqlite+aiosqlite:///:memory:"
        # URL.create quotes what a URL would misread (?, #, %) in the path; make_url decodes it.
        path = str(Path(db).expanduser().resolve())
        return URL.create("sqlite+aiosqlite", database=path).render_as_string(hide_password=False)
    scheme, rest = db.split("://", 1)
    return f"{_DRIVERS.get(scheme, scheme)}://{rest}"


SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_SCHEME = re.compile(r"[a-z][a-z0-9.-]*")


def db_problem(db: str) -> str | None:
    """Why a ``--db`` / ``registry.db`` value can never hold a registry, or None. Plain text checks
    (no connection): an in-memory SQLite database (gone when the command ends, and one per
    connection), or a database other than SQLite and PostgreSQL."""
    if not db:
        return "must not be empty"
    scheme = db.split("://", 1)[0].split("+", 1)[0].lower() if "://" in db else "sqlite"
    scheme = "postgresql" if scheme == "postgres" else scheme
    if not _SCHEME.fullmatch(scheme):
        return None  # not a URL at all: parsing it says so
    if scheme not in SUPPORTED_BACKENDS:
        return f"vk-provider keeps its registry in SQLite (a file) or PostgreSQL, not {scheme}"
    if scheme == "sqlite" and db.rsplit("://", 1)[-1].lstrip("/") in ("", ":memory:"):
        return "an in-memory database is lost when the command ends: give a file"
    return None


def sqlite_file(db: str) -> Path | None:
    """The file a ``--db`` value names when it is a SQLite database on disk (a path or a sqlite URL).

    Raises ValueError for a URL SQLAlchemy cannot parse.
    """
    try:
        parsed = make_url(database_url(db))
    except ArgumentError as exc:
        raise ValueError(f"not a path or a SQLAlchemy URL: {exc}") from None
    return _file_of(parsed)


class DatabaseArgumentError(ValueError):
    """A ``--db`` value that names no usable registry; ``usage`` is true when the value itself is
    malformed (empty, not a URL), false when it names a SQLite file that is not there."""

    def __init__(self, message: str, *, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def existing_sqlite_file(db: str, *, must_exist: bool = True) -> Path | None:
    """Check a ``--db`` value before it is opened: the SQLite file it names (``None`` for a
    database server), which with ``must_exist`` has to be there already, since reading a
    registry must never create an empty one. Raises :class:`DatabaseArgumentError`."""
    if not db:
        raise DatabaseArgumentError("no registry database given (--db is empty)", usage=True)
    problem = db_problem(db)
    if problem is not None:
        raise DatabaseArgumentError(f"registry database {db}: {problem}", usage=True)
    try:
        file = sqlite_file(db)
    except ValueError as exc:
        raise DatabaseArgumentError(f"registry database {db}: {exc}", usage=True) from None
    if file is not None and file.is_dir():
        raise DatabaseArgumentError(f"registry database {file} is a directory, not a file", usage=False)
    if must_exist and file is not None and not file.is_file():
        raise DatabaseArgumentError(f"no registry database at {file}", usage=False)
    if file is not None and file.is_file() and not _looks_like_sqlite(file):
        raise DatabaseArgumentError(f"{file} is not a SQLite database", usage=False)
    return file


def _looks_like_sqlite(file: Path) -> bool:
    """An empty file (SQLite makes it a database), or one starting with SQLite's header."""
    try:
        with file.open("rb") as opened:
            head = opened.read(16)
    except OSError:
        return True  # let opening it say what is wrong
    return not head or head == b"SQLite format 3\x00"


def _file_of(url: URL) -> Path | None:
    # The path as SQLite opens it: a plain --db path was made absolute (and ~ expanded) by
    # database_url; a URL's path is taken as written.
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for ``url`` (see ``database_url``); for SQLite, with the pragmas above.

    ``read_only``: a SQLite file is opened read-only and left as it is (no directory made, no
    switch to WAL, an empty file not turned into a database), for commands that only read it.
    """
    url = database_url(url)
    parsed = make_url(url)
    file = _file_of(parsed)
    wal_files_made = False
    if file is not None and read_only:
        # SQLite's URI form (file:...?mode=ro) through the driver's uri option.
        query = {key: value for key, value in parsed.query.items() if key != "mode"}  # ours is ro
        parsed = parsed.set(database=f"file:{quote(str(file))}?mode=ro", query={**query, "uri": "true"})
        wal_files_made = not any(side.exists() for side in _wal_files(file))
    elif file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_async_engine(parsed, **kwargs)
    if is_sqlite(engine):
        _configure_sqlite(engine, read_only=read_only)
    if file is not None and wal_files_made:
        event.listen(engine.sync_engine, "engine_disposed", lambda _engine: _release_wal_files(file))
    return engine


def _wal_files(file: Path) -> tuple[Path, Path]:
    return Path(f"{file}-wal"), Path(f"{file}-shm")


def _release_wal_files(file: Path) -> None:
    """A read-only connection to a WAL database makes its -wal and -shm files, but cannot remove
    them when it closes: only a connection that may write can. One such is opened and closed: if
    no other connection has the database open, SQLite removes both (the log it checkpoints is the
    empty one the reader made: the database is unchanged); if one has, it leaves them, as it must."""
    if not any(side.exists() for side in _wal_files(file)) or not os.access(file, os.W_OK):
        return
    try:
        connection = sqlite3.connect(f"file:{quote(str(file))}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        finally:
            connection.close()
    except sqlite3.Error:
        pass  # left as they are: harmless


def _configure_sqlite(engine: AsyncEngine, *, read_only: bool = False) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # None: the driver must not emit BEGIN itself; _on_begin does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not read_only:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get(MIGRATION_OPTION):
            # Only possible outside a transaction; the migration connection is discarded afterwards.
            connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        write = options.get(WRITE_OPTION) or options.get(MIGRATION_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


async def open_registry(url: str, *, read_only: bool = False) -> Registry:
    """Open the registry at ``url`` (a path or URL, see ``database_url``; ``read_only``: see
    ``create_engine``).

    The schema is not touched: the agent calls ``migrate.upgrade(registry.engine)`` on start.
    ``await registry.close()`` releases every connection.
    """
    from vk_provider.registry.repository import Registry  # repository is above engine; avoids a cycle

    return Registry(create_engine(url, read_only=read_only))
