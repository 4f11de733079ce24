"""When Redis goes away: a Redis of the tests' own (never the shared one) is killed under load
and restarted. `refuse` answers 503 `rate_limits_unavailable`, `local` keeps counting per
process for a bounded time, neither ever answers 500, and both go back to Redis's shared
counters once it answers again. Each switch is logged once."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis

from aivax.config import Settings
from aivax.inference import ratelimit
from aivax.inference.ratelimit import RateLimiter, RateLimitsUnavailable
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys, make_account, make_plan
from tests.inference.test_rate_limits_shared import (
    AIVAX_SERVE,
    _admitted,
    _clear_of_a_window_edge,
    _ready,
    _server_env,
)
from tests.test_serve_e2e import _free_port

pytestmark = pytest.mark.slow

BODY = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
DOWN = "Redis is unreachable"
EXPIRED = "Redis is still unreachable after"
BACK = "Redis answers again"


class PrivateRedis:
    """A redis-server on a free loopback port, without persistence, that a test may kill."""

    def __init__(self, executable: str, port: int) -> None:
        self.executable = executable
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.process.poll() is None, "redis-server exited during start"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Redis stops answering but keeps its port: connections hang, as on a stuck host."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def limit_keys(self) -> list[str]:
        client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        try:
            return [str(key) for key in client.keys("aivax:*")]
        finally:
            client.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not on PATH: install it (Debian: apt-get install redis-server); "
            "these tests start a Redis of their own and must not be skipped"
        )
    server = PrivateRedis(executable, _free_port())
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.resume()  # a paused process would ignore nothing, but be tidy
        server.kill()


@asynccontextmanager
async def servers(
    settings: Settings, workdir: Path, count: int, **extra: str
) -> AsyncIterator[list[tuple[str, Path]]]:
    """`count` `aivax serve` processes; yields each one's URL and the file of its log."""
    env = _server_env(settings, workdir, LOG_LEVEL="warning", **extra)
    started: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    try:
        for index in range(count):
            port = _free_port()
            log = workdir / f"server-{index}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    [*AIVAX_SERVE, "--no-migrate", "--port", str(port)],
                    env=env,
                    cwd=workdir,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                )
            started.append((process, f"http://127.0.0.1:{port}", log))
        async with httpx.AsyncClient() as http:
            for process, url, _ in started:
                await _ready(http, url, process)
        yield [(url, log) for _, url, log in started]
    finally:
        for process, _, _ in started:
            process.terminate()
        for process, _, _ in started:
            process.wait(timeout=20)


async def _call(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    return await http.post(f"{url}/v1/chat/completions", headers=headers, json=BODY)


async def _load_while(
    urls: list[str], headers: dict[str, str], event: Callable[[], None]
) -> tuple[list[int], list[httpx.Response], float]:
    """Four concurrent callers; `event` happens while their calls are in flight. Returns the
    statuses before it, the responses after it, and when it happened (time.monotonic())."""
    stop = asyncio.Event()
    before: list[int] = []
    after: list[httpx.Response] = []
    happened = False

    async def caller(url: str) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                response = await _call(http, url, headers)
                if happened:
                    after.append(response)
                else:
                    before.append(response.status_code)

    tasks = [asyncio.create_task(caller(urls[n % len(urls)])) for n in range(4)]
    for _ in range(300):  # until every caller is warm and calls are in flight
        if len(before) >= 8:
            break
        await asyncio.sleep(0.1)
    event()
    happened_at = time.monotonic()
    happened = True
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*tasks)
    return before, after, happened_at


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "rate_limits_unavailable"
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["retry-after"] == str(ratelimit.RETRY_AFTER_SECONDS)


async def _until_served(url: str, headers: dict[str, str], allowed: set[int]) -> None:
    """Call until a 200; meanwhile only `allowed` statuses may come."""
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(50):
            response = await _call(http, url, headers)
            if response.status_code == 200:
                return
            assert response.status_code in allowed, response.text
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not serve again after Redis came back")


def _log_count(log: Path, line: str) -> int:
    return log.read_text().count(line)


async def _account(services: AppServices, rpm: int) -> AccountWithKeys:
    plan = await make_plan(services, integrated_rpm=rpm)
    return await make_account(services, plan=plan, balance_micros=1_000_000)


def _counted_in(redis_server: PrivateRedis, account: AccountWithKeys) -> bool:
    return any(str(account.id) in key for key in redis_server.limit_keys())


