"""The wallet writer: holds and settlements written by a process of the server's own (the
default) or by the server itself, with the same results; a writer that dies fails only the calls
waiting on it (503, retryable) and is replaced by the next write."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import func, select, update

from aivax.app import create_app
from aivax.config import Settings
from aivax.kit.clock import utcnow
from aivax.models import Account, HoldStatus, RequestLog, WalletHold
from aivax.services import AppServices
from aivax.wallet import ledger
from aivax.wallet import writer as writer_module
from aivax.wallet.holds import HoldRequest
from aivax.wallet.settlement import Settlement
from aivax.wallet.writer import ProcessWriter, WalletWriterUnavailable
from tests.fixtures.factories import make_account
from tests.fixtures.wallet import balance_and_ledger_sum, hold_behind_a_lock, hold_statuses_once


@pytest.fixture(params=["process", "inline"])
async def built(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[AppServices]:
    services = AppServices.build(settings.model_copy(update={"wallet_writer": request.param}))
    yield services
    await services.close()


async def test_holds_and_settlements_through_either_writer(built: AppServices) -> None:
    account = await make_account(built, balance_micros=10_000)
    requests = [HoldRequest(account.id, 3_000, f"call-{n}") for n in range(4)]
    results = await built.meter.writer.hold_many(requests)
    held = [r for r in results if isinstance(r, uuid.UUID)]
    assert len(held) == 3
    assert isinstance(results[3], ledger.InsufficientBalance)
    assert "0.001000 USD available" in str(results[3])
    assert await balance_and_ledger_sum(built, account.id) == (1_000, 1_000)

    missing, too_big = await built.meter.writer.hold_many(
        [HoldRequest(uuid.uuid4(), 1, "nobody"), HoldRequest(account.id, 10**13, "cap")]
    )
    assert isinstance(missing, ledger.WalletAccountNotFound)
    assert missing.param == "account_id"
    assert isinstance(too_big, ValueError)

    request_id = f"req_{uuid.uuid4().hex}"
    log = {
        "request_id": request_id,
        "account_id": account.id,
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
        "cost_micros": 500,
        "estimated": False,
        "latency_ms": 12,
        "ttft_ms": None,
        "flags": ["input:test"],
        "created_at": utcnow(),
    }
    for item in [
        Settlement(held[0], 500, log),
        Settlement(held[1], 0, None),
        Settlement(held[2], 9_999, None),  # above the hold: capped at 3,000
    ]:
        built.meter.settler.submit(item)
    await built.meter.settler.drain()
    assert await balance_and_ledger_sum(built, account.id) == (
        10_000 - 500 - 3_000,
        10_000 - 500 - 3_000,
    )
    async with built.database.sessions() as session:
        statuses = await session.scalars(
            select(WalletHold.status).where(WalletHold.id.in_(held)).order_by(WalletHold.id)
        )
        assert sorted(statuses) == ["released", "settled", "settled"]
        row = (
            await session.scalars(select(RequestLog).where(RequestLog.request_id == request_id))
        ).one()
        assert (row.account_id, row.flags, row.cost_micros) == (account.id, ["input:test"], 500)
        assert row.created_at.tzinfo is not None


async def test_the_writer_is_a_process_of_its_own(settings: Settings) -> None:
    services = AppServices.build(settings.model_copy(update={"wallet_writer": "process"}))
    try:
        account = await make_account(services, balance_micros=1_000)
        await services.meter.writer.hold_many([HoldRequest(account.id, 1, "start")])
        writer = services.meter.writer
        assert isinstance(writer, ProcessWriter)
        process = writer._process
        assert process is not None
        assert process.is_alive()
        assert process.pid != os.getpid()
    finally:
        await services.close()
    assert not process.is_alive()  # the writer ends with the server


async def test_a_dead_writer_fails_its_waiting_calls_and_is_replaced(settings: Settings) -> None:
    services = AppServices.build(settings.model_copy(update={"wallet_writer": "process"}))
    try:
        writer = services.meter.writer
        assert isinstance(writer, ProcessWriter)
        account = await make_account(services, balance_micros=10_000)
        # A transaction that has written the account holds the write lock (SQLite) or the
        # row lock (PostgreSQL): the writer's hold waits for it.
        lock = services.database.sessions()
        await lock.execute(
            update(Account).where(Account.id == account.id).values(name=Account.name)
        )
        services.meter.calls_in_flight = 2  # not a lone call: through the writer
        waiting = asyncio.ensure_future(
            services.meter.holds.hold(account_id=account.id, amount_micros=4_000, ref="doomed")
        )
        for _ in range(200):
            await asyncio.sleep(0.02)
            if writer._process is not None and writer._waiting:
                break
        assert not waiting.done()
        first = writer._process
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(WalletWriterUnavailable) as refused:
            await asyncio.wait_for(waiting, 10)
        assert refused.value.status == 503
        await lock.rollback()
        await lock.close()

        held = await services.meter.holds.hold(
            account_id=account.id, amount_micros=4_000, ref="next"
        )
        assert isinstance(held, uuid.UUID)
        assert writer._process is not None
        assert writer._process.pid != first.pid
        assert await balance_and_ledger_sum(services, account.id) == (6_000, 6_000)
        async with services.database.sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(WalletHold)
                .where(WalletHold.account_id == account.id)
            )
            assert count == 1  # the killed writer's hold never committed
    finally:
        services.meter.calls_in_flight = 0
        await services.close()


async def test_a_hold_for_a_caller_that_left_is_given_back_by_the_writer(
    built: AppServices,
) -> None:
    built.meter.calls_in_flight = 2  # not a lone call: through the writer
    try:
        account, lock, waiting = await hold_behind_a_lock(built, "gone")
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        built.meter.calls_in_flight = 0
    await lock.commit()
    await lock.close()
    released = [HoldStatus.RELEASED.value]
    assert await hold_statuses_once(built, account.id, released) == released
    assert await balance_and_ledger_sum(built, account.id) == (10_000, 10_000)


async def test_a_lone_hold_survives_a_lost_database_connection(settings: Settings) -> None:
    """The writer takes pooled PostgreSQL connections without a ping: a connection the server
    dropped fails once, and the hold is retried on a new one."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no server to drop connections")
    services = AppServices.build(settings.model_copy(update={"wallet_writer": "process"}))
    try:
        account = await make_account(services, balance_micros=10_000)
        services.meter.calls_in_flight = 2  # through the writer
        first = await services.meter.holds.hold(account_id=account.id, amount_micros=1_000, ref="a")
        async with services.database.engine.connect() as conn:
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        second = await services.meter.holds.hold(
            account_id=account.id, amount_micros=1_000, ref="b"
        )
        assert isinstance(first, uuid.UUID)
        assert isinstance(second, uuid.UUID)
        assert await balance_and_ledger_sum(services, account.id) == (8_000, 8_000)
    finally:
        services.meter.calls_in_flight = 0
        await services.close()


