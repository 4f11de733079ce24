"""Durable background jobs: rows in `jobs`, claimed with a lease by one conditional UPDATE, so
any number of replicas can run workers and a job whose worker died (crash, restart, deploy) is
resumed once its lease expires. Handlers are idempotent: re-running one after a crash redoes
only what did not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Connection

from aivax.db import Database
from aivax.kit.clock import utcnow
from aivax.models import Job

logger = logging.getLogger("aivax.jobs")

MAX_ATTEMPTS = 3
Handler = Callable[["JobContext"], Awaitable[dict[str, Any] | None]]


class JobContext:
    """What a handler gets: the job's row values and a way to report progress (which also
    renews the lease)."""

    def __init__(self, runner: JobRunner, job: dict[str, Any]) -> None:
        self.runner = runner
        self.id: uuid.UUID = job["id"]
        self.account_id: uuid.UUID = job["account_id"]
        self.kind: str = job["kind"]
        self.payload: dict[str, Any] = job["payload"]
        self.attempts: int = job["attempts"]

    async def progress(self, done: int, total: int | None = None) -> None:
        values: dict[str, Any] = {
            "progress_done": done,
            "locked_until": utcnow() + self.runner.lease,
            "updated_at": utcnow(),
        }
        if total is not None:
            values["progress_total"] = total
        await self.runner.database.run_write(
            lambda conn: conn.execute(update(Job).where(Job.id == self.id).values(**values))
        )


class JobRunner:
    def __init__(self, database: Database, *, poll_seconds: float, lease_seconds: float) -> None:
        self.database = database
        self.poll_seconds = poll_seconds
        self.lease = timedelta(seconds=lease_seconds)
        self.handlers: dict[str, Handler] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    def register(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """A job was queued by this process: look now instead of at the next poll."""
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # Cleared before looking: a wake() during the claim is never lost.
            self._wake.clear()
            try:
                job = await self.database.run_write(self._claim)
            except Exception:
                logger.exception("claiming a job failed; retrying")
                job = None
            if job is None:
                if self._wake.is_set():
                    continue  # a job was queued while we looked: look again
                self._idle.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                continue
            await self._execute(job)

    def _claim(self, conn: Connection) -> dict[str, Any] | None:
        now = utcnow()
        claimable = or_(
            Job.status == "queued", (Job.status == "running") & (Job.locked_until < now)
        )
        candidates = conn.execute(
            select(Job.id).where(claimable).order_by(Job.created_at).limit(5)
        ).all()
        for (job_id,) in candidates:
            won = conn.execute(
                update(Job)
                .where(Job.id == job_id, claimable)
                .values(
                    status="running",
                    attempts=Job.attempts + 1,
                    locked_until=now + self.lease,
                    updated_at=now,
                )
            ).rowcount
            if won:
                row = conn.execute(
                    select(Job.id, Job.account_id, Job.kind, Job.payload, Job.attempts).where(
                        Job.id == job_id
                    )
                ).one()
                return dict(row._mapping)
        return None

    async def _execute(self, job: dict[str, Any]) -> None:
        context = JobContext(self, job)
        handler = self.handlers.get(context.kind)
        status, error, result = "done", None, None
        if handler is None:
            status, error = "failed", f"no handler for job kind {context.kind!r}"
        else:
            try:
                result = await handler(context)
            except asyncio.CancelledError:
                raise  # the lease expires and another worker (or this one, restarted) resumes
            except Exception as exc:
                logger.exception("job %s (%s) failed", context.id, context.kind)
                status = "failed" if context.attempts >= MAX_ATTEMPTS else "queued"
                error = f"{type(exc).__name__}: {exc}"[:2000]
        finished = utcnow() if status != "queued" else None
        await self.database.run_write(
            lambda conn: conn.execute(
                update(Job)
                .where(Job.id == context.id)
                .values(
                    status=status,
                    error=error,
                    result=result,
                    locked_until=None,
                    finished_at=finished,
                    updated_at=utcnow(),
                )
            )
        )

    async def wait_idle(self, timeout: float = 60.0) -> None:
        """Tests and the CLI: wait until no queued job is left for this worker."""
        self.wake()
        await asyncio.wait_for(self._idle.wait(), timeout)
