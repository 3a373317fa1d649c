"""The registry database: the only package that imports SQLAlchemy and Alembic.

``open_registry(url)`` gives a ``Registry`` that reads and writes domain values;
``migrate.upgrade(registry.engine)`` brings the schema to the newest migration.
docs/registry.md documents the tables and views.
"""

from vk_provider.registry.engine import database_url, open_registry
from vk_provider.registry.repository import UNSET, CacheConflictError, Registry, Unset

__all__ = ["UNSET", "CacheConflictError", "Registry", "Unset", "database_url", "open_registry"]
