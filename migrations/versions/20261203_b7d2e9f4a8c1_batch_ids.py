"""the batch of ratings a running round computes on

Revision ID: b7d2e9f4a8c1
Revises: a1c4e2f3b5d6
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "b7d2e9f4a8c1"
down_revision: str | None = "a1c4e2f3b5d6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A failed round now charges only the batch it was computing on. Earlier failures were
    # charged to every rating a round took, whatever failed: those counts, and the ratings they
    # set aside, say nothing about the ratings, so they are forgotten.
    for table in ("feedback", "comparisons"):
        op.execute(
            f"UPDATE {table} SET failures = 0, set_aside_at = NULL, set_aside_reason = NULL "
            "WHERE failures > 0 OR set_aside_at IS NOT NULL"
        )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("batch_ids")
