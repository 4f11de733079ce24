"""/healthz and /readyz."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from aivax.app import create_app
from aivax.config import Settings


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "migrations": "ok"}
    assert set(body["features"]["sandbox"]) == {"available", "reason"}


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


def test_fastapi_telemetry_is_off_unless_a_provider_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing configured: FastAPI's per-request provider check is settled once, off. A
    configured provider (or FastAPI configuring them itself) leaves FastAPI's telemetry on."""
    from opentelemetry import trace

    from aivax.app import telemetry_config

    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    assert telemetry_config() == {"tracing": False, "metrics": False, "logs": False}
    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    assert not any(app._telemetry[kind] for kind in ("tracing", "metrics", "logs"))
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)
    assert telemetry_config() is None
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert telemetry_config() is None


async def test_readyz_says_when_the_sandbox_is_unavailable(tmp_path: Path) -> None:
    """A server without bubblewrap is ready all the same; `features` says Bash cannot run."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/new.db",
        sandbox_bwrap=str(tmp_path / "no-bwrap"),
    )
    response = await _readyz(settings)
    sandbox = response.json()["features"]["sandbox"]
    assert sandbox["available"] is False
    assert "bubblewrap not found" in sandbox["reason"]
