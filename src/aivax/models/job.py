"""Durable background jobs and their recurring schedules (the engine is aivax.jobs)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from aivax.kit.clock import utcnow
from aivax.models.base import Base, Timestamped

# Jobs that still hold their unique key: a second enqueue with the key returns the active one.
ACTIVE_JOB = text("status IN ('queued', 'running')")


class Job(Timestamped, Base):
    """A durable background job: claimed with a lease, so a crashed worker's job is resumed.

    queued → running → done | failed | dead | cancelled, and running → queued again for a retry
    (`error` keeps the last failure). `failed`: refused without retry; `dead`: every attempt
    allowed failed."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    queue: Mapped[str] = mapped_column(String(64), default="default")
    priority: Mapped[int] = mapped_column(default=0)
    run_at: Mapped[datetime] = mapped_column(default=utcnow)
    # None: the limit registered with the kind's handler.
    max_attempts: Mapped[int | None]
    unique_key: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    progress_done: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(String(2000))
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    locked_until: Mapped[datetime | None]
    locked_by: Mapped[str | None] = mapped_column(String(100))
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_jobs_status_locked_until", "status", "locked_until"),
        Index(
            "ix_jobs_ready",
            "priority",
            "run_at",
            sqlite_where=text("status = 'queued'"),
            postgresql_where=text("status = 'queued'"),
        ),
        Index(
            "uq_jobs_active_unique_key",
            "unique_key",
            unique=True,
            sqlite_where=ACTIVE_JOB,
            postgresql_where=ACTIVE_JOB,
        ),
        Index("ix_jobs_created_at_id", "created_at", "id"),
    )


class JobSchedule(Timestamped, Base):
    """A recurring job: a cron expression read in a time zone. `next_run_at` is advanced by one
    conditional UPDATE in the transaction that enqueues the run, so each due time fires once
    however many workers look."""

    __tablename__ = "job_schedules"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    queue: Mapped[str] = mapped_column(String(64), default="default")
    priority: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int | None]
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    enabled: Mapped[bool] = mapped_column(default=True)
    next_run_at: Mapped[datetime]
    last_run_at: Mapped[datetime | None]
    last_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)

    __table_args__ = (
        Index(
            "ix_job_schedules_due",
            "next_run_at",
            sqlite_where=text("enabled"),
            postgresql_where=text("enabled"),
        ),
    )