async def test_async_commit_is_off_unless_asked(settings: Settings) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no synchronous_commit")
    from aivax.db import Database

    for asked, expected in ((False, "on"), (True, "off")):
        database = Database(settings, pre_ping=False, async_commit=asked)
        try:
            async with database.engine.connect() as conn:
                shown = (await conn.exec_driver_sql("SHOW synchronous_commit")).scalar()
                assert shown == expected
        finally:
            await database.dispose()


async def test_a_writer_that_raises_fails_the_holds_instead_of_hanging(
    services: AppServices,
) -> None:
    from aivax.wallet.hold_queue import HoldQueue

    class Broken:
        async def hold_many(self, requests: object) -> list[object]:
            raise RuntimeError("writer bug")

        async def settle(self, items: object) -> None:
            return None

        async def close(self) -> None:
            return None

    queue = HoldQueue(services.database, services.meter.settler, Broken())  # type: ignore[arg-type]
    queue.calls_in_flight = 2  # through the writer
    account = await make_account(services, balance_micros=1_000)
    with pytest.raises(RuntimeError, match="writer bug"):
        await asyncio.wait_for(
            queue.hold(account_id=account.id, amount_micros=10, ref="x"), timeout=5
        )


async def test_a_writer_that_cannot_start_answers_503(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aivax.wallet import writer as writer_module

    class NoProcesses:
        def Process(self, **_: object) -> object:  # multiprocessing's name
            raise OSError("no processes here")

    monkeypatch.setattr(writer_module, "_context", NoProcesses)
    services = AppServices.build(settings.model_copy(update={"wallet_writer": "process"}))
    try:
        account = await make_account(services, balance_micros=1_000)
        (result,) = await services.meter.writer.hold_many([HoldRequest(account.id, 10, "x")])
        assert isinstance(result, WalletWriterUnavailable)
        assert result.status == 503
    finally:
        await services.close()


async def test_the_writer_answers_an_unknown_operation_and_stops_on_a_malformed_frame(
    settings: Settings,
) -> None:
    """The writer's side of the socket, run here: an operation or a settlement mode it does not
    know gets a "failed" answer (the caller is not left waiting); bytes that are not a frame end the
    conversation instead of being guessed at."""
    import socket

    from aivax.wallet.writer import _frame, _read_frame, _serve

    ours, theirs = socket.socketpair()
    serving = asyncio.ensure_future(_serve(settings, theirs))
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        writer.write(_frame([7, "drop_tables", []]))
        answer = await asyncio.wait_for(_read_frame(reader), 10)
        assert answer == [7, "failed", "unknown operation 'drop_tables'"]
        writer.write(_frame([8, "settle", [[None, 0, None, "refund_everyone"]]]))
        answer = await asyncio.wait_for(_read_frame(reader), 10)
        assert answer == [8, "failed", "unknown settlement mode 'refund_everyone'"]
        writer.write(b"\x00\x00\x00\x05not{}")  # a length, then no JSON
        await asyncio.wait_for(serving, 10)  # returns: the writer is done with this socket
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_the_writer_serves_a_waiting_hold_before_a_waiting_settlement(
    settings: Settings, services: AppServices
) -> None:
    """A call waits for its hold; nobody waits for a settlement. When both are waiting, the
    hold is written first, whatever order they came in."""
    import socket

    from aivax.wallet.writer import _frame, _read_frame, _serve

    account = await make_account(services, balance_micros=10_000)
    ours, theirs = socket.socketpair()
    serving = asyncio.ensure_future(_serve(settings, theirs))
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        # Both frames in one write: both are waiting when the writer picks its next message.
        writer.write(
            _frame([1, "settle", [[None, 0, None, "hold"]]])
            + _frame([2, "hold", [[account.id.hex, 1_000, "first-call", 0]]])
        )
        first = await asyncio.wait_for(_read_frame(reader), 10)
        second = await asyncio.wait_for(_read_frame(reader), 10)
        assert first[:2] == [2, "ok"]
        assert first[2][0][0] == "held"
        assert second == [1, "ok", 1]  # one settlement done
    finally:
        writer.close()
        await asyncio.wait_for(serving, 10)
    assert await balance_and_ledger_sum(services, account.id) == (9_000, 9_000)


async def test_a_hold_is_answered_between_chunks_of_a_long_settlement(
    settings: Settings, services: AppServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement batch is written in chunks; a hold that arrives while one is being written
    is answered before the rest of the batch (it waits for one chunk, not the whole batch).
    The WAL is checkpointed by the writer itself as it goes."""
    if not settings.is_sqlite:
        pytest.skip("SQLite only: PostgreSQL writes a settlement batch in one transaction")
    import socket

    from aivax.db import Database
    from aivax.wallet import writer as writer_module
    from aivax.wallet.writer import SETTLE_CHUNK, _frame, _read_frame, _serve

    account = await make_account(services, balance_micros=10_000)
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    real = writer_module._settle_with_retry
    chunks: list[int] = []

    async def settle_chunk(database: Database, items: Any, **options: bool) -> int:
        if not chunks:  # while the first chunk is being written, a call asks for its hold
            writer.write(_frame([2, "hold", [[account.id.hex, 1_000, "during", 0]]]))
            await writer.drain()
            await asyncio.sleep(0.05)
        chunks.append(len(items))
        return await real(database, items, **options)

    checkpoints: list[bool] = []
    checkpoint = Database.checkpoint_if_due
    monkeypatch.setattr(writer_module, "_settle_with_retry", settle_chunk)
    monkeypatch.setattr(
        Database, "checkpoint_if_due", lambda self: checkpoints.append(True) or checkpoint(self)
    )
    serving = asyncio.ensure_future(_serve(settings, theirs))
    try:
        writer.write(_frame([1, "settle", [[None, 0, None, "hold"]] * (3 * SETTLE_CHUNK)]))
        first = await asyncio.wait_for(_read_frame(reader), 10)
        second = await asyncio.wait_for(_read_frame(reader), 10)
    finally:
        writer.close()
        await asyncio.wait_for(serving, 10)
    assert first[:2] == [2, "ok"]
    assert first[2][0][0] == "held"
    assert second == [1, "ok", 3 * SETTLE_CHUNK]  # that many settlements done
    assert chunks == [SETTLE_CHUNK] * 3
    assert len(checkpoints) >= 2  # after each message (and after a transaction the thread wrote)


@pytest.mark.parametrize(
    "message", [{"op": "hold"}, [1, "hold"], "hold"], ids=["object", "short", "string"]
)
async def test_the_writer_stops_on_json_that_is_no_message(
    settings: Settings, message: object
) -> None:
    """A frame of valid JSON that is not [id, op, payload] ends the conversation too: nothing
    after it on this socket can be trusted, and it has no id to answer."""
    import socket

    from aivax.wallet.writer import _frame, _serve

    ours, theirs = socket.socketpair()
    serving = asyncio.ensure_future(_serve(settings, theirs))
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        writer.write(_frame(message))
        await asyncio.wait_for(serving, 10)  # returns: the writer is done with this socket
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_the_server_starts_its_writer_before_the_first_request(settings: Settings) -> None:
    application = create_app(settings.model_copy(update={"wallet_writer": "process"}))
    async with LifespanManager(application):
        writer = application.state.services.meter.writer
        assert isinstance(writer, ProcessWriter)
        assert writer._process is not None
        assert writer._process.is_alive()


async def test_a_writer_that_cannot_start_at_boot_does_not_stop_the_server(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_processes() -> None:
        raise OSError("no processes here")

    monkeypatch.setattr(writer_module, "_context", no_processes)
    application = create_app(settings.model_copy(update={"wallet_writer": "process"}))
    async with LifespanManager(application):
        services = application.state.services
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
            assert (await http.get("/healthz")).status_code == 200
        account = await make_account(services, balance_micros=1_000)
        (result,) = await services.meter.writer.hold_many([HoldRequest(account.id, 1, "boot")])
        assert isinstance(result, WalletWriterUnavailable)  # each call tries again, and says so
