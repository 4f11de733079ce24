"""The operator's view of a job (accounts see theirs through `GET /v1/jobs/{id}`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

JobStatus = Literal["queued", "running", "done", "failed", "dead", "cancelled"]


class JobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["job"] = "job"
    id: uuid.UUID
    account_id: uuid.UUID
    kind: str
    queue: str
    priority: int
    status: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int | None
    unique_key: str | None
    cancel_requested: bool
    progress_done: int
    progress_total: int
    error: str | None
    result: dict[str, Any] | None
    run_at: datetime
    locked_until: datetime | None
    locked_by: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