async def test_refuse_answers_503_while_redis_is_down_and_shares_counters_when_back(
    settings: Settings,
    services: AppServices,
    tmp_path: Path,
    fake_models: list[str],
    private_redis: PrivateRedis,
) -> None:
    busy = await _account(services, 100_000)
    limited = await _account(services, 4)
    async with servers(settings, tmp_path, 2, REDIS_URL=private_redis.url) as started:
        urls = [url for url, _ in started]
        before, after, _ = await _load_while(urls, busy.headers, private_redis.kill)
        assert set(before) == {200}
        assert {r.status_code for r in after} <= {200, 503}, [r.text for r in after]
        assert after[-1].status_code == 503
        for response in after:
            if response.status_code == 503:
                _assert_unavailable(response)
        async with httpx.AsyncClient(timeout=30) as http:
            for url in urls:
                _assert_unavailable(await _call(http, url, busy.headers))

        private_redis.start()
        for url in urls:
            await _until_served(url, busy.headers, {503})
        # Shared again: two processes admit the plan's limit between them, not each.
        assert await _admitted(urls, limited.headers, 10) == 4
        assert _counted_in(private_redis, limited)
    for _, log in started:
        assert (_log_count(log, DOWN), _log_count(log, BACK)) == (1, 1), log.read_text()
        assert "Traceback" not in log.read_text()


async def test_local_counts_per_process_for_the_fallback_time_then_refuses(
    settings: Settings,
    services: AppServices,
    tmp_path: Path,
    fake_models: list[str],
    private_redis: PrivateRedis,
) -> None:
    fallback = 6.0
    busy = await _account(services, 100_000)
    limited = await _account(services, 2)
    async with servers(
        settings,
        tmp_path,
        1,
        REDIS_URL=private_redis.url,
        REDIS_OUTAGE="local",
        REDIS_FALLBACK_SECONDS=str(fallback),
    ) as started:
        [(url, log)] = started
        await _clear_of_a_window_edge()
        before, after, killed_at = await _load_while([url], busy.headers, private_redis.kill)
        assert set(before) == {200}
        assert {r.status_code for r in after} == {200}, [r.text for r in after]
        async with httpx.AsyncClient(timeout=30) as http:
            statuses: list[int] = []
            refused = None
            for _ in range(3):
                refused = await _call(http, url, limited.headers)
                statuses.append(refused.status_code)
            assert statuses == [200, 200, 429]  # the plan's limit, counted by the process
            assert refused is not None
            assert refused.json()["error"]["code"] == "rate_limit_requests"
            await asyncio.sleep(max(killed_at + fallback + 0.5 - time.monotonic(), 0))
            _assert_unavailable(await _call(http, url, busy.headers))

        private_redis.start()
        assert private_redis.limit_keys() == []  # a fresh Redis: nothing counted in it yet
        await _until_served(url, busy.headers, {503})
        assert _counted_in(private_redis, busy), "the process counts in Redis again"
    for text in [log.read_text()]:
        assert (text.count(DOWN), text.count(EXPIRED), text.count(BACK)) == (1, 1, 1), text
        assert "Traceback" not in text


async def test_a_hanging_redis_holds_calls_for_about_its_timeout_only(
    private_redis: PrivateRedis,
) -> None:
    """A Redis that accepts connections but never answers: the first call waits for its
    timeouts (then 503), the next ones are answered at once, and after it answers again one
    probe, at most a second later, brings the shared counters back."""
    limiter = RateLimiter(private_redis.url, timeout_seconds=0.3)
    try:
        assert (await limiter.hit_requests("rpm:hang", 100)).allowed
        private_redis.pause()
        with pytest.raises(RateLimitsUnavailable):
            await asyncio.wait_for(limiter.hit_requests("rpm:hang", 100), 5)
        assert not limiter.redis_reachable
        with pytest.raises(RateLimitsUnavailable):  # no Redis command: nothing to wait for
            await asyncio.wait_for(limiter.hit_requests("rpm:hang", 100), 0.1)
        private_redis.resume()
        for _ in range(50):
            try:
                decision = await limiter.hit_requests("rpm:hang", 100)
                break
            except RateLimitsUnavailable:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the limiter did not go back to Redis")
        assert limiter.redis_reachable
        # The hit from before the stall is still counted (a per-process counter would say
        # 99); the stalled attempts may have counted too, once Redis ran them.
        assert decision.remaining <= 98
    finally:
        await limiter.close()


async def test_an_outage_probes_redis_at_most_once_a_second(
    private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RateLimiter(private_redis.url, outage="local", fallback_seconds=60)
    clock = [1_000.0]
    limiter.clock = lambda: clock[0]
    probes = 0
    incr = limiter.storage.incr

    async def counted(key: str, expiry: int, amount: int = 1) -> int:
        nonlocal probes
        probes += 1
        return await incr(key, expiry, amount)

    monkeypatch.setattr(limiter.storage, "incr", counted)
    try:
        await limiter.hit_requests("rpm:probe", 1_000)
        private_redis.kill()
        for second in range(3):
            decisions = await asyncio.gather(
                *(limiter.hit_requests("rpm:probe", 1_000) for _ in range(50))
            )
            assert all(d.allowed for d in decisions)
            await asyncio.sleep(0.05)  # let a started probe finish
            assert probes == second, "one probe per second of outage, none in its first"
            clock[0] += ratelimit.PROBE_SECONDS
        clock[0] += 60  # past the fallback: refused, still probing once a second
        with pytest.raises(RateLimitsUnavailable):
            await limiter.hit_requests("rpm:probe", 1_000)
    finally:
        await limiter.close()
