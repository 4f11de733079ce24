"""`/admin/jobs`: every account's jobs for the operator: list, inspect, retry, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from aivax.auth.dependencies import Operator
from aivax.db import SessionDep
from aivax.jobs import service
from aivax.jobs.schemas import JobRead, JobStatus
from aivax.kit.pagination import ListPage, PageLimit, page_of

router = APIRouter(prefix="/admin/jobs", tags=["admin"])

Text = Annotated[str | None, Query(min_length=1, max_length=64)]


@router.get("", response_model=ListPage[JobRead])
async def list_jobs(
    _: Operator,
    session: SessionDep,
    kind: Text = None,
    status: JobStatus | None = None,
    queue: Text = None,
    limit: PageLimit = 20,
    after: Annotated[
        uuid.UUID | None, Query(description="The `last_id` of the previous page.")
    ] = None,
) -> ListPage[JobRead]:
    jobs = await service.list_page(
        session, kind=kind, status=status, queue=queue, limit=limit, after=after
    )
    data = [JobRead.model_validate(job) for job in jobs]
    return page_of(data, [str(job.id) for job in data], limit=limit)


@router.get("/{job_id}", response_model=JobRead)
async def get_job(job_id: uuid.UUID, _: Operator, session: SessionDep) -> JobRead:
    return JobRead.model_validate(await service.get(session, job_id))


@router.post("/{job_id}/retry", response_model=JobRead)
async def retry_job(job_id: uuid.UUID, _: Operator, session: SessionDep) -> JobRead:
    """Queue a dead, failed or cancelled job again, with all its attempts."""
    return JobRead.model_validate(await service.retry(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
async def cancel_job(job_id: uuid.UUID, _: Operator, session: SessionDep) -> JobRead:
    """Cancel a queued job at once, or ask a running one to stop."""
    return JobRead.model_validate(await service.cancel(session, job_id))
