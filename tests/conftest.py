"""Test fixtures: a real database (a SQLite file, or a fresh PostgreSQL database when
AIVAX_TEST_DATABASE_URL is set), migrated with the real migrations, and the real app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from aivax.app import create_app
from aivax.config import Settings
from aivax.migrate import upgrade_to_head
from aivax.services import AppServices
from tests.fixtures.databases import create_database, drop_database
from tests.fixtures.factories import (
    AccountWithKeys,
    install_fake_models,
    make_account,
    make_admin_token,
)
from tests.fixtures.fake_upstreams import Recorder, anthropic_app, openai_app
from tests.fixtures.servers import ThreadedServer

TEST_SECRET = "test-secret-" + "x" * 40


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server_url = os.environ.get("AIVAX_TEST_DATABASE_URL")
    if not server_url:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'aivax.db'}"
        upgrade_to_head(url)
        yield url
        return
    name, url = asyncio.run(create_database(server_url, "aivax_test"))
    try:
        upgrade_to_head(url)
        yield url
    finally:
        asyncio.run(drop_database(server_url, name))


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        secret_key=TEST_SECRET,  # type: ignore[arg-type]
        max_body_bytes=256 * 1024,
        db_pool_size=20,
        redis_url=None
        if os.environ.get("AIVAX_TEST_RATE_LIMITS") == "memory"
        else os.environ.get("AIVAX_TEST_REDIS_URL") or None,
        ssrf_allowlist=["127.0.0.1"],
        upstream_read_timeout_seconds=20,
        # The suite talks to its loopback fakes directly, whatever proxy the machine sets.
        http_proxy=None,
        https_proxy=None,
        no_proxy=[],
    )


@pytest.fixture(scope="session")
async def services(settings: Settings) -> AsyncIterator[AppServices]:
    built = AppServices.build(settings)
    yield built
    await built.close()


@pytest.fixture(scope="session")
async def app(settings: Settings, services: AppServices) -> AsyncIterator[FastAPI]:
    application = create_app(settings, services=services)
    async with LifespanManager(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
        yield http


@pytest.fixture
async def account(services: AppServices) -> AccountWithKeys:
    return await make_account(services, balance_micros=1_000_000)


@pytest.fixture
async def other_account(services: AppServices) -> AccountWithKeys:
    return await make_account(services, balance_micros=1_000_000)


@pytest.fixture(scope="session")
async def admin_token(services: AppServices) -> str:
    return await make_admin_token(services)


@pytest.fixture
def admin_headers(admin_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token}"}


@dataclass
class FakeUpstream:
    server: ThreadedServer
    recorder: Recorder

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeUpstream]:
    recorder = Recorder()
    server = ThreadedServer(openai_app(recorder)).start()
    yield FakeUpstream(server, recorder)
    server.stop()


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeUpstream]:
    recorder = Recorder()
    server = ThreadedServer(anthropic_app(recorder)).start()
    yield FakeUpstream(server, recorder)
    server.stop()


@pytest.fixture(scope="session")
async def fake_models(
    services: AppServices, fake_openai: FakeUpstream, fake_anthropic: FakeUpstream
) -> list[str]:
    """Integrated models served by the fake upstreams, priced so costs are easy to check:
    1 USD per 1M input tokens and 2 USD per 1M output tokens."""
    return await install_fake_models(services, fake_openai.base_url, fake_anthropic.server.url)


@pytest.fixture(scope="session")
def live_server(settings: Settings, fake_models: list[str]) -> Iterator[ThreadedServer]:
    """The real app on a real port (its own services and event loop), for real clients."""
    server = ThreadedServer(create_app(settings)).start()
    yield server
    server.stop()
