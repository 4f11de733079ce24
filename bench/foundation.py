"""Foundation benchmark: what authentication, the session and the wallet cost per request.

Starts `aivax serve` on loopback with a fresh SQLite database (or the database in
AIVAX_BENCH_DATABASE_URL), then drives it with httpx at concurrency 1 and 16:

- GET /healthz            (no key, no database): the HTTP floor
- GET /v1/wallet          (key check + one session + two queries)
- hold + settle pairs     (the wallet primitives inference uses), in-process, concurrency 16

Prints requests/second and p50/p99 latency. Not part of the test run; timings vary by machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aivax.accounts import service as account_service
from aivax.config import Settings
from aivax.models import EntryKind
from aivax.services import AppServices
from aivax.wallet import service as wallet

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(workdir: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (workdir / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "aivax", "serve", "--port", str(port)],
        cwd=workdir,
        env={**env, "AIVAX_LOG_LEVEL": "warning"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("server did not start: " + (workdir / "serve.log").read_text())


async def drive(url: str, headers: dict[str, str], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    per_worker = REQUESTS // concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await client.get(url, headers=headers)  # warm up the connection

        async def worker() -> None:
            for _ in range(per_worker):
                started = time.perf_counter()
                response = await client.get(url, headers=headers)
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies


def report(name: str, rps: float, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    print(f"{name:<38} {rps:>9.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")


async def wallet_pairs(database_url: str, workdir: Path) -> None:
    settings = Settings(_env_file=None, database_url=database_url, data_dir=workdir / "data")  # type: ignore[call-arg]
    services = AppServices.build(settings)
    async with services.database.sessions() as session:
        account = await account_service.create(
            session, name="bench", plan_id="free", secret_box=services.secret_box
        )
        await wallet.post_credit(
            session,
            account_id=account.id,
            kind=EntryKind.TOPUP,
            amount_micros=10**9,
            idempotency_key="bench",
        )
        await session.commit()
    latencies: list[float] = []

    async def pair() -> None:
        for _ in range(REQUESTS // 16 // 2):
            started = time.perf_counter()
            async with services.database.sessions() as session:
                held = await wallet.hold(session, account_id=account.id, amount_micros=500, ref="b")
                await session.commit()
            async with services.database.sessions() as session:
                await wallet.settle(session, held.id, 200)
                await session.commit()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(pair() for _ in range(16)))
    elapsed = time.perf_counter() - began
    report("hold+settle pair, c=16 (in-process)", len(latencies) / elapsed, latencies)
    async with services.database.sessions() as session:
        check = await wallet.check_invariant(session, account.id)
    print(f"{'':<38} invariant holds: {check.holds}")
    await services.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}
        database_url = os.environ.get(
            "AIVAX_BENCH_DATABASE_URL", f"sqlite+aiosqlite:///{workdir}/data/aivax.db"
        )
        env["AIVAX_DATABASE_URL"] = database_url
        port = free_port()
        server = start_server(workdir, port, env)
        try:
            banner = (workdir / "serve.log").read_text()
            match = re.search(r"private key\s*:\s*(\S+)", banner)
            headers = {"Authorization": f"Bearer {match.group(1)}"} if match else {}
            base = f"http://127.0.0.1:{port}"
            print(f"database: {database_url.split('://')[0]}, {REQUESTS} requests per row")
            for concurrency in (1, 16):
                rps, lat = asyncio.run(drive(f"{base}/healthz", {}, concurrency))
                report(f"GET /healthz c={concurrency}", rps, lat)
                rps, lat = asyncio.run(drive(f"{base}/v1/wallet", headers, concurrency))
                report(f"GET /v1/wallet (auth+db) c={concurrency}", rps, lat)
        finally:
            server.terminate()
            server.wait()
        asyncio.run(wallet_pairs(database_url, workdir))


if __name__ == "__main__":
    main()
