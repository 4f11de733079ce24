"""Enqueueing (in the caller's transaction), recurring schedules and the operator's actions.

A job is added to the caller's transaction and nothing else: a rolled-back write never runs.
A session that enqueued wakes this process's runner after it commits (`db.on_commit`), so a
job queued by a request starts at once instead of at the next poll; other processes' workers
find it at their next poll.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import Unpack

from aivax.db import on_commit
from aivax.errors import BadRequest, Conflict, NotFound
from aivax.jobs import repository
from aivax.kit.clock import utcnow
from aivax.models.job import Job, JobSchedule

# `Session.info` key: the runner's wake function (set on the session factory by the runner).
WAKE_KEY = "aivax.jobs.wake"
QUEUE_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class JobNotFound(NotFound):
    code = "job_not_found"


class JobNotRetryable(Conflict):
    code = "job_not_retryable"


class JobFinished(Conflict):
    code = "job_finished"


class JobKeyTaken(Conflict):
    code = "job_duplicate"


class ScheduleInvalid(BadRequest):
    code = "invalid_schedule"


# --- enqueue -------------------------------------------------------------------------------


class JobOptions(TypedDict, total=False):
    """What an enqueue may set besides the kind, payload and account (defaults: due now, no
    unique key, the `default` queue, priority 0, the kind's attempt limit, no progress total)."""

    run_at: datetime | None
    unique_key: str | None
    queue: str
    priority: int
    max_attempts: int | None
    progress_total: int


def _values(
    kind: str, payload: dict[str, Any], account_id: uuid.UUID, options: JobOptions
) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": uuid.uuid4(),
        "account_id": account_id,
        "kind": kind,
        "payload": payload,
        "status": "queued",
        "queue": options.get("queue", "default"),
        "priority": options.get("priority", 0),
        "run_at": options.get("run_at") or now,
        "max_attempts": options.get("max_attempts"),
        "unique_key": options.get("unique_key"),
        "cancel_requested": False,
        "progress_done": 0,
        "progress_total": options.get("progress_total", 0),
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }


async def enqueue(
    session: AsyncSession,
    kind: str,
    payload: dict[str, Any],
    *,
    account_id: uuid.UUID,
    **options: Unpack[JobOptions],
) -> Job:
    """Add a job to the session's transaction. With `unique_key`, while a job with that key is
    queued or running, that job is returned and nothing is added. The local runner is woken
    once the transaction commits."""
    values = _values(kind, payload, account_id, options)
    wake_after_commit(session.sync_session)
    if values["unique_key"] is None:
        job = Job(**values)
        session.add(job)  # written with the caller's next flush
        return job
    job_id = await session.run_sync(repository.insert_job, values)
    found = await session.get(Job, job_id)
    if found is None:  # pragma: no cover - inserted or found in this transaction
        raise JobNotFound(f"No job {str(job_id)!r}.")
    return found


def enqueue_sync(
    target: Session | Connection,
    kind: str,
    payload: dict[str, Any],
    *,
    account_id: uuid.UUID,
    **options: Unpack[JobOptions],
) -> uuid.UUID:
    """`enqueue` for a sync session or connection (e.g. inside `Database.run_write`): the job's
    id. A session wakes the local runner after commit; after a connection's transaction the
    caller calls `services.jobs.wake()` (or the job waits for the next poll)."""
    values = _values(kind, payload, account_id, options)
    if isinstance(target, Session):
        wake_after_commit(target)
    return repository.insert_job(target, values)


def wake_after_commit(session: Session) -> None:
    """Wake this process's runner once `session` commits (a rollback wakes no one, and a wake
    with nothing to do costs one query)."""
    wake: Callable[[], None] | None = session.info.get(WAKE_KEY)
    if wake is not None:
        on_commit(session, wake)


# --- schedules -----------------------------------------------------------------------------


