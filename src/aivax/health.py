"""`/healthz`: the process is up. `/readyz`: the database answers and its schema is at head;
`features` says which optional capabilities this server has (they do not affect readiness)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from aivax.migrate import current_revision
from aivax.services import AppServices

router = APIRouter(tags=["health"])


class Feature(BaseModel):
    available: bool
    reason: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
    features: dict[str, Feature] = Field(
        description="`sandbox`: whether Bash and code execution can run here (bubblewrap)."
    )


READINESS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"model": Readiness, "description": "The database answers at the migrations' head."},
    503: {"model": Readiness, "description": "Not ready: `checks` says what is not `ok`."},
}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=READINESS_RESPONSES)
async def readyz(request: Request) -> JSONResponse:
    services: AppServices = request.app.state.services
    head: str = request.app.state.migration_head
    checks: dict[str, str] = {}
    try:
        async with services.database.sessions() as session:
            await session.execute(text("SELECT 1"))
            checks["database"] = "ok"
            current = await current_revision(session)
    except (SQLAlchemyError, OSError) as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        current = None
    if checks["database"] == "ok":
        checks["migrations"] = "ok" if current == head else f"at {current!r}, head is {head!r}"
    ready = all(value == "ok" for value in checks.values())
    sandbox = await services.sandbox.availability()
    body = Readiness(
        status="ready" if ready else "not_ready",
        checks=checks,
        features={"sandbox": Feature(available=sandbox.available, reason=sandbox.reason)},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
