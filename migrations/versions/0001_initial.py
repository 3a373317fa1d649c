"""Initial registry schema: image manifests and layers, caches, Pod starts, and their views.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

docs/registry.md documents every table, column and view created here.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("cache_overview", "pod_start_by_outcome", "pod_start_per_image", "image_overview")


def _ordered_images(dialect: str) -> str:
    """The cache's image references in spec order, space separated."""
    if dialect == "postgresql":
        return (
            "(SELECT string_agg(ci.reference, ' ' ORDER BY ci.position) FROM cache_images ci WHERE ci.cache_id = c.id)"
        )
    # SQLite before 3.44 has no ORDER BY inside an aggregate; an ordered subquery feeds group_concat in order.
    return (
        "(SELECT group_concat(reference, ' ') FROM "
        "(SELECT ci.reference FROM cache_images ci WHERE ci.cache_id = c.id ORDER BY ci.position))"
    )


def _view_sql(dialect: str) -> dict[str, str]:
    return {
        "cache_overview": f"""
            SELECT c.imc_id, c.name, c.phase, c.progress, c.size_gib, c.automatic,
                   c.hit_count,
                   (SELECT count(*) FROM pod_starts p WHERE p.imc_id = c.imc_id) AS pod_starts,
                   (SELECT count(*) FROM cache_images ci WHERE ci.cache_id = c.id) AS image_count,
                   (SELECT coalesce(sum(ci.size_bytes), 0) FROM cache_images ci WHERE ci.cache_id = c.id)
                       AS image_bytes,
                   {_ordered_images(dialect)} AS images,
                   c.created_at, c.last_matched_at, c.expires_at, c.message
            FROM caches c
        """,
        "pod_start_by_outcome": """
            SELECT cache_outcome,
                   count(*) AS pods,
                   avg(startup_seconds) AS avg_startup_seconds,
                   min(startup_seconds) AS min_startup_seconds,
                   max(startup_seconds) AS max_startup_seconds,
                   avg(pull_seconds) AS avg_pull_seconds,
                   avg(bytes_pulled) AS avg_bytes_pulled,
                   sum(bytes_pulled) AS total_bytes_pulled
            FROM pod_starts
            GROUP BY cache_outcome
        """,
        "pod_start_per_image": """
            SELECT i.reference AS image, p.cache_outcome,
                   count(*) AS pods,
                   sum(CASE WHEN i.from_cache THEN 1 ELSE 0 END) AS from_cache,
                   avg(i.pull_seconds) AS avg_pull_seconds,
                   min(i.pull_seconds) AS min_pull_seconds,
                   max(i.pull_seconds) AS max_pull_seconds,
                   avg(i.bytes_pulled) AS avg_bytes_pulled,
                   sum(i.bytes_pulled) AS total_bytes_pulled,
                   avg(p.startup_seconds) AS avg_startup_seconds
            FROM pod_start_images i JOIN pod_starts p ON p.id = i.pod_start_id
            GROUP BY i.reference, p.cache_outcome
        """,
        "image_overview": """
            SELECT im.reference, im.digest, im.source, im.size_bytes, im.uncompressed_size_bytes,
                   count(il.layer_digest) AS layer_count,
                   coalesce(sum(CASE WHEN (SELECT count(*) FROM image_layers other
                                           WHERE other.layer_digest = il.layer_digest
                                             AND other.image_id <> il.image_id) > 0
                                     THEN 1 ELSE 0 END), 0) AS shared_layers,
                   im.resolved_at
            FROM images im LEFT JOIN image_layers il ON il.image_id = im.id
            GROUP BY im.id, im.reference, im.digest, im.source, im.size_bytes,
                     im.uncompressed_size_bytes, im.resolved_at
        """,
    }


