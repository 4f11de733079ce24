"""A call answered 200 is charged and logged exactly once, whatever the database does meanwhile:
settlements it does not take are journaled on disk and sent again until it does, a server that
dies meanwhile leaves them to the next one, sending again never charges twice, and too many
waiting settlements refuse paid calls with 503 `wallet_unavailable`.

The outage tests stop a PostgreSQL cluster of their own (never the shared one)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from aivax.app import create_app
from aivax.config import Settings
from aivax.kit.clock import utcnow
from aivax.migrate import upgrade_to_head
from aivax.models import EntryKind, LedgerEntry, RequestLog, WalletHold
from aivax.services import AppServices
from aivax.wallet import service as wallet_service
from aivax.wallet.holds import HoldRequest
from aivax.wallet.journal import SUFFIX, SettlementJournal
from aivax.wallet.settlement import Settlement, Settler
from aivax.wallet.writer import InlineWriter, SettleItem, WalletWriterUnavailable
from tests.conftest import TEST_SECRET, FakeUpstream
from tests.fixtures.factories import AccountWithKeys, install_fake_models, make_account
from tests.fixtures.servers import ThreadedServer
from tests.fixtures.wallet import balance_and_ledger_sum

# --- writers that meet a database outage ---------------------------------------------------


class Outage:
    """The real writer behind a database that fails the first `failures` batches. With
    `answer_lost`, each failed batch was in fact committed: only its answer was lost."""

    def __init__(self, real: InlineWriter, failures: int, *, answer_lost: bool = False) -> None:
        self.real = real
        self.failures = failures
        self.answer_lost = answer_lost
        self.sent: list[tuple[int, bool]] = []  # (items, replay) per batch

    async def settle(self, items: Sequence[SettleItem], *, replay: bool = False) -> int:
        self.sent.append((len(items), replay))
        if self.failures == 0:
            return await self.real.settle(items, replay=replay)
        self.failures -= 1
        if self.answer_lost:
            assert await self.real.settle(items, replay=replay) == len(items)
        return 0


def _log(account_id: uuid.UUID, cost: int) -> dict[str, Any]:
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "account_id": account_id,
        "key_id": None,
        "gateway_id": None,
        "model": "test/model",
        "provider": "openai",
        "upstream_model": "m",
        "byok": False,
        "stream": False,
        "status": 200,
        "error_code": None,
        "input_tokens": 7,
        "output_tokens": 3,
        "cached_input_tokens": 0,
        "cost_micros": cost,
        "estimated": False,
        "latency_ms": 12,
        "ttft_ms": None,
        "flags": None,
        "created_at": utcnow(),
    }


async def _lease_with_calls(
    services: AppServices, costs: list[int]
) -> tuple[AccountWithKeys, uuid.UUID, list[Settlement]]:
    """An account with a 5,000 lease hold, and the settlements of calls that cost `costs`
    against it, then the lease's close."""
    account = await make_account(services, balance_micros=10_000)
    (hold_id,) = await services.meter.writer.hold_many([HoldRequest(account.id, 5_000, "lease")])
    assert isinstance(hold_id, uuid.UUID)
    calls = [Settlement(hold_id, cost, _log(account.id, cost), "lease") for cost in costs]
    return account, hold_id, [*calls, Settlement(hold_id, 0, None, "close")]


async def _logged(services: AppServices, account_id: uuid.UUID) -> list[str]:
    async with services.database.sessions() as session:
        query = select(RequestLog.request_id).where(RequestLog.account_id == account_id)
        return list(await session.scalars(query))


async def _hold(services: AppServices, hold_id: uuid.UUID) -> tuple[str, int | None]:
    async with services.database.sessions() as session:
        hold = await session.get(WalletHold, hold_id)
        assert hold is not None
        return hold.status, hold.actual_micros