def next_due(cron: str, timezone: str, after: datetime) -> datetime:
    """The first time after `after` that `cron` names, read as wall-clock time in `timezone`
    (five fields, or six with seconds last), in UTC."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleInvalid(
            f"Unknown time zone {timezone!r}; use an IANA name such as 'Europe/Berlin'.",
            param="timezone",
        ) from None
    if not croniter.is_valid(cron):
        raise ScheduleInvalid(
            f"Invalid cron expression {cron!r}; use five fields such as '0 9 * * 1-5'.",
            param="cron",
        )
    following: datetime = croniter(cron, after.astimezone(zone)).get_next(datetime)
    return following.astimezone(after.tzinfo)


async def put_schedule(
    session: AsyncSession,
    *,
    name: str,
    account_id: uuid.UUID,
    kind: str,
    cron: str,
    timezone: str = "UTC",
    payload: dict[str, Any] | None = None,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int | None = None,
    now: datetime | None = None,
) -> JobSchedule:
    """Create the schedule `name`, or change it. Its next due time is computed again only when
    its timing changed (a restart that puts the same schedule skips no run)."""
    now = now or utcnow()
    first = next_due(cron, timezone, now)
    schedule = await repository.schedule_by_name(session, name)
    if schedule is None:
        schedule = JobSchedule(name=name, next_run_at=first)
        session.add(schedule)
    elif (schedule.cron, schedule.timezone) != (cron, timezone) or not schedule.enabled:
        schedule.next_run_at = first
    schedule.account_id, schedule.kind, schedule.payload = account_id, kind, payload or {}
    schedule.cron, schedule.timezone, schedule.enabled = cron, timezone, True
    schedule.queue, schedule.priority, schedule.max_attempts = queue, priority, max_attempts
    await session.flush()
    return schedule


async def remove_schedule(session: AsyncSession, name: str) -> bool:
    schedule = await repository.schedule_by_name(session, name)
    if schedule is None:
        return False
    await session.delete(schedule)
    await session.flush()
    return True


def fire_schedule(conn: Connection, due: repository.DueSchedule, now: datetime) -> uuid.UUID | None:
    """Enqueue the run of `due` at its due time, once: the schedule moves past it in the same
    transaction, conditionally on no other worker having moved it first. Due times missed while
    no worker ran are not made up: the next one is the first after now."""
    try:
        following = next_due(due.cron, due.timezone, max(now, due.next_run_at))
    except ScheduleInvalid:
        following = None
    schedule = repository.advance_schedule(
        conn,
        schedule_id=due.id,
        seen=due.next_run_at,
        next_run_at=following or due.next_run_at,
    )
    if schedule is None:
        return None
    job_id = enqueue_sync(
        conn,
        schedule.kind,
        schedule.payload,
        account_id=schedule.account_id,
        run_at=due.next_run_at,
        unique_key=f"schedule:{due.id}:{due.next_run_at.isoformat()}",
        queue=schedule.queue,
        priority=schedule.priority,
        max_attempts=schedule.max_attempts,
    )
    repository.note_schedule_run(conn, due.id, job_id)
    return job_id


# --- reading and operating -----------------------------------------------------------------


def _job_id(job_id: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(job_id)
    except ValueError:
        return None


async def get(session: AsyncSession, job_id: uuid.UUID | str) -> Job:
    key = _job_id(job_id)
    job = await session.get(Job, key) if key is not None else None
    if job is None:
        raise JobNotFound(f"No job {str(job_id)!r}.", param="job_id")
    return job


async def get_for_account(
    session: AsyncSession, account_id: uuid.UUID, job_id: uuid.UUID | str
) -> Job:
    """One of the account's jobs; another account's job is not found."""
    key = _job_id(job_id)
    job = await session.get(Job, key) if key is not None else None
    if job is None or job.account_id != account_id:
        raise JobNotFound(f"No job {str(job_id)!r}.", param="job_id")
    return job


def account_status(status: str) -> str:
    """A job's status as accounts see it: a job that used up its attempts is `failed` to them
    (`dead` is the operator's word for it)."""
    return "failed" if status == "dead" else status


async def list_page(
    session: AsyncSession,
    *,
    kind: str | None = None,
    status: str | None = None,
    queue: str | None = None,
    limit: int,
    after: uuid.UUID | None = None,
) -> Sequence[Job]:
    return await repository.list_page(
        session, kind=kind, status=status, queue=queue, limit=limit, after=after
    )


async def cancel(session: AsyncSession, job_id: uuid.UUID | str) -> Job:
    """A queued job is cancelled at once; a running one is marked, and its handler sees it at
    its next progress report or when it returns (its result is then discarded)."""
    job = await get(session, job_id)
    now = utcnow()
    if not await repository.cancel_queued(
        session, job.id, now
    ) and not await repository.request_cancel(session, job.id, now):
        await session.refresh(job)
        raise JobFinished(
            f"Job {str(job.id)!r} has already finished ({job.status}); there is nothing to "
            "cancel. POST /admin/jobs/{id}/retry queues a dead, failed or cancelled job again.",
            param="job_id",
        )
    await session.refresh(job)
    return job


async def retry(session: AsyncSession, job_id: uuid.UUID | str) -> Job:
    """A dead, failed or cancelled job queued again, with all its attempts."""
    job = await get(session, job_id)
    try:
        requeued = await repository.requeue(session, job.id, utcnow())
    except IntegrityError:
        raise JobKeyTaken(
            f"Another job with the unique key {job.unique_key!r} is queued or running; cancel "
            "it or wait for it to finish first.",
            param="job_id",
        ) from None
    if not requeued:
        raise JobNotRetryable(
            f"Job {str(job.id)!r} is {job.status}; only dead, failed or cancelled jobs can be "
            "retried.",
            param="job_id",
        )
    wake_after_commit(session.sync_session)
    await session.refresh(job)
    return job
