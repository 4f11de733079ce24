"""The worker: claims jobs with a lease, runs their handlers, renews the leases of running jobs,
retries failures with exponential backoff and jitter, and fires due schedules.

Any number of runners (threads of `aivax serve`, `aivax worker` processes, replicas) share one
database. A job whose worker died (crash, `kill -9`, lost machine) is claimed again once its
lease expires, and that counts as an attempt. Handlers must therefore be idempotent: re-running
one after a crash redoes only what did not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection

from aivax.config import Settings
from aivax.db import Database
from aivax.jobs import repository, service
from aivax.jobs.repository import ClaimedJob
from aivax.kit.clock import as_utc, utcnow
from aivax.metrics import NO_METRICS, Metrics

logger = logging.getLogger("aivax.jobs")

DEFAULT_MAX_ATTEMPTS = 3
SCHEDULES_PER_TICK = 50
ERROR_CHARS = 2000

Handler = Callable[["JobContext"], Awaitable[dict[str, Any] | None]]


class JobCancelled(Exception):
    """Raised by `JobContext.progress` when the operator cancelled the job."""


class JobLeaseLost(Exception):
    """Raised by `JobContext.progress` when the job is no longer this worker's: its lease
    expired and another worker took it over (whatever this one does next is discarded)."""


class JobFailed(Exception):
    """Raised by a handler for a failure no retry can fix: the job is `failed` at once."""


@dataclass(frozen=True, slots=True)
class Registration:
    handler: Handler
    max_attempts: int
    backoff_seconds: float
    backoff_max_seconds: float


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # done | queued (a retry) | dead | failed | cancelled
    result: dict[str, Any] | None = None
    error: str | None = None
    retry_at: datetime | None = None


class JobContext:
    """What a handler gets: the job's values, whether cancellation was requested, and a way to
    report progress (which also renews the lease and notices cancellation)."""

    def __init__(self, runner: JobRunner, job: ClaimedJob) -> None:
        self.runner = runner
        self.id = job.id
        self.account_id = job.account_id
        self.kind = job.kind
        self.queue = job.queue
        self.payload = job.payload
        self.attempts = job.attempts
        self.max_attempts = job.max_attempts
        self.cancel_requested = job.cancel_requested
        self.lease_lost = False

    async def progress(self, done: int, total: int | None = None) -> None:
        now = self.runner.clock()
        values: dict[str, Any] = {
            "progress_done": done,
            "locked_until": now + self.runner.lease,
            "updated_at": now,
        }
        if total is not None:
            values["progress_total"] = total
        state = await self.runner.database.run_write(
            lambda conn: repository.progress(
                conn,
                job_id=self.id,
                worker=self.runner.worker_id,
                attempt=self.attempts,
                values=values,
            )
        )
        if state is None:
            self.lease_lost = True
            raise JobLeaseLost(f"job {self.id} was taken over by another worker")
        self.cancel_requested = self.cancel_requested or state
        if self.cancel_requested:
            raise JobCancelled(f"job {self.id} was cancelled")


class JobRunner:
    def __init__(
        self,
        database: Database,
        *,
        poll_seconds: float,
        lease_seconds: float,
        concurrency: int = 1,
        queues: list[str] | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.lease = timedelta(seconds=lease_seconds)
        self.concurrency = concurrency
        self.queues = list(queues or [])
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.worker_id = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.handlers: dict[str, Registration] = {}
        self._running: dict[uuid.UUID, tuple[asyncio.Task[None], JobContext]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._schedules_checked = float("-inf")

    @classmethod
    def from_settings(
        cls, database: Database, settings: Settings, metrics: Metrics = NO_METRICS
    ) -> JobRunner:
        return cls(
            database,
            poll_seconds=settings.jobs_poll_seconds,
            lease_seconds=settings.jobs_lease_seconds,
            concurrency=settings.jobs_concurrency,
            queues=settings.jobs_queues,
            metrics=metrics,
        )

    def register(
        self,
        kind: str,
        handler: Handler,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_seconds: float = 5.0,
        backoff_max_seconds: float = 3600.0,
    ) -> None:
        """Run jobs of `kind` with `handler`. A runner claims only kinds it has a handler for,
        so a job of a kind no running worker knows waits, queued, for one that does."""
        self.handlers[kind] = Registration(
            handler, max_attempts, backoff_seconds, backoff_max_seconds
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        # Sessions of this process wake this runner when a transaction that enqueued commits.
        self.database.sessions.configure(info={service.WAKE_KEY: self.wake})
        self._task = self._loop.create_task(self._run())
        self._heartbeat = self._loop.create_task(self._renew_forever())

    async def stop(self) -> None:
        """Stop claiming; jobs still running are interrupted and queued again at once (the
        interrupted attempt is not counted)."""
        self._stopping = True
        for task in (self._task, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._heartbeat = None
        running = [task for task, _ in self._running.values()]
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """A job was queued by this process: look now instead of at the next poll. Safe from
        any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._poke()
        else:
            loop.call_soon_threadsafe(self._poke)

    def _poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self, timeout: float = 60.0) -> None:
        """Tests and the CLI: wait until this runner has nothing to run now."""
        self.wake()
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def drain(self) -> None:
        """Wait until the jobs running here have ended."""
        while self._running:
            tasks = [task for task, _ in self._running.values()]
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # Cleared before looking: a wake() during the claim is never lost.
            self._wake.clear()
            await self._fire_schedules_if_due()
            claimed = await self._fill_slots()
            # A wake() during the claim may be for a job committed after the claim looked:
            # look again before calling this runner idle.
            if not claimed and not self._running and not self._wake.is_set():
                self._idle.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def _fill_slots(self) -> int:
        claimed = 0
        while len(self._running) < self.concurrency and self.handlers:
            try:
                job = await self.claim_one()
            except Exception:
                logger.exception("claiming a job failed; retrying at the next poll")
                return claimed
            if job is None:
                return claimed
            context = JobContext(self, job)
            task = asyncio.get_running_loop().create_task(self._execute(context))
            self._running[job.id] = (task, context)
            task.add_done_callback(partial(self._done, job.id))
            claimed += 1
        return claimed

    def _done(self, job_id: uuid.UUID, _: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._poke()

    async def claim_one(self) -> ClaimedJob | None:
        now = self.clock()
        kinds, queues = sorted(self.handlers), self.queues

        def take(conn: Connection) -> ClaimedJob | None:
            return repository.claim(
                conn,
                now=now,
                lease_until=now + self.lease,
                worker=self.worker_id,
                kinds=kinds,
                queues=queues,
            )

        job = await self.database.run_write(take)
        if job is not None:
            self.metrics.job_claimed(job.kind, (now - as_utc(job.run_at)).total_seconds())
        return job

    async def work_once(self) -> bool:
        """Claim one job and run it to its end (tests, and a CLI that drains): whether there
        was one."""
        job = await self.claim_one()
        if job is None:
            return False
        await self._execute(JobContext(self, job))
        return True

    # --- running one job ---------------------------------------------------------------------

    async def _execute(self, context: JobContext) -> None:
        registration = self.handlers.get(context.kind)
        if registration is None:  # unregistered since the claim: let another worker take it
            await self._release(context)
            return
        limit = context.max_attempts or registration.max_attempts
        if context.attempts > limit:
            # Claimed again after the worker running its last attempt was lost.
            await self._finish(
                context,
                Outcome(
                    "dead",
                    error=f"the worker running attempt {context.attempts - 1} of {limit} "
                    "stopped before it finished (its lease expired)",
                ),
            )
            return
        started = time.perf_counter()
        try:
            outcome = await self._outcome(context, registration, limit)
        except asyncio.CancelledError:
            if self._stopping:
                await asyncio.shield(self._release(context))
                raise
            return  # the lease was lost: another worker owns the job now
        if outcome is not None:
            await self._finish(context, outcome, ran=time.perf_counter() - started)

    async def _outcome(
        self, context: JobContext, registration: Registration, limit: int
    ) -> Outcome | None:
        try:
            result = await registration.handler(context)
        except JobCancelled:
            return Outcome("cancelled")
        except JobLeaseLost:
            return None
        except JobFailed as exc:
            return Outcome("failed", error=_error_text(exc))
        except Exception as exc:
            if context.lease_lost:
                return None
            logger.exception("job %s (%s) failed", context.id, context.kind)
            if context.attempts >= limit:
                return Outcome("dead", error=_error_text(exc))
            delay = self.backoff(registration, context.attempts)
            return Outcome(
                "queued", error=_error_text(exc), retry_at=self.clock() + timedelta(seconds=delay)
            )
        return Outcome("done", result=result)

    def backoff(self, registration: Registration, attempt: int) -> float:
        """Seconds before the next attempt: doubled after each failure, capped, and spread
        over its upper half so that jobs that failed together do not retry together."""
        ceiling = min(
            registration.backoff_seconds * 2.0 ** (attempt - 1), registration.backoff_max_seconds
        )
        return ceiling / 2 + self.rng.random() * ceiling / 2

    async def _finish(self, context: JobContext, outcome: Outcome, *, ran: float = 0.0) -> None:
        """Write the outcome of an attempt that ran for `ran` seconds (unless the job is no
        longer this worker's)."""
        now = self.clock()

        def write(conn: Connection) -> str | None:
            cancel_requested = repository.lock_for_finish(
                conn, job_id=context.id, worker=self.worker_id, attempt=context.attempts, now=now
            )
            if cancel_requested is None:
                return None  # no longer ours: whatever it produced is discarded
            final = Outcome("cancelled") if cancel_requested else outcome
            values: dict[str, Any] = {"status": final.status, "updated_at": now}
            if final.status == "queued":
                values.update(error=final.error, run_at=final.retry_at)
            else:
                values.update(result=final.result, finished_at=now)
                if final.error is not None:
                    values["error"] = final.error
            repository.set_outcome(conn, job_id=context.id, values=values)
            return final.status

        written = await self.database.run_write(write)
        if written is not None:
            self.metrics.job_finished(context.kind, written, ran)
        if outcome.status == "queued":
            self._poke()  # look again once its backoff is over (at the latest, the next poll)

    async def _release(self, context: JobContext) -> None:
        now = self.clock()
        try:
            await self.database.run_write(
                lambda conn: repository.release(
                    conn,
                    job_id=context.id,
                    worker=self.worker_id,
                    attempt=context.attempts,
                    now=now,
                )
            )
        except Exception:
            logger.exception("job %s could not be released; its lease will expire", context.id)

    async def active_counts(self) -> dict[tuple[str, str], int]:
        """Jobs queued and running now in the whole database, by (kind, status); 0 for the
        kinds this runner knows that have none."""
        async with self.database.sessions() as session:
            counts = await repository.active_counts(session)
        known = {(kind, status): 0 for kind in self.handlers for status in repository.ACTIVE}
        return known | counts

    # --- leases and schedules ----------------------------------------------------------------

    async def _renew_forever(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_leases()
            except Exception:
                logger.exception("renewing job leases failed; retrying")

    async def renew_leases(self) -> None:
        """Extend the leases of the jobs running here; note cancellations; stop the jobs whose
        lease was lost (another worker took them over after this one stalled)."""
        if not self._running:
            return
        ids = list(self._running)
        until = self.clock() + self.lease
        held = await self.database.run_write(
            lambda conn: repository.renew(conn, worker=self.worker_id, job_ids=ids, until=until)
        )
        for job_id in ids:
            entry = self._running.get(job_id)
            if entry is None:
                continue
            task, context = entry
            if job_id in held:
                context.cancel_requested = context.cancel_requested or held[job_id]
            elif not task.done():
                logger.warning("job %s was taken over by another worker; stopping it", job_id)
                context.lease_lost = True
                task.cancel()

    async def _fire_schedules_if_due(self) -> None:
        if time.monotonic() - self._schedules_checked < self.poll_seconds:
            return
        self._schedules_checked = time.monotonic()
        try:
            await self.fire_schedules()
        except Exception:
            logger.exception("firing schedules failed; retrying at the next poll")

    async def fire_schedules(self) -> int:
        """Enqueue the runs of the schedules that are due: how many this runner fired (another
        runner may fire some of them; each due time fires once)."""
        now = self.clock()
        async with self.database.engine.connect() as conn:
            due = await conn.run_sync(
                lambda sync: repository.due_schedules(sync, now=now, limit=SCHEDULES_PER_TICK)
            )
        fired = 0
        for schedule in due:
            job_id = await self.database.run_write(
                partial(service.fire_schedule, due=schedule, now=now)
            )
            fired += job_id is not None
        return fired


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