async def test_settlements_the_database_refuses_are_kept_and_written_when_it_answers(
    services: AppServices, tmp_path: Path
) -> None:
    outage = Outage(InlineWriter(services.database), failures=3)
    settler = Settler(outage, journal=SettlementJournal(tmp_path))  # type: ignore[arg-type]
    account, hold_id, settlements = await _lease_with_calls(services, [100, 200, 300])
    for item in settlements:
        settler.submit(item)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if settler.backlog == 0:
            break
    assert settler.backlog == 0
    await settler.close()
    assert [replay for _, replay in outage.sent] == [False, True, True, True]
    assert await _hold(services, hold_id) == ("settled", 600)
    assert await balance_and_ledger_sum(services, account.id) == (9_400, 9_400)
    logged = await _logged(services, account.id)
    assert sorted(logged) == sorted(item.log["request_id"] for item in settlements if item.log)
    assert list(tmp_path.iterdir()) == []  # nothing left: the journal is gone


async def test_sending_again_what_was_committed_never_charges_twice(
    services: AppServices, tmp_path: Path
) -> None:
    """A lease charge adds to the hold's recorded cost: written twice it would charge twice.
    The batch below commits, but its answer is lost; the replay finds its request-log rows and
    skips it."""
    outage = Outage(InlineWriter(services.database), failures=1, answer_lost=True)
    settler = Settler(outage, journal=SettlementJournal(tmp_path))  # type: ignore[arg-type]
    account, hold_id, settlements = await _lease_with_calls(services, [100, 250])
    for item in settlements:
        settler.submit(item)
    await settler.drain()
    await settler.close()
    assert await _hold(services, hold_id) == ("settled", 350)
    assert await balance_and_ledger_sum(services, account.id) == (9_650, 9_650)
    assert len(await _logged(services, account.id)) == 2
    assert outage.sent == [(3, False), (3, True)]


async def test_a_restarted_server_writes_what_the_last_one_left(
    services: AppServices, tmp_path: Path
) -> None:
    """The first settler never reaches the database and stops (its journal stays); the next
    one on the same directory writes everything before it serves, once."""
    down = Outage(InlineWriter(services.database), failures=10**6)
    first = Settler(down, journal=SettlementJournal(tmp_path))  # type: ignore[arg-type]
    account, hold_id, settlements = await _lease_with_calls(services, [40, 60])
    for item in settlements:
        first.submit(item)
    with pytest.raises(WalletWriterUnavailable):
        await first.drain()
    await first.close()
    assert [path.suffix for path in tmp_path.iterdir()] == [SUFFIX]
    assert await _hold(services, hold_id) == ("open", None)

    second = Settler(InlineWriter(services.database), journal=SettlementJournal(tmp_path))
    await second.start()
    assert second.backlog == 0
    await second.close()
    assert await _hold(services, hold_id) == ("settled", 100)
    assert await balance_and_ledger_sum(services, account.id) == (9_900, 9_900)
    assert len(await _logged(services, account.id)) == 2
    assert list(tmp_path.iterdir()) == []


async def test_a_full_backlog_refuses_paid_calls(services: AppServices, tmp_path: Path) -> None:
    down = Outage(InlineWriter(services.database), failures=10**6)
    settler = Settler(down, journal=SettlementJournal(tmp_path), backlog_max=3)  # type: ignore[arg-type]
    account = await make_account(services, balance_micros=10_000)
    for _ in range(2):
        settler.submit(Settlement(None, 0, _log(account.id, 0)))
    settler.check_capacity()  # two wait: there is room for one more
    settler.submit(Settlement(None, 0, _log(account.id, 0)))
    with pytest.raises(WalletWriterUnavailable) as refused:
        settler.check_capacity()
    assert (refused.value.status, refused.value.code) == (503, "wallet_unavailable")
    assert "3 wait for the database" in str(refused.value)
    await settler.close()
    # Nothing was lost on the way: the next settler writes the three rows.
    again = Settler(InlineWriter(services.database), journal=SettlementJournal(tmp_path))
    await again.start()
    await again.close()
    assert len(await _logged(services, account.id)) == 3


async def test_a_paid_call_gets_503_while_the_backlog_is_full(
    client: httpx.AsyncClient,
    services: AppServices,
    fake_models: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = await make_account(services, plan="starter", balance_micros=1_000_000)
    monkeypatch.setattr(services.meter.settler, "backlog_max", 0)
    body = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}
    answer = await client.post("/v1/chat/completions", json=body, headers=account.headers)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "wallet_unavailable"
    assert "retry shortly" in error["message"]


