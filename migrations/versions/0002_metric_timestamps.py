"""Metric points carry their timestamp: job_metrics.created_at (when the step ended).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 11:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: points recorded before this revision have no time of their own.
    op.add_column("job_metrics", sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("created_at")
