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
AIVAX_SERVE = [sys.executable, "-m", "aivax", "serve"]


def _server_env(settings: Settings, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of an `aivax serve` on the test database: `extra` maps setting names
    (without the AIVAX_ prefix) to values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}
    env |= {
        "AIVAX_DATABASE_URL": settings.database_url,
        "AIVAX_SECRET_KEY": TEST_SECRET,
        "AIVAX_DATA_DIR": str(workdir),
        "AIVAX_BOOTSTRAP_DEMO": "false",
        "AIVAX_LOG_LEVEL": "warning",
    }
    return env | {f"AIVAX_{name}": value for name, value in extra.items()}


def _serve(env: dict[str, str], workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*AIVAX_SERVE, "--no-migrate", *args],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _ready(http: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert process.poll() is None, "the server exited during start"
        try:
            if (await http.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


@asynccontextmanager
async def replicas(
    settings: Settings, workdir: Path, redis_url: str | None
) -> AsyncIterator[list[str]]:
    env = _server_env(settings, workdir, **({"REDIS_URL": redis_url} if redis_url else {}))
    ports = [_free_port(), _free_port()]
    processes = [_serve(env, workdir, "--port", str(port)) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        async with httpx.AsyncClient() as http:
            for url, process in zip(urls, processes, strict=True):
                await _ready(http, url, process)
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


def _worker_processes(parent: int) -> list[int]:
    """The uvicorn workers of `parent`: its children started as new interpreters."""
    children = [
        int(child)
        for task in Path(f"/proc/{parent}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def test_workers_share_one_port_and_charge_every_call(
    settings: Settings, services: AppServices, tmp_path: Path, fake_models: list[str]
) -> None:
    """`aivax serve --workers 2`: two worker processes behind one port serve concurrent calls,
    and once their wallet leases close every call is charged exactly once."""
    if not REDIS_URL:
        pytest.skip("needs Redis: set AIVAX_TEST_REDIS_URL (.ci/run always does)")
    from sqlalchemy import func, select

    from aivax.models import RequestLog, WalletHold
    from aivax.wallet import service as wallet

    account = await make_account(services, plan=await make_plan(services), balance_micros=100_000)
    env = _server_env(settings, tmp_path, REDIS_URL=REDIS_URL, WALLET_LEASE_IDLE_SECONDS="0.2")
    port = _free_port()
    server = _serve(env, tmp_path, "--workers", "2", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    body = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await _ready(http, url, server)
            for _ in range(100):  # the second worker may still be starting
                if len(_worker_processes(server.pid)) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(_worker_processes(server.pid)) == 2

            async def call() -> int:
                async with httpx.AsyncClient(timeout=30) as own:  # a connection of its own
                    answer = await own.post(
                        f"{url}/v1/chat/completions", headers=account.headers, json=body
                    )
                return answer.status_code

            assert await asyncio.gather(*(call() for _ in range(20))) == [200] * 20
        for _ in range(100):  # both workers' leases close once idle
            async with services.database.sessions() as session:
                still_open = await session.scalar(
                    select(func.count()).where(
                        WalletHold.account_id == account.id, WalletHold.status == "open"
                    )
                )
                costs = await session.scalar(
                    select(func.sum(RequestLog.cost_micros)).where(
                        RequestLog.account_id == account.id
                    )
                )
                calls = await session.scalar(
                    select(func.count()).where(RequestLog.account_id == account.id)
                )
            if still_open == 0 and calls == 20:
                break
            await asyncio.sleep(0.1)
        assert (still_open, calls) == (0, 20)
        async with services.database.sessions() as session:
            report = await wallet.check_invariant(session, account.id)
        assert report.holds
        assert report.cached_balance_micros == 100_000 - (costs or 0)
    finally:
        server.terminate()
        server.wait(timeout=30)


async def test_bad_worker_counts_are_refused_with_one_clear_line(
    settings: Settings, tmp_path: Path
) -> None:
    """More than one worker without Redis, or a count out of range, stops `serve` at once."""
    env = _server_env(settings, tmp_path)
    for workers, message in [
        ("2", "2 workers need AIVAX_REDIS_URL"),
        ("0", "invalid setting AIVAX_WORKERS"),
        ("65", "invalid setting AIVAX_WORKERS"),
    ]:
        done = subprocess.run(
            [*AIVAX_SERVE, "--no-migrate", "--workers", workers],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (workers, done.stderr)
        assert message in done.stderr, (workers, done.stderr)
