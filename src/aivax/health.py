"""`/healthz`: the process is up. `/readyz`: the database answers and its schema is at head."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from aivax.migrate import current_revision
from aivax.services import AppServices

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
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
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )
