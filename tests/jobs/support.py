"""Helpers for the job engine's tests: a kind no other runner knows, a clock the test moves,
runners on the test database, and reading a job back."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aivax.db import Database
from aivax.jobs import JobRunner
from aivax.kit.clock import utcnow
from aivax.models import Job


def unique_kind(name: str) -> str:
    """Each test's own kind: the app's runner (and other tests') never claim it."""
    return f"t{secrets.token_hex(4)}.{name}"[:40]


@dataclass
class Clock:
    now: datetime = field(default_factory=utcnow)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_runner(database: Database, clock: Clock | None = None, **options: Any) -> JobRunner:
    options.setdefault("poll_seconds", 0.05)
    options.setdefault("lease_seconds", 30)
    if clock is not None:
        options["clock"] = clock
    return JobRunner(database, **options)


async def read_job(database: Database, job_id: uuid.UUID) -> Job:
    async with database.sessions() as session:
        job = await session.get(Job, job_id)
    assert job is not None
    return job
