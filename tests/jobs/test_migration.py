"""Migration 0007 on a fresh database (SQLite, or PostgreSQL with AIVAX_TEST_DATABASE_URL): a
job written before it is claimed and run after it, and it goes down and up again."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from aivax.db import Database
from aivax.jobs import JobContext
from aivax.migrate import alembic_config, upgrade_to_head
from aivax.services import AppServices
from tests.fixtures.databases import create_database, drop_database
from tests.fixtures.factories import make_account
from tests.jobs.support import make_runner, read_job, unique_kind


@pytest.fixture
async def fresh_database_url(tmp_path: Path) -> AsyncIterator[str]:
    server_url = os.environ.get("AIVAX_TEST_DATABASE_URL")
    if not server_url:
        yield f"sqlite+aiosqlite:///{tmp_path / 'jobs-migration.db'}"
        return
    name, url = await create_database(server_url, "aivax_jobs_migration")
    try:
        yield url
    finally:
        await drop_database(server_url, name)


async def test_a_job_written_before_0007_runs_after_it_and_0007_goes_down_and_up(
    fresh_database_url: str, services: AppServices
) -> None:
    config = alembic_config(fresh_database_url)
    await asyncio.to_thread(upgrade_to_head, fresh_database_url)
    database = Database(services.settings.model_copy(update={"database_url": fresh_database_url}))
    try:
        account = await make_account(replace(services, database=database))
        await asyncio.to_thread(command.downgrade, config, "0006")
        kind, job_id = unique_kind("old"), uuid.uuid4()
        async with database.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, account_id, kind, payload, status, progress_done, "
                    "progress_total, attempts, created_at, updated_at) VALUES (:id, :account, "
                    ":kind, '{}', 'queued', 0, 1, 0, :now, :now)"
                ),
                {
                    "id": job_id if database.is_postgresql else job_id.hex,
                    "account": account.id if database.is_postgresql else account.id.hex,
                    "kind": kind,
                    "now": datetime(2026, 12, 1, 10, tzinfo=UTC)
                    if database.is_postgresql
                    else "2026-12-01 10:00:00.000000",
                },
            )
        await asyncio.to_thread(command.upgrade, config, "head")
        await database.engine.dispose()
        runner = make_runner(database)

        async def handler(context: JobContext) -> dict[str, int]:
            return {"attempt": context.attempts}

        runner.register(kind, handler)
        assert await runner.work_once()
        job = await read_job(database, job_id)
        assert (job.status, job.queue, job.priority, job.result) == (
            "done",
            "default",
            0,
            {"attempt": 1},
        )
        await asyncio.to_thread(command.downgrade, config, "0006")
        await asyncio.to_thread(command.upgrade, config, "head")
    finally:
        await database.dispose()