def upgrade() -> None:
    op.create_table(
        "layers",
        sa.Column("digest", sa.String(length=100), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("uncompressed_size_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_layers")),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=512), nullable=False),
        sa.Column("digest", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("uncompressed_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("source IN ('catalog', 'registry', 'synthetic')", name=op.f("ck_images_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("reference", name=op.f("uq_images_reference")),
    )
    op.create_table(
        "image_layers",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("layer_digest", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_image_layers_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["layer_digest"], ["layers.digest"], name=op.f("fk_image_layers_layer_digest_layers")),
        sa.PrimaryKeyConstraint("image_id", "position", name=op.f("pk_image_layers")),
    )
    op.create_index(op.f("ix_image_layers_layer_digest"), "image_layers", ["layer_digest"])

    op.create_table(
        "caches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("imc_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("size_gib", sa.Integer(), nullable=False),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("hit_count", sa.Integer(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_matched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "phase IN ('Preparing', 'Creating', 'Ready', 'Failed', 'Updating', 'UpdateFailed')",
            name=op.f("ck_caches_phase"),
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name=op.f("ck_caches_progress")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caches")),
        sa.UniqueConstraint("imc_id", name=op.f("uq_caches_imc_id")),
        sa.UniqueConstraint("name", name=op.f("uq_caches_name")),
    )
    op.create_index("ix_caches_phase_expires_at", "caches", ["phase", "expires_at"])
    op.create_index("ix_caches_automatic_last_matched_at", "caches", ["automatic", "last_matched_at"])
    op.create_table(
        "cache_images",
        sa.Column("cache_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=512), nullable=False),
        sa.Column("digest", sa.String(length=100), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cache_id"], ["caches.id"], name=op.f("fk_cache_images_cache_id_caches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("cache_id", "position", name=op.f("pk_cache_images")),
    )
    op.create_index(op.f("ix_cache_images_reference"), "cache_images", ["reference"])
    op.create_table(
        "cache_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cache_id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cache_id"], ["caches.id"], name=op.f("fk_cache_events_cache_id_caches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_events")),
    )
    op.create_index(op.f("ix_cache_events_cache_id"), "cache_events", ["cache_id"])

    op.create_table(
        "pod_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pod_uid", sa.String(length=64), nullable=False),
        sa.Column("namespace", sa.String(length=253), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=False),
        sa.Column("cache_outcome", sa.String(length=16), nullable=False),
        sa.Column("imc_id", sa.String(length=64), nullable=True),
        sa.Column("cache_reason", sa.Text(), nullable=False),
        sa.Column("bytes_pulled", sa.BigInteger(), nullable=False),
        sa.Column("resolve_seconds", sa.Float(), nullable=False),
        sa.Column("snapshot_attach_seconds", sa.Float(), nullable=False),
        sa.Column("pull_seconds", sa.Float(), nullable=False),
        sa.Column("container_start_seconds", sa.Float(), nullable=False),
        sa.Column("startup_seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "cache_outcome IN ('explicit_hit', 'auto_hit', 'partial', 'miss', 'none', 'failed')",
            name=op.f("ck_pod_starts_cache_outcome"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pod_starts")),
        sa.UniqueConstraint("pod_uid", name=op.f("uq_pod_starts_pod_uid")),
    )
    op.create_index(op.f("ix_pod_starts_imc_id"), "pod_starts", ["imc_id"])
    op.create_index(op.f("ix_pod_starts_started_at"), "pod_starts", ["started_at"])
    op.create_index("ix_pod_starts_namespace_started_at", "pod_starts", ["namespace", "started_at"])
    op.create_table(
        "pod_start_images",
        sa.Column("pod_start_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=512), nullable=False),
        sa.Column("bytes_pulled", sa.BigInteger(), nullable=False),
        sa.Column("pull_seconds", sa.Float(), nullable=False),
        sa.Column("from_cache", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pod_start_id"],
            ["pod_starts.id"],
            name=op.f("fk_pod_start_images_pod_start_id_pod_starts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pod_start_id", "position", name=op.f("pk_pod_start_images")),
    )
    op.create_index(op.f("ix_pod_start_images_reference"), "pod_start_images", ["reference"])

    dialect = op.get_context().dialect.name
    for name, sql in _view_sql(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("pod_start_images")
    op.drop_table("pod_starts")
    op.drop_table("cache_events")
    op.drop_table("cache_images")
    op.drop_table("caches")
    op.drop_table("image_layers")
    op.drop_table("images")
    op.drop_table("layers")
