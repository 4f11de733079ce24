"""All SQL of the job engine. Worker statements run in `Database.run_write` transactions on a
sync connection; each transaction starts with a write, so on SQLite it takes the write lock
before it reads anything (a transaction that reads first fails at once when another process
committed in between)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, aliased

from aivax.models.job import ACTIVE_JOB, Job, JobSchedule

ACTIVE = ("queued", "running")
RETRYABLE = ("dead", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: uuid.UUID
    account_id: uuid.UUID
    kind: str
    queue: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int | None
    cancel_requested: bool
    run_at: datetime  # when it became due: its wait in the queue ends at this claim


@dataclass(frozen=True, slots=True)
class DueSchedule:
    id: uuid.UUID
    next_run_at: datetime
    cron: str
    timezone: str


def _dialect(target: Session | Connection) -> str:
    bind = target.get_bind() if isinstance(target, Session) else target
    return bind.dialect.name


def insert_job(target: Session | Connection, values: dict[str, Any]) -> uuid.UUID:
    """Insert a job in the caller's transaction; with a `unique_key` that an active job already
    holds, nothing is inserted and that job's id is returned."""
    key = values.get("unique_key")
    if key is None:
        target.execute(insert(Job).values(**values))
        return uuid.UUID(str(values["id"]))
    factory = pg_insert if _dialect(target) == "postgresql" else sqlite_insert
    statement = (
        factory(Job)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["unique_key"], index_where=ACTIVE_JOB)
        .returning(Job.id)
    )
    inserted = target.execute(statement).scalar()
    if inserted is not None:
        return uuid.UUID(str(inserted))
    existing = target.execute(
        select(Job.id).where(Job.unique_key == key, Job.status.in_(ACTIVE))
    ).scalar()
    if existing is None:  # the holder finished between the two statements: take the key now
        return insert_job(target, values)
    return existing


def _claimable(model: Any, now: datetime, kinds: Sequence[str], queues: Sequence[str]) -> Any:
    ready = (model.status == "queued") & (model.run_at <= now)
    abandoned = (model.status == "running") & (model.locked_until < now)
    condition = or_(ready, abandoned) & model.kind.in_(kinds)
    return condition & model.queue.in_(queues) if queues else condition


def claim(
    conn: Connection,
    *,
    now: datetime,
    lease_until: datetime,
    worker: str,
    kinds: Sequence[str],
    queues: Sequence[str],
) -> ClaimedJob | None:
    """Take the first claimable job (highest priority, then earliest `run_at`) in one UPDATE:
    on PostgreSQL its candidate row is locked with SKIP LOCKED, so workers never wait for each
    other; on SQLite the statement holds the database's single write lock."""
    candidate = aliased(Job, name="candidate")
    picked = (
        select(candidate.id)
        .where(_claimable(candidate, now, kinds, queues))
        .order_by(candidate.priority.desc(), candidate.run_at, candidate.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = conn.execute(
        update(Job)
        .where(Job.id == picked, _claimable(Job, now, kinds, queues))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            locked_until=lease_until,
            locked_by=worker,
            updated_at=now,
        )
        .returning(
            Job.id,
            Job.account_id,
            Job.kind,
            Job.queue,
            Job.payload,
            Job.attempts,
            Job.max_attempts,
            Job.cancel_requested,
            Job.run_at,
        )
    ).first()
    return ClaimedJob(*row) if row is not None else None


def _owned(job_id: uuid.UUID, worker: str, attempt: int) -> Any:
    return (
        (Job.id == job_id)
        & (Job.locked_by == worker)
        & (Job.attempts == attempt)
        & (Job.status == "running")
    )


def renew(
    conn: Connection, *, worker: str, job_ids: Sequence[uuid.UUID], until: datetime
) -> dict[uuid.UUID, bool]:
    """Extend the leases this worker still holds: {job id: cancel requested}. A job missing
    from the answer is no longer this worker's (its lease expired and another took it)."""
    rows = conn.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.locked_by == worker, Job.status == "running")
        .values(locked_until=until)
        .returning(Job.id, Job.cancel_requested)
    ).all()
    return {row[0]: bool(row[1]) for row in rows}


def progress(
    conn: Connection,
    *,
    job_id: uuid.UUID,
    worker: str,
    attempt: int,
    values: dict[str, Any],
) -> bool | None:
    """Record progress (and renew the lease): whether cancellation was requested, or None when
    the job is no longer this worker's."""
    row = conn.execute(
        update(Job)
        .where(_owned(job_id, worker, attempt))
        .values(**values)
        .returning(Job.cancel_requested)
    ).first()
    return None if row is None else bool(row[0])


