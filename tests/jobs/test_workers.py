"""`aivax worker` processes on the test database: two of them never run the same job, a worker
killed with SIGKILL mid-job has its job resumed by the other once the lease expires, and a cron
schedule fires once per due time however many workers look."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from aivax.config import Settings
from aivax.jobs import enqueue, put_schedule, remove_schedule
from aivax.models import Job
from aivax.services import AppServices
from tests.fixtures.assertions import REPO_ROOT
from tests.fixtures.factories import AccountWithKeys
from tests.jobs.handlers import RECORD, SLOW_FIRST

pytestmark = pytest.mark.slow

LEASE_SECONDS = 2


@contextmanager
def workers(
    settings: Settings, tmp_path: Path, count: int
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` worker processes, each ready (its start line logged) before this yields."""
    processes, logs = [], []
    for index in range(count):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")},
            "AIVAX_DATABASE_URL": settings.database_url,
            "AIVAX_SECRET_KEY": settings.secret_key.get_secret_value()
            if settings.secret_key
            else "",
            "AIVAX_DATA_DIR": str(tmp_path / f"data{index}"),
            "AIVAX_JOBS_LEASE_SECONDS": str(LEASE_SECONDS),
            "AIVAX_JOBS_POLL_SECONDS": "0.1",
            "PYTHONPATH": str(REPO_ROOT),
        }
        log = tmp_path / f"worker{index}.log"
        logs.append(log)
        with log.open("w") as out:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "aivax",
                        "worker",
                        "--concurrency",
                        "3",
                        "--register",
                        "tests.jobs.handlers:register",
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        deadline = time.monotonic() + 60
        for process, log in zip(processes, logs, strict=True):
            while "job worker" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def _enqueue(
    services: AppServices, account: AccountWithKeys, kind: str, payload: dict[str, object]
) -> uuid.UUID:
    async with services.database.sessions() as session:
        job = await enqueue(session, kind, payload, account_id=account.id)
        await session.commit()
    return job.id


async def _wait_done(services: AppServices, ids: list[uuid.UUID], timeout: float = 60) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        async with services.database.sessions() as session:
            jobs = (await session.scalars(select(Job).where(Job.id.in_(ids)))).all()
        if len(jobs) == len(ids) and all(job.status == "done" for job in jobs):
            return list(jobs)
        assert time.monotonic() < deadline, [(job.id, job.status, job.error) for job in jobs]
        await asyncio.sleep(0.2)


def _runs(log: Path) -> list[tuple[str, int, int]]:
    """(job id, pid, attempt) for each run recorded by the test handlers."""
    if not log.exists():
        return []
    return [
        (job, int(pid), int(attempt))
        for job, pid, attempt in (line.split() for line in log.read_text().splitlines())
    ]


async def test_two_worker_processes_never_run_the_same_job(
    services: AppServices, settings: Settings, account: AccountWithKeys, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    with workers(settings, tmp_path, 2) as processes:
        ids = [
            await _enqueue(services, account, RECORD, {"log": str(log), "sleep": 0.05})
            for _ in range(40)
        ]
        jobs = await _wait_done(services, ids)
    runs = _runs(log)
    assert sorted(job for job, _, _ in runs) == sorted(str(i) for i in ids)  # each exactly once
    assert {job.attempts for job in jobs} == {1}
    assert {pid for _, pid, _ in runs} == {process.pid for process in processes}


async def test_a_worker_killed_mid_job_has_its_job_resumed_by_the_other(
    services: AppServices, settings: Settings, account: AccountWithKeys, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    with workers(settings, tmp_path, 2) as processes:
        job_id = await _enqueue(services, account, SLOW_FIRST, {"log": str(log)})
        deadline = time.monotonic() + 30
        while not _runs(log):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        ((_, first_pid, _),) = _runs(log)
        os.kill(first_pid, signal.SIGKILL)
        (job,) = await _wait_done(services, [job_id])
        survivor = next(process.pid for process in processes if process.pid != first_pid)
    assert [(pid, attempt) for _, pid, attempt in _runs(log)] == [(first_pid, 1), (survivor, 2)]
    assert job.attempts == 2
    assert job.result == {"pid": survivor}


async def test_a_cron_schedule_fires_once_per_due_time_across_two_worker_processes(
    services: AppServices, settings: Settings, account: AccountWithKeys, tmp_path: Path
) -> None:
    log, name = tmp_path / "runs.log", f"test:workers:{uuid.uuid4()}"
    with workers(settings, tmp_path, 2):
        async with services.database.sessions() as session:
            schedule = await put_schedule(
                session,
                name=name,
                account_id=account.id,
                kind=RECORD,
                cron="* * * * * */2",  # every 2 seconds (the sixth field is seconds)
                payload={"log": str(log)},
            )
            await session.commit()
        deadline = time.monotonic() + 60
        while len(_runs(log)) < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        async with services.database.sessions() as session:
            await remove_schedule(session, name)
            await session.commit()
        async with services.database.sessions() as session:
            ids = list(
                (
                    await session.scalars(
                        select(Job.id).where(Job.unique_key.like(f"schedule:{schedule.id}:%"))
                    )
                ).all()
            )
        jobs = await _wait_done(services, ids)
    due_times = [job.run_at for job in jobs]
    assert len(due_times) == len(set(due_times)) >= 4
    assert all(time.second % 2 == 0 and time.microsecond == 0 for time in due_times)
    runs = _runs(log)
    assert sorted(job for job, _, _ in runs) == sorted(str(job.id) for job in jobs)
