"""one active version, ratings set aside after failed rounds

Revision ID: a1c4e2f3b5d6
Revises: c502e4855b29
Create Date: 2026-12-02 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db


revision: str = "a1c4e2f3b5d6"
down_revision: str | None = "c502e4855b29"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    # Nothing stopped two active rows before: keep the one activated last, retire the others.
    op.execute(
        "UPDATE model_versions SET status = 'retired', status_reason = 'retired by migration "
        "a1c4e2f3b5d6: another version was active too, and was activated later' "
        "WHERE status = 'active' AND id <> (SELECT id FROM model_versions WHERE status = 'active' "
        "ORDER BY activated_at DESC NULLS LAST, id DESC LIMIT 1)"
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(
            "uq_model_versions_one_active",
            ["status"],
            unique=True,
            postgresql_where=ACTIVE,
            sqlite_where=ACTIVE,
        )
    for table in ("feedback", "comparisons"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False)
            )
            batch_op.add_column(
                sa.Column("set_aside_at", app.db.UTCDateTime(timezone=True), nullable=True)
            )
            batch_op.add_column(sa.Column("set_aside_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("data_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("data_ids")
    for table in ("comparisons", "feedback"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("set_aside_reason")
            batch_op.drop_column("set_aside_at")
            batch_op.drop_column("failures")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index("uq_model_versions_one_active")
