"""/healthz and /readyz."""

from __future__ import annotations

from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from aivax.app import create_app
from aivax.config import Settings


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "migrations": "ok"}}


async def _readyz(settings: Settings) -> httpx.Response:
    application = create_app(settings)
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
            return await http.get("/readyz")


async def test_readyz_is_503_when_database_is_unreachable(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
    )
    response = await _readyz(settings)
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unreachable")


async def test_readyz_is_503_when_migrations_are_missing(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/new.db"
    )
    response = await _readyz(settings)
    assert response.status_code == 503
    assert response.json()["checks"]["migrations"].startswith("at None")
