"""Alembic environment for the registry database.

Two ways in:
- from inside the agent (vk_provider.registry.migrate): the caller passes its own connection in
  ``config.attributes["connection"]`` and migrations run on it, inside the caller's event loop
  (``AsyncConnection.run_sync``); nothing here creates an engine or a loop;
- from the ``alembic`` command line: the URL comes from ``-x db=…``, else ``VK_PROVIDER_REGISTRY_DB``
  (the agent's variable) or ``VK_PROVIDER_DB``,
  else ``sqlalchemy.url``; an async engine is created (same pragmas as the agent's) and disposed.

Views are created with plain SQL by the migrations, so autogenerate is told to ignore them.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlalchemy.sql.schema import SchemaItem

from vk_provider.registry.engine import database_url
from vk_provider.registry.migrate import on_migration_connection
from vk_provider.registry.schema import VIEW_NAMES, Base, UtcDateTime

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def include_object(
    obj: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: SchemaItem | None
) -> bool:
    """Leave the views alone: they are SQL in the migrations, not models."""
    return not (type_ == "table" and name in VIEW_NAMES)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Render UtcDateTime as the plain column type, so migrations do not import the models."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure_options() -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "include_object": include_object,
        "render_item": render_item,
        "compare_type": True,
    }


def database_url_from_config() -> str:
    # VK_PROVIDER_REGISTRY_DB is the agent's own variable (registry.db); VK_PROVIDER_DB is the older name.
    db = (
        context.get_x_argument(as_dictionary=True).get("db")
        or os.environ.get("VK_PROVIDER_REGISTRY_DB")
        or os.environ.get("VK_PROVIDER_DB")
    )
    if db:
        return database_url(db)
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: pass -x db=<path or URL> or set VK_PROVIDER_REGISTRY_DB")
    return url


def run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        render_as_batch=sqlite,
        # True on SQLite too: the registry's engine emits BEGIN itself (see engine.py), so DDL is
        # transactional and a failed upgrade leaves the database as it was.
        transactional_ddl=True,
        **configure_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = database_url_from_config()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        **configure_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
    else:
        asyncio.run(on_migration_connection(database_url_from_config(), run_migrations))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
