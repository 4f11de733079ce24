"""Rate limits across replicas: two `aivax serve` processes on one database. With Redis they
admit exactly the plan's limit between them; with in-process storage each admits it alone,
which is why deployments with more than one replica need AIVAX_REDIS_URL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from aivax.config import Settings
from aivax.services import AppServices
from tests.conftest import TEST_SECRET
from tests.fixtures.factories import make_account, make_plan
from tests.test_serve_e2e import _free_port

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("AIVAX_TEST_REDIS_URL")
LIMIT = 4


@asynccontextmanager
async def replicas(
    settings: Settings, workdir: Path, redis_url: str | None
) -> AsyncIterator[list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}
    env |= {
        "AIVAX_DATABASE_URL": settings.database_url,
        "AIVAX_SECRET_KEY": TEST_SECRET,
        "AIVAX_DATA_DIR": str(workdir),
        "AIVAX_BOOTSTRAP_DEMO": "false",
        "AIVAX_LOG_LEVEL": "warning",
    }
    if redis_url:
        env["AIVAX_REDIS_URL"] = redis_url
    ports = [_free_port(), _free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "aivax", "serve", "--no-migrate", "--port", str(port)],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        async with httpx.AsyncClient() as http:
            for url, process in zip(urls, processes, strict=True):
                for _ in range(300):
                    assert process.poll() is None, "replica exited during start"
                    try:
                        if (await http.get(f"{url}/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


async def _clear_of_a_window_edge() -> None:
    """The sliding-window counter weighs the previous minute's count by the time left in it
    and rounds down, so a request just past a minute's edge can be admitted beyond the limit
    (by one). Start well inside a minute, so the count is exact."""
    into_minute = time.time() % 60
    if into_minute > 50:
        await asyncio.sleep(61 - into_minute)


async def _admitted(urls: list[str], headers: dict[str, str], total: int) -> int:
    body = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
    await _clear_of_a_window_edge()
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for index in range(total):
            response = await http.post(
                f"{urls[index % 2]}/v1/chat/completions", headers=headers, json=body
            )
            statuses.append(response.status_code)
    assert set(statuses) <= {200, 429}, statuses
    return statuses.count(200)


@pytest.fixture
def account_factory(services: AppServices, fake_models: list[str]) -> Callable[..., object]:
    async def create() -> dict[str, str]:
        plan = await make_plan(services, integrated_rpm=LIMIT)
        account = await make_account(services, plan=plan, balance_micros=1_000_000)
        return account.headers

    return create


async def test_two_replicas_sharing_redis_admit_exactly_the_limit(
    settings: Settings, tmp_path: Path, account_factory: Callable[..., object]
) -> None:
    if not REDIS_URL:
        pytest.skip("needs Redis: set AIVAX_TEST_REDIS_URL (.ci/run always does)")
    headers = await account_factory()  # type: ignore[misc]
    async with replicas(settings, tmp_path, REDIS_URL) as urls:
        assert await _admitted(urls, headers, 10) == LIMIT


async def test_in_process_limits_admit_the_limit_per_replica(
    settings: Settings, tmp_path: Path, account_factory: Callable[..., object]
) -> None:
    headers = await account_factory()  # type: ignore[misc]
    async with replicas(settings, tmp_path, None) as urls:
        assert await _admitted(urls, headers, 10) == 2 * LIMIT