# --- a private PostgreSQL cluster, stopped while calls are served ----------------------------


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL's initdb and pg_ctl are needed (install postgresql)")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PrivatePostgres:
    root: Path
    port: int
    bin: Path

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    @property
    def server_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    root = Path(tempfile.mkdtemp(prefix="aivax-pg-"))
    cluster = PrivatePostgres(root, _free_port(), _pg_bin())
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = str(root / "data")
    cluster._run("initdb", "-D", data, "-U", "postgres", "--auth=trust")
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def _prepared(
    postgres: PrivatePostgres, data_dir: Path, fake_openai: FakeUpstream
) -> tuple[Settings, AccountWithKeys]:
    """A migrated database of its own on the private cluster, with the fake models and a
    funded account."""
    from tests.fixtures.databases import create_database

    _, url = await create_database(postgres.server_url, "aivax_outage")
    await asyncio.to_thread(upgrade_to_head, url)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        data_dir=data_dir,
        secret_key=TEST_SECRET,  # type: ignore[arg-type]
        ssrf_allowlist=["127.0.0.1"],
        redis_url=None,
        db_pool_size=5,
        cache_seconds=60,
        bootstrap_demo=False,
    )
    services = AppServices.build(settings)
    try:
        await install_fake_models(services, fake_openai.base_url, fake_openai.base_url)
        account = await make_account(services, plan="starter", balance_micros=5_000_000)
    finally:
        await services.close()
    return settings, account


@dataclass
class Answer:
    status: int
    request_id: str | None
    cost: int


async def _call(http: httpx.AsyncClient, base: str, account: AccountWithKeys) -> Answer:
    body = {"model": "test/fake-ok", "messages": [{"role": "user", "content": "hello"}]}
    try:
        answer = await http.post(f"{base}/v1/chat/completions", json=body, headers=account.headers)
    except httpx.TransportError:  # the server was killed while answering
        return Answer(0, None, 0)
    cost = int(answer.headers.get("x-aivax-cost-micros") or 0)
    return Answer(answer.status_code, answer.headers.get("x-request-id"), cost)


async def _traffic(base: str, account: AccountWithKeys, stop: asyncio.Event) -> list[Answer]:
    """Two clients calling back to back until `stop`."""
    answers: list[Answer] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                answers.append(await _call(http, base, account))
                await asyncio.sleep(0.02)

    await asyncio.gather(client(), client())
    return answers


async def _outage_during(
    base: str, account: AccountWithKeys, postgres: PrivatePostgres, *, then: Any = None
) -> list[Answer]:
    """Calls before, during (about two seconds) and after PostgreSQL is stopped; `then()` runs
    while it is down, before it starts again."""
    stop = asyncio.Event()
    traffic = asyncio.ensure_future(_traffic(base, account, stop))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(postgres.stop)
    try:
        await asyncio.sleep(2.0)
        if then is not None:
            await then()
            stop.set()
            return await traffic
    finally:
        await asyncio.to_thread(postgres.start)
    await asyncio.sleep(1.0)
    stop.set()
    return await traffic


async def _books(settings: Settings, account_id: uuid.UUID) -> tuple[dict[str, int], int, int]:
    """(request-log rows of status 200 per request id, usage charged, open holds), after
    checking the account's balance equals its ledger and is not negative."""
    services = AppServices.build(settings)
    try:
        async with services.database.sessions() as session:
            report = await wallet_service.check_invariant(session, account_id)
            assert report.cached_balance_micros == report.ledger_sum_micros
            assert report.cached_balance_micros >= 0
            rows = await session.execute(
                select(RequestLog.request_id, func.count())
                .where(RequestLog.account_id == account_id, RequestLog.status == 200)
                .group_by(RequestLog.request_id)
            )
            usage = await session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
                    LedgerEntry.account_id == account_id,
                    LedgerEntry.kind == EntryKind.USAGE.value,
                )
            )
            open_holds = await session.scalar(
                select(func.count()).where(
                    WalletHold.account_id == account_id, WalletHold.status == "open"
                )
            )
        return {str(r): int(n) for r, n in rows.all()}, -int(usage or 0), int(open_holds or 0)
    finally:
        await services.close()