def lock_for_finish(
    conn: Connection, *, job_id: uuid.UUID, worker: str, attempt: int, now: datetime
) -> bool | None:
    """Lock the row of a job this worker still holds (the first statement of the finishing
    transaction): whether cancellation was requested, or None when it is no longer ours."""
    return progress(conn, job_id=job_id, worker=worker, attempt=attempt, values={"updated_at": now})


def set_outcome(conn: Connection, *, job_id: uuid.UUID, values: dict[str, Any]) -> None:
    conn.execute(
        update(Job).where(Job.id == job_id).values(locked_until=None, locked_by=None, **values)
    )


def release(
    conn: Connection, *, job_id: uuid.UUID, worker: str, attempt: int, now: datetime
) -> None:
    """A job interrupted by its worker's shutdown is queued again at once; the interrupted
    attempt is not counted."""
    conn.execute(
        update(Job)
        .where(_owned(job_id, worker, attempt))
        .values(
            status="queued",
            attempts=Job.attempts - 1,
            locked_until=None,
            locked_by=None,
            run_at=now,
            updated_at=now,
        )
    )


# --- schedules -----------------------------------------------------------------------------


def due_schedules(conn: Connection, *, now: datetime, limit: int) -> list[DueSchedule]:
    rows = conn.execute(
        select(JobSchedule.id, JobSchedule.next_run_at, JobSchedule.cron, JobSchedule.timezone)
        .where(JobSchedule.enabled.is_(True), JobSchedule.next_run_at <= now)
        .order_by(JobSchedule.next_run_at)
        .limit(limit)
    ).all()
    return [DueSchedule(*row) for row in rows]


def advance_schedule(
    conn: Connection, *, schedule_id: uuid.UUID, seen: datetime, next_run_at: datetime
) -> JobSchedule | None:
    """Move a schedule past the due time `seen`, if no one else did: the schedule's row (to
    enqueue its run from) when this transaction won, else None."""
    row = conn.execute(
        update(JobSchedule)
        .where(
            JobSchedule.id == schedule_id,
            JobSchedule.next_run_at == seen,
            JobSchedule.enabled.is_(True),
        )
        .values(next_run_at=next_run_at, last_run_at=seen)
        .returning(
            JobSchedule.account_id,
            JobSchedule.kind,
            JobSchedule.payload,
            JobSchedule.queue,
            JobSchedule.priority,
            JobSchedule.max_attempts,
        )
    ).first()
    if row is None:
        return None
    return JobSchedule(
        id=schedule_id,
        account_id=row[0],
        kind=row[1],
        payload=row[2],
        queue=row[3],
        priority=row[4],
        max_attempts=row[5],
    )


def note_schedule_run(conn: Connection, schedule_id: uuid.UUID, job_id: uuid.UUID) -> None:
    conn.execute(
        update(JobSchedule).where(JobSchedule.id == schedule_id).values(last_job_id=job_id)
    )


async def schedule_by_name(session: AsyncSession, name: str) -> JobSchedule | None:
    return await session.scalar(select(JobSchedule).where(JobSchedule.name == name))


# --- operator ------------------------------------------------------------------------------


async def list_page(
    session: AsyncSession,
    *,
    kind: str | None,
    status: str | None,
    queue: str | None,
    limit: int,
    after: uuid.UUID | None,
) -> Sequence[Job]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    for column, value in ((Job.kind, kind), (Job.status, status), (Job.queue, queue)):
        if value is not None:
            query = query.where(column == value)
    if after is not None:
        cursor = await session.get(Job, after)
        if cursor is not None:
            query = query.where(tuple_(Job.created_at, Job.id) < (cursor.created_at, cursor.id))
    return (await session.scalars(query.limit(limit + 1))).all()


async def cancel_queued(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> bool:
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", finished_at=now, updated_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def request_cancel(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> bool:
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(cancel_requested=True, updated_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def requeue(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> bool:
    """A dead, failed or cancelled job queued again with all its attempts; its last error is
    kept until it runs."""
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RETRYABLE))
        .values(
            status="queued",
            attempts=0,
            run_at=now,
            cancel_requested=False,
            result=None,
            finished_at=None,
            locked_until=None,
            locked_by=None,
            updated_at=now,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def active_counts(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Jobs queued and running, by (kind, status)."""
    rows = await session.execute(
        select(Job.kind, Job.status, func.count())
        .where(Job.status.in_(ACTIVE))
        .group_by(Job.kind, Job.status)
    )
    return {(kind, status): count for kind, status, count in rows}
