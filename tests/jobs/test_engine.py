"""The job engine on the test database (SQLite, or PostgreSQL with AIVAX_TEST_DATABASE_URL):
transactional enqueue, delays, retries with backoff, dead jobs, cancellation, unique keys,
queues and priorities, leases, and cron schedules fired once across runners."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from aivax.db import Database
from aivax.jobs import JobContext, JobFailed, enqueue, put_schedule, remove_schedule
from aivax.jobs import service as job_service
from aivax.jobs.service import next_due
from aivax.models import Job
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys
from tests.jobs.support import Clock, make_runner, read_job, unique_kind


async def _enqueue(
    database: Database,
    kind: str,
    account: AccountWithKeys,
    clock: Clock | None = None,
    **options: Any,
) -> Job:
    """Committed; due at once on the test's clock, when it has one."""
    if clock is not None:
        options.setdefault("run_at", clock.now)
    async with database.sessions() as session:
        job = await enqueue(
            session, kind, options.pop("payload", {}), account_id=account.id, **options
        )
        await session.commit()
    return job


@pytest.fixture
async def second_database(services: AppServices) -> AsyncIterator[Database]:
    """A second connection pool on the same database, as another process would have."""
    database = Database(services.settings)
    yield database
    await database.dispose()


async def test_a_job_enqueued_in_a_rolled_back_transaction_never_runs(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, ran = unique_kind("rollback"), []
    runner = make_runner(services.database)

    async def handler(context: JobContext) -> None:
        ran.append(context.id)

    runner.register(kind, handler)
    async with services.database.sessions() as session:
        job = await enqueue(session, kind, {}, account_id=account.id)
        await session.flush()
        assert await session.scalar(select(func.count()).where(Job.kind == kind)) == 1
        await session.rollback()
    assert not await runner.work_once()
    async with services.database.sessions() as session:
        assert await session.get(Job, job.id) is None
    committed = await _enqueue(services.database, kind, account)
    assert await runner.work_once()
    assert ran == [committed.id]


async def test_a_commit_wakes_the_local_runner_at_once(
    second_database: Database, account: AccountWithKeys
) -> None:
    kind, ran = unique_kind("wake"), asyncio.Event()
    runner = make_runner(second_database, poll_seconds=3600)  # only a wake starts the job

    async def handler(_: JobContext) -> None:
        ran.set()

    runner.register(kind, handler)
    runner.start()
    try:
        await runner.wait_idle()
        await _enqueue(second_database, kind, account)
        await asyncio.wait_for(ran.wait(), 20)
    finally:
        await runner.stop()


async def test_a_job_committed_while_the_runner_looks_is_run_before_it_calls_itself_idle(
    second_database: Database, account: AccountWithKeys
) -> None:
    """The claim looked before the job's commit; the wake that commit sent must make the
    runner look again, not report idle (wait_idle would return with the job still queued)."""
    kind, ran = unique_kind("race"), asyncio.Event()
    runner = make_runner(second_database, poll_seconds=3600)

    async def handler(_: JobContext) -> None:
        ran.set()

    runner.register(kind, handler)
    claim, looked = runner.claim_one, asyncio.Event()

    async def claim_that_looked_first() -> Any:
        taken = await claim()
        if not looked.is_set():  # the first look: the job commits while it is "in flight"
            looked.set()
            await _enqueue(second_database, kind, account)
        return taken

    runner.claim_one = claim_that_looked_first  # type: ignore[method-assign]
    runner.start()
    try:
        await runner.wait_idle(timeout=20)
        assert ran.is_set()
    finally:
        await runner.stop()


async def test_a_delayed_job_waits_for_its_run_at(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("delayed"), Clock()
    runner = make_runner(services.database, clock)

    async def handler(_: JobContext) -> dict[str, Any]:
        return {"ok": True}

    runner.register(kind, handler)
    job = await _enqueue(services.database, kind, account, run_at=clock.now + timedelta(seconds=60))
    assert not await runner.work_once()
    clock.advance(59)
    assert not await runner.work_once()
    clock.advance(2)
    assert await runner.work_once()
    done = await read_job(services.database, job.id)
    assert (done.status, done.result, done.attempts) == ("done", {"ok": True}, 1)


async def test_retries_back_off_exponentially_and_a_dead_job_keeps_its_last_error(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("flaky"), Clock()
    runner = make_runner(services.database, clock, rng=random.Random(7))

    async def handler(context: JobContext) -> None:
        raise ValueError(f"upstream said no (attempt {context.attempts})")

    runner.register(kind, handler, max_attempts=3, backoff_seconds=10, backoff_max_seconds=15)
    job = await _enqueue(services.database, kind, account, clock)
    # Attempt n waits between half and all of min(10 * 2^(n-1), 15) seconds.
    for attempt, ceiling in ((1, 10.0), (2, 15.0)):
        failed_at = clock.now
        assert await runner.work_once()
        row = await read_job(services.database, job.id)
        assert (row.status, row.attempts) == ("queued", attempt)
        assert row.error == f"ValueError: upstream said no (attempt {attempt})"
        delay = (row.run_at - failed_at).total_seconds()
        assert ceiling / 2 <= delay <= ceiling
        assert not await runner.work_once()  # not before its backoff is over
        clock.now = row.run_at
    assert await runner.work_once()
    dead = await read_job(services.database, job.id)
    assert (dead.status, dead.attempts) == ("dead", 3)
    assert dead.error == "ValueError: upstream said no (attempt 3)"
    assert dead.finished_at is not None
    assert job_service.account_status(dead.status) == "failed"
    clock.advance(3600)
    assert not await runner.work_once()  # dead jobs stay dead


async def test_a_job_enqueued_with_its_own_attempt_limit_and_a_job_failed_for_good(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("limits"), Clock()
    runner = make_runner(services.database, clock)

    async def handler(context: JobContext) -> None:
        if context.payload.get("permanent"):
            raise JobFailed("the document no longer exists")
        raise RuntimeError("try again")

    runner.register(kind, handler, max_attempts=5)
    once = await _enqueue(services.database, kind, account, clock, max_attempts=1)
    refused = await _enqueue(services.database, kind, account, clock, payload={"permanent": True})
    assert await runner.work_once()
    assert await runner.work_once()
    once_row, refused_row = (
        await read_job(services.database, once.id),
        await read_job(services.database, refused.id),
    )
    assert (once_row.status, once_row.attempts) == ("dead", 1)
    assert (refused_row.status, refused_row.attempts) == ("failed", 1)
    assert refused_row.error == "JobFailed: the document no longer exists"


async def test_a_queued_job_is_cancelled_at_once_and_a_finished_one_cannot_be(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind = unique_kind("cancel-queued")
    runner = make_runner(services.database)

    async def handler(_: JobContext) -> None:
        return None

    runner.register(kind, handler)
    job = await _enqueue(services.database, kind, account)
    async with services.database.sessions() as session:
        cancelled = await job_service.cancel(session, job.id)
        await session.commit()
    assert cancelled.status == "cancelled"
    assert not await runner.work_once()
    async with services.database.sessions() as session:
        with pytest.raises(job_service.JobFinished):
            await job_service.cancel(session, job.id)


@pytest.mark.parametrize("reports_progress", [True, False])
async def test_a_running_job_sees_its_cancellation_and_its_result_is_discarded(
    services: AppServices, account: AccountWithKeys, reports_progress: bool
) -> None:
    kind = unique_kind("cancel-running")
    runner = make_runner(services.database)
    started, proceed, after_progress = asyncio.Event(), asyncio.Event(), []

    async def handler(context: JobContext) -> dict[str, Any]:
        started.set()
        await proceed.wait()
        if reports_progress:
            await context.progress(1, 2)
            after_progress.append(True)  # never reached: progress raised JobCancelled
        return {"should": "be discarded"}

    runner.register(kind, handler)
    job = await _enqueue(services.database, kind, account)
    working = asyncio.create_task(runner.work_once())
    await asyncio.wait_for(started.wait(), 20)
    async with services.database.sessions() as session:
        marked = await job_service.cancel(session, job.id)
        await session.commit()
    assert (marked.status, marked.cancel_requested) == ("running", True)
    proceed.set()
    assert await working
    row = await read_job(services.database, job.id)
    assert (row.status, row.result) == ("cancelled", None)
    assert after_progress == []


async def test_a_unique_key_returns_the_active_job_and_is_free_again_once_it_finished(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, key = unique_kind("unique"), f"reply:{uuid.uuid4()}"
    runner = make_runner(services.database)

    async def handler(_: JobContext) -> None:
        return None

    runner.register(kind, handler)
    first = await _enqueue(services.database, kind, account, unique_key=key)
    async with services.database.sessions() as session:
        again = await enqueue(session, kind, {}, account_id=account.id, unique_key=key)
        twice = await enqueue(session, kind, {}, account_id=account.id, unique_key=key)
        await session.commit()
    assert first.id == again.id == twice.id
    assert await runner.work_once()
    assert not await runner.work_once()  # one job ran, not three
    later = await _enqueue(services.database, kind, account, unique_key=key)
    assert later.id != first.id
    async with services.database.sessions() as session:
        count = await session.scalar(select(func.count()).where(Job.unique_key == key))
    assert count == 2


async def test_higher_priority_first_then_earlier_run_at_and_queues_limit_a_worker(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock, order = unique_kind("order"), Clock(), []
    start = clock.now

    async def handler(context: JobContext) -> None:
        order.append(context.payload["name"])

    jobs = [
        ("late-low", "default", 0, start - timedelta(seconds=1)),
        ("early-low", "default", 0, start - timedelta(seconds=30)),
        ("high", "default", 10, start),
        ("other-queue", "bulk", 100, start - timedelta(seconds=60)),
    ]
    for name, queue, priority, run_at in jobs:
        await _enqueue(
            services.database,
            kind,
            account,
            payload={"name": name},
            queue=queue,
            priority=priority,
            run_at=run_at,
        )
    default_only = make_runner(services.database, clock, queues=["default"])
    default_only.register(kind, handler)
    while await default_only.work_once():
        pass
    assert order == ["high", "early-low", "late-low"]
    everything = make_runner(services.database, clock)
    everything.register(kind, handler)
    assert await everything.work_once()
    assert order[-1] == "other-queue"


async def test_the_heartbeat_renews_the_lease_of_a_running_job(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("heartbeat"), Clock()
    runner = make_runner(services.database, clock, lease_seconds=30)
    started, proceed = asyncio.Event(), asyncio.Event()

    async def handler(_: JobContext) -> None:
        started.set()
        await proceed.wait()

    runner.register(kind, handler)
    job = await _enqueue(services.database, kind, account, clock)
    working = asyncio.create_task(runner._fill_slots())  # as the loop does: runs in a task
    await asyncio.wait_for(started.wait(), 20)
    assert await working == 1
    first = await read_job(services.database, job.id)
    assert first.locked_until == clock.now + timedelta(seconds=30)
    clock.advance(100)  # far past the first lease: only a renewal keeps the job
    await runner.renew_leases()
    renewed = await read_job(services.database, job.id)
    assert renewed.locked_until == clock.now + timedelta(seconds=30)
    assert renewed.locked_by == runner.worker_id
    proceed.set()
    await asyncio.wait_for(runner.drain(), 20)
    assert (await read_job(services.database, job.id)).status == "done"


async def test_a_job_whose_lease_expired_is_resumed_and_the_stalled_worker_is_discarded(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("takeover"), Clock()
    stalled = make_runner(services.database, clock, lease_seconds=30)
    healthy = make_runner(services.database, clock, lease_seconds=30)
    started, never = asyncio.Event(), asyncio.Event()

    async def hangs(_: JobContext) -> dict[str, Any]:
        started.set()
        await never.wait()
        return {"by": "stalled"}

    async def finishes(_: JobContext) -> dict[str, Any]:
        return {"by": "healthy"}

    stalled.register(kind, hangs)
    healthy.register(kind, finishes)
    job = await _enqueue(services.database, kind, account, clock)
    await stalled._fill_slots()
    await asyncio.wait_for(started.wait(), 20)
    assert not await healthy.work_once()  # leased
    clock.advance(31)
    assert await healthy.work_once()
    await stalled.renew_leases()  # it notices it lost the job, and stops it
    await asyncio.wait_for(stalled.drain(), 20)
    row = await read_job(services.database, job.id)
    assert (row.status, row.attempts, row.result) == ("done", 2, {"by": "healthy"})


async def test_a_job_lost_on_its_last_attempt_is_dead(
    services: AppServices, account: AccountWithKeys
) -> None:
    kind, clock = unique_kind("crash-loop"), Clock()
    runner = make_runner(services.database, clock)

    async def handler(_: JobContext) -> None:
        raise AssertionError("a job out of attempts must not run again")

    runner.register(kind, handler, max_attempts=2)
    job = await _enqueue(services.database, kind, account, clock)
    async with services.database.sessions() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(status="running", attempts=2, locked_until=clock.now - timedelta(seconds=1))
        )
        await session.commit()
    assert await runner.work_once()
    row = await read_job(services.database, job.id)
    assert (row.status, row.attempts) == ("dead", 3)
    assert row.error is not None
    assert "lease expired" in row.error


async def test_stopping_a_runner_queues_its_running_jobs_again_at_once(
    second_database: Database, account: AccountWithKeys
) -> None:
    kind, started = unique_kind("shutdown"), asyncio.Event()
    runner = make_runner(second_database)

    async def handler(_: JobContext) -> None:
        started.set()
        await asyncio.sleep(600)

    runner.register(kind, handler)
    runner.start()
    job = await _enqueue(second_database, kind, account)
    await asyncio.wait_for(started.wait(), 20)
    await runner.stop()
    row = await read_job(second_database, job.id)
    assert (row.status, row.attempts, row.locked_by) == ("queued", 0, None)


def test_cron_due_times_are_read_in_the_schedule_time_zone() -> None:
    after = datetime(2031, 3, 7, 23, 0, tzinfo=UTC)
    assert next_due("0 9 * * *", "America/Sao_Paulo", after) == datetime(
        2031, 3, 8, 12, 0, tzinfo=UTC
    )
    assert next_due("*/15 * * * *", "UTC", after) == datetime(2031, 3, 7, 23, 15, tzinfo=UTC)
    with pytest.raises(job_service.ScheduleInvalid, match="time zone"):
        next_due("0 9 * * *", "Mars/Olympus", after)
    with pytest.raises(job_service.ScheduleInvalid, match="cron"):
        next_due("every day", "UTC", after)


async def test_a_cron_schedule_fires_exactly_once_per_due_time_across_two_runners(
    services: AppServices, second_database: Database, account: AccountWithKeys
) -> None:
    kind = unique_kind("cron")
    # Far in the future, so runners on the real clock never find it due.
    clock = Clock(datetime(2031, 1, 6, 8, 58, 30, tzinfo=UTC))
    name = f"test:{kind}"
    async with services.database.sessions() as session:
        schedule = await put_schedule(
            session,
            name=name,
            account_id=account.id,
            kind=kind,
            cron="*/5 * * * *",
            timezone="Europe/Berlin",
            payload={"report": "daily"},
            queue="reports",
            now=clock.now,
        )
        await session.commit()
    assert schedule.next_run_at == datetime(2031, 1, 6, 9, 0, tzinfo=UTC)
    runners = [make_runner(services.database, clock), make_runner(second_database, clock)]
    fired = []
    for _ in range(4):
        clock.advance(5 * 60)
        counts = await asyncio.gather(*(runner.fire_schedules() for runner in runners))
        counts += await asyncio.gather(*(runner.fire_schedules() for runner in runners))
        fired.append(sum(counts))
    assert fired == [1, 1, 1, 1]
    async with services.database.sessions() as session:
        jobs = (await session.scalars(select(Job).where(Job.kind == kind))).all()
        assert await remove_schedule(session, name)
        await session.commit()
    due = sorted(job.run_at for job in jobs)
    assert due == [datetime(2031, 1, 6, 9, 5 * i, tzinfo=UTC) for i in range(4)]
    assert {(job.queue, job.payload["report"]) for job in jobs} == {("reports", "daily")}
    assert {job.unique_key for job in jobs} == {
        f"schedule:{schedule.id}:{time.isoformat()}" for time in due
    }