def _check_every_answer_charged_once(
    answers: list[Answer], rows: dict[str, int], charged: int
) -> None:
    served = [answer for answer in answers if answer.status == 200]
    # 503: the lease could not grow while the database was down; 429: the plan's rate limit;
    # 0: no answer (the server was killed).
    statuses = {answer.status for answer in answers}
    assert statuses <= {0, 200, 429, 503}, statuses
    assert len(served) >= 10
    assert all(answer.request_id for answer in served)
    assert {answer.request_id: 1 for answer in served} == rows
    assert charged == sum(answer.cost for answer in served)
    assert charged > 0


async def _wallet_flushed(base: str, account: AccountWithKeys) -> None:
    """Read the wallet through the server (it closes the account's idle lease and waits for
    its settlements) until the server answers: settlements are retried with backoff."""
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(60):
            answer = await http.get(f"{base}/v1/wallet", headers=account.headers)
            if answer.status_code == 200:
                return
            await asyncio.sleep(0.5)
    pytest.fail(f"the wallet did not answer: {answer.status_code} {answer.text}")


@pytest.fixture
async def outage_settings(
    postgres: PrivatePostgres, tmp_path: Path, fake_openai: FakeUpstream
) -> tuple[Settings, AccountWithKeys]:
    return await _prepared(postgres, tmp_path / "data", fake_openai)


@pytest.mark.slow
async def test_calls_served_during_a_database_outage_are_all_charged_and_logged(
    outage_settings: tuple[Settings, AccountWithKeys], postgres: PrivatePostgres
) -> None:
    settings, account = outage_settings
    server = ThreadedServer(create_app(settings)).start()
    try:
        answers = await _outage_during(server.url, account, postgres)
        await _wallet_flushed(server.url, account)
    finally:
        server.stop()
    rows, charged, open_holds = await _books(settings, account.id)
    _check_every_answer_charged_once(answers, rows, charged)
    assert open_holds == 0
    assert list((settings.data_dir / "wallet-journal").iterdir()) == []


@pytest.mark.slow
async def test_a_server_killed_during_an_outage_leaves_its_charges_to_the_next(
    outage_settings: tuple[Settings, AccountWithKeys], postgres: PrivatePostgres
) -> None:
    """The server is killed (no shutdown at all) while the database is down and calls were
    served from its lease; the next server on the same data directory writes their charges
    and rows once the database is back. The dead server's lease is closed by the reaper."""
    settings, account = outage_settings
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVAX_")}
    env.update(
        AIVAX_DATABASE_URL=settings.database_url,
        AIVAX_DATA_DIR=str(settings.data_dir),
        AIVAX_SECRET_KEY=TEST_SECRET,
        AIVAX_SSRF_ALLOWLIST="127.0.0.1",
        AIVAX_BOOTSTRAP_DEMO="false",
        AIVAX_CACHE_SECONDS="60",
        AIVAX_LOG_LEVEL="warning",
    )
    base = f"http://127.0.0.1:{port}"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    first = _serve(port, env, settings.data_dir / "first.log")
    try:
        await _ready(base, first)

        async def kill() -> None:
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 20)

        answers = await _outage_during(base, account, postgres, then=kill)
        second = _serve(port, env, settings.data_dir / "second.log")
        try:
            await _ready(base, second)
            await _wallet_flushed(base, account)
        finally:
            second.terminate()
            await asyncio.to_thread(second.wait, 30)
    finally:
        if first.poll() is None:
            first.kill()
    services = AppServices.build(settings)
    try:  # the reaper, for the lease of the server that died
        async with services.database.sessions() as session:
            await wallet_service.reap_stale_holds(session, max_age=timedelta(0))
            await session.commit()
    finally:
        await services.close()
    rows, charged, open_holds = await _books(settings, account.id)
    _check_every_answer_charged_once(answers, rows, charged)
    assert open_holds == 0
    assert list((settings.data_dir / "wallet-journal").iterdir()) == []


def _serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aivax", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server stopped"
            try:
                if (await http.get(f"{base}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail("the server did not become ready")
