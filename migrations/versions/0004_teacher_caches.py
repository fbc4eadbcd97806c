"""Teacher caches: stored top-k teacher distributions, built by workers on the jobs' lifecycle.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 11:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "teacher_caches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("teacher", sa.String(length=512), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("resolved_spec", sa.JSON(), nullable=True),
        sa.Column("queue", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("examples", sa.BigInteger(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("bytes_per_token", sa.Float(), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_teacher_caches_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_caches")),
    )
    with op.batch_alter_table("teacher_caches", schema=None) as batch_op:
        batch_op.create_index("ix_teacher_caches_status", ["status"], unique=False)
        batch_op.create_index(
            "ix_teacher_caches_tenant_id_created_at", ["tenant_id", "created_at"], unique=False
        )
    op.create_table(
        "teacher_cache_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cache_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["cache_id"],
            ["teacher_caches.id"],
            name=op.f("fk_teacher_cache_events_cache_id_teacher_caches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_cache_events")),
    )
    with op.batch_alter_table("teacher_cache_events", schema=None) as batch_op:
        batch_op.create_index("ix_teacher_cache_events_cache_id_id", ["cache_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("teacher_cache_events", schema=None) as batch_op:
        batch_op.drop_index("ix_teacher_cache_events_cache_id_id")
    op.drop_table("teacher_cache_events")
    with op.batch_alter_table("teacher_caches", schema=None) as batch_op:
        batch_op.drop_index("ix_teacher_caches_tenant_id_created_at")
        batch_op.drop_index("ix_teacher_caches_status")
    op.drop_table("teacher_caches")
