"""Jobs engine: queues, priorities, delayed runs, attempt limits, unique keys, cancellation,
the lease holder, and recurring schedules

Existing rows keep working: they land in the `default` queue at priority 0 with `run_at` set
to their creation time, and keep their status (a `failed` row stays failed).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status IN ('queued', 'running')")
QUEUED = sa.text("status = 'queued'")
ENABLED = sa.text("enabled")


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("queue", sa.String(length=64), nullable=False, server_default="default")
    )
    op.add_column(
        "jobs", sa.Column("priority", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column("jobs", sa.Column("run_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("max_attempts", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("unique_key", sa.String(length=255), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("jobs", sa.Column("locked_by", sa.String(length=100), nullable=True))
    op.execute("UPDATE jobs SET run_at = created_at")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("run_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        ["priority", "run_at"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.create_index(
        "uq_jobs_active_unique_key",
        "jobs",
        ["unique_key"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])

    op.create_table(
        "job_schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.BigInteger(), nullable=False),
        sa.Column("max_attempts", sa.BigInteger(), nullable=True),
        sa.Column("cron", sa.String(length=120), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_job_schedules_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_job_schedules"),
        sa.UniqueConstraint("name", name="uq_job_schedules_name"),
    )
    op.create_index("ix_job_schedules_account_id", "job_schedules", ["account_id"])
    op.create_index(
        "ix_job_schedules_due",
        "job_schedules",
        ["next_run_at"],
        sqlite_where=ENABLED,
        postgresql_where=ENABLED,
    )


def downgrade() -> None:
    op.drop_table("job_schedules")
    op.drop_index("ix_jobs_created_at_id", "jobs")
    op.drop_index("uq_jobs_active_unique_key", "jobs")
    op.drop_index("ix_jobs_ready", "jobs")
    # A job the old runner cannot tell apart: dead ones were failed, cancelled ones never ran.
    op.execute("UPDATE jobs SET status = 'failed' WHERE status IN ('dead', 'cancelled')")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "locked_by",
            "cancel_requested",
            "unique_key",
            "max_attempts",
            "run_at",
            "priority",
            "queue",
        ):
            batch.drop_column(column)
