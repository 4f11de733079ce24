"""`aivax serve --workers 2` with metrics on: each worker writes its own files, and /metrics
(on the API port or the shared metrics port) adds up both workers' calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from aivax.config import Settings
from aivax.services import AppServices
from tests.fixtures.factories import make_account, make_plan
from tests.inference.test_rate_limits_shared import (
    REDIS_URL,
    _ready,
    _serve,
    _server_env,
    _worker_processes,
)
from tests.metrics.support import parse, value
from tests.test_serve_e2e import _free_port

pytestmark = pytest.mark.slow

CALLS = 20
CHAT = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
OK = {"model": "test/fake-ok", "via_gateway": "false", "status": "200"}


async def test_two_workers_metrics_add_up(
    settings: Settings,
    services: AppServices,
    tmp_path: Path,
    fake_models: list[str],
    admin_headers: dict[str, str],
) -> None:
    if not REDIS_URL:
        pytest.skip("needs Redis: set AIVAX_TEST_REDIS_URL (.ci/run always does)")
    account = await make_account(services, plan=await make_plan(services), balance_micros=100_000)
    files = tmp_path / "metrics"
    files.mkdir()
    (files / "counter_1.db").write_bytes(b"left by an earlier run")
    port, metrics_port = _free_port(), _free_port()
    env = _server_env(
        settings, tmp_path, REDIS_URL=REDIS_URL, METRICS="true", METRICS_PORT=str(metrics_port)
    )
    server = _serve(env, tmp_path, "--workers", "2", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await _ready(http, url, server)
            for _ in range(100):  # the second worker may still be starting
                if len(_worker_processes(server.pid)) == 2:
                    break
                await asyncio.sleep(0.1)
            workers = _worker_processes(server.pid)
            assert len(workers) == 2

            async def call() -> int:
                async with httpx.AsyncClient(timeout=30) as own:  # a connection of its own
                    answer = await own.post(
                        f"{url}/v1/chat/completions", headers=account.headers, json=CHAT
                    )
                return answer.status_code

            # The kernel hands connections to whichever worker accepts first: call in rounds
            # until both have served (each writes its own files), then check the sum.
            made, writers = 0, set()
            for _ in range(10):
                assert await asyncio.gather(*(call() for _ in range(CALLS))) == [200] * CALLS
                made += CALLS
                writers = {path.stem.rpartition("_")[2] for path in files.glob("counter_*.db")}
                if len(writers) == 2:
                    break
            assert writers == {str(pid) for pid in workers}  # both served, the old file is gone
            for _ in range(20):  # each scrape is answered by either worker, with the same sum
                response = await http.get(f"{url}/metrics", headers=admin_headers)
                assert response.status_code == 200, response.text
                assert value(parse(response.text), "aivax_calls_total", **OK) == made
                public = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert value(parse(public.text), "aivax_calls_total", **OK) == made
    finally:
        server.terminate()
        server.wait(timeout=30)
