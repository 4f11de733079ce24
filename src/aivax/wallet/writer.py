"""Where the hot path's wallet writes run: wallet holds (`holds.hold_many`) and settlement
batches (`closing.settle_many` plus request-log rows).

- `InlineWriter` runs them in this process, through `Database.write` / `Database.run_write`.
- `ProcessWriter` (the default, `AIVAX_WALLET_WRITER=process`) hands them to a wallet-writer
  process of its own, which owns a connection pool and runs the same ledger functions. The
  server process then spends no CPU on the database's side of a call under load (a lone call's
  hold is still written by the server, see `hold_queue`): on SQLite, statements, parameter
  processing and commits; on PostgreSQL, the async driver's work. In the server they cost
  about a third of its throughput (bench/gateway.py), and every call pays them twice (hold,
  then settlement). What crosses is small: a hold is an account, an amount and a reference; a
  settlement is a hold id, a cost and the request-log row.

The writer process answers a waiting hold before a waiting settlement, and on SQLite writes
settlements a chunk at a time with the holds that came meanwhile answered in between: a call
waits for its hold, nobody waits for a settlement (`_Session`).

The writer process is forked from a fork server that has already imported this module, so
starting one takes milliseconds. It ends when the server closes its socket, or when the server
dies (its end of the socket closes with it). If the writer dies, the calls waiting on it fail
with 503 (retryable), the settlements it had not written are kept by the settler and sent
again (`wallet.settlement`), and the next write starts a new writer.

A settlement batch is answered with how many of its items, from the first, are done: written, or
refused for good (an error the database's return would not cure: logged, and the call goes
uncharged). The rest were not written because the database did not answer; the settler keeps
them, in order, and sends them again later as a "replay", which first skips the items whose
request-log row is already in the database (their transaction committed, but its answer was
lost): a settlement and its row are written in one transaction, so replaying never charges twice.

Wire format: frames of a 4-byte big-endian length and a JSON array (orjson):
  request  [id, "hold", [[account_id, amount, ref, minimum], ...]]
           [id, "settle" | "replay", [[hold_id | null, cost, log_row | null, mode], ...]]
  reply    [id, "ok", results]  |  [id, "failed", message]
A hold's result is ["held", hold_id] or [error_kind, message, param]; a settlement's result is
the number of its items done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing
import socket
import struct
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, cast, get_args

import orjson
import uvloop
from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError, NotSupportedError, ProgrammingError

from aivax.config import Settings
from aivax.db import Database, FastStatement, connection_lost
from aivax.errors import AppError, ServiceUnavailable
from aivax.models import RequestLog
from aivax.wallet import closing, holds, ledger
from aivax.wallet.holds import HoldRequest

logger = logging.getLogger("aivax.wallet.writer")

HoldResult = uuid.UUID | Exception
# What a settlement batch carries per call: the hold (None: nothing was held), the amount to
# charge, the request-log row (None: no row) and what to do with the hold (`SettleMode`).
SettleMode = Literal["hold", "lease", "close"]
SettleItem = tuple[uuid.UUID | None, int, dict[str, Any] | None, SettleMode]
SETTLE_MODES: tuple[SettleMode, ...] = get_args(SettleMode)

_INSERT_LOG = FastStatement(insert(RequestLog))  # see the note in wallet.ledger
_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024
# How long the server waits for the writer to finish what it was given when shutting down.
CLOSE_TIMEOUT_SECONDS = 30.0


class WalletWriterUnavailable(ServiceUnavailable):
    code = "wallet_unavailable"


class _WriterFailed(WalletWriterUnavailable):
    """The writer answered that it could not carry out a message at all."""


class WalletWriter(Protocol):
    async def hold_many(self, requests: Sequence[HoldRequest]) -> list[HoldResult]:
        """Each request's hold id, or the exception that refused it; a failure of the batch
        as a whole is reported on every request."""
        ...

    async def settle(self, items: Sequence[SettleItem], *, replay: bool = False) -> int:
        """Settle the holds and write the log rows, in one transaction when possible; how
        many of `items`, from the first, are done (see the module's docstring): the rest were
        not written because the database is unavailable. `replay`: some of the items may
        have been written already; skip those."""
        ...

    async def start(self) -> None:
        """Get ready for the first call, so the first requests after boot do not wait for it
        (a failure is logged; the first call then tries again)."""
        ...

    async def close(self) -> None: ...


# --- the database side, shared by both writers ----------------------------------------------


_LOGS = cast(Table, RequestLog.__table__)
# Errors that a retry would meet again: of the data (a hold settled twice in two ways, a
# constraint) or of the code. Anything else — a refused or lost connection, a database that is
# starting, shutting down or locked, a writer process that died — may pass when the database
# answers again.
_NEVER_HEALS: tuple[type[BaseException], ...] = (
    AppError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    IntegrityError,
    DataError,
    ProgrammingError,
    NotSupportedError,
)


def unavailable(error: BaseException) -> bool:
    """Whether a failed settlement is worth trying again later."""
    return isinstance(error, WalletWriterUnavailable) or not isinstance(error, _NEVER_HEALS)


def _settle(conn: Connection, items: Sequence[SettleItem], *, replay: bool = False) -> None:
    """Modes: "hold" settles a call's own hold at the cost (0 releases it); "lease" records
    the cost against a lease (`closing.charge_holds`); "close" closes a lease at what was
    recorded against it (`closing.close_recorded`), after this batch's charges. `replay`: skip
    the items already written (`_not_written`)."""
    if replay:
        items = _not_written(conn, items)
    holds: list[tuple[uuid.UUID, int]] = []
    charges: dict[uuid.UUID, int] = {}
    closes: list[uuid.UUID] = []
    for hold_id, cost, _, mode in items:
        if hold_id is None:
            continue
        if mode == "hold":
            holds.append((hold_id, cost))
        elif mode == "lease":
            charges[hold_id] = charges.get(hold_id, 0) + cost
        else:
            closes.append(hold_id)
    closing.lock_accounts_of(conn, [*charges, *closes])
    if holds:
        closing.settle_many(conn, holds)
    if charges:
        closing.charge_holds(conn, charges)
    for hold_id in closes:
        closing.close_recorded(conn, hold_id)
    logs = [log for _, _, log, _ in items if log is not None]
    if logs:
        _INSERT_LOG.many(conn, logs)


def _not_written(conn: Connection, items: Sequence[SettleItem]) -> list[SettleItem]:
    """The items not yet in the database. An item with a request-log row was written if its
    row is there (the row commits with the item's ledger writes; it is matched on its account,
    request id and creation time). An item without one is safe to write again: a hold leaves
    `open` once, so settling, releasing or closing it a second time does nothing. (A lease
    charge always comes with its row: `inference.execute.finish` writes one for every call.)"""
    logs = [log for _, _, log, _ in items if log is not None]
    if not logs:
        return list(items)
    stamps = [log["created_at"] for log in logs]
    query = select(_LOGS.c.account_id, _LOGS.c.request_id, _LOGS.c.created_at).where(
        _LOGS.c.account_id.in_({log["account_id"] for log in logs}),
        _LOGS.c.created_at >= min(stamps),
        _LOGS.c.created_at <= max(stamps),
        _LOGS.c.request_id.in_({log["request_id"] for log in logs}),
    )
    written = {tuple(row) for row in conn.execute(query)}
    return [
        item
        for item in items
        if item[2] is None
        or (item[2]["account_id"], item[2]["request_id"], item[2]["created_at"]) not in written
    ]


async def _write_holds(database: Database, requests: Sequence[HoldRequest]) -> list[HoldResult]:
    """One transaction for the batch — on PostgreSQL a lone hold is one statement and needs
    none — retried once on a connection that turned out to be gone. (If that connection had
    committed before it went, the retry holds twice; the extra hold is never settled and the
    reaper releases it.)"""

    async def attempt() -> list[HoldResult]:
        if database.is_postgresql and len(requests) == 1:
            return [await _lone_hold_on_postgresql(database, requests[0])]
        taken = await database.write(lambda conn: holds.hold_many(conn, list(requests)))
        return list(taken)

    try:
        return await attempt()
    except Exception as exc:
        if not connection_lost(exc):
            raise
        logger.warning("the database connection was lost (%s); retrying the holds", exc)
    return await attempt()


async def _lone_hold_on_postgresql(database: Database, request: HoldRequest) -> HoldResult:
    """One statement on the asyncpg connection itself, committed on its own: SQLAlchemy's
    asyncio layer cost more than the statement's round trip (0.6 against 0.4 ms). A connection
    that fails mid-statement is dropped, not reused; if it was lost, so is the rest of the pool
    (SQLAlchemy does the same when it sees a lost connection itself)."""
    hold_id, params = holds.one_statement_hold(request)
    async with database.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        try:
            taken = await holds.HOLD_ONE_STATEMENT.first_on_asyncpg(
                raw.driver_connection, conn.dialect, params
            )
        except BaseException as exc:
            await conn.invalidate(exc if isinstance(exc, Exception) else None)
            if connection_lost(exc):  # the others in the pool are likely gone too
                await database.engine.dispose()
            raise
        if taken is not None:
            return hold_id
        return await conn.run_sync(
            lambda c: ledger.refusal(c, request.account_id, request.amount_micros)
        )


async def _hold_with_retry(database: Database, requests: Sequence[HoldRequest]) -> list[HoldResult]:
    """One transaction for the batch; if it fails as a whole, one per hold, so a failure
    reaches only the request it belongs to."""
    try:
        return await _write_holds(database, requests)
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
        logger.warning(
            "a batch of %d holds failed (%s); taking them one by one", len(requests), exc
        )
    return [(await _hold_with_retry(database, [request]))[0] for request in requests]


async def _settle_with_retry(
    database: Database, items: Sequence[SettleItem], *, here: bool = False, replay: bool = False
) -> int:
    """Settle `items` in one transaction or, when that fails for good, one by one; how many of
    them, from the first, are done (written, or refused for good and logged). It stops at the
    first failure the database's return may cure: the rest are left, in order, to be sent again.
    `here`: on SQLite, write on the calling thread when the write lock is free (the writer
    process, whose event loop has nothing else to do) instead of the writer thread."""
    try:
        if here:
            await database.write(lambda conn: _settle(conn, items, replay=replay))
        else:
            await database.run_write(lambda conn: _settle(conn, items, replay=replay))
        return len(items)
    except Exception as exc:
        if unavailable(exc):
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("settling %d calls failed (%s); they are kept", len(items), reason)
            return 0
        if len(items) == 1:
            hold_id, _, log, _ = items[0]
            logger.exception(
                "settling %s failed for good; it goes uncharged",
                log.get("request_id") if log else hold_id,
            )
            return 1
        logger.exception("batch settlement failed; settling one by one")
    for index, item in enumerate(items):
        if not await _settle_with_retry(database, [item], here=here, replay=replay):
            return index
    return len(items)


class InlineWriter:
    """The wallet's hot-path writes in this process (`AIVAX_WALLET_WRITER=inline`)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def hold_many(self, requests: Sequence[HoldRequest]) -> list[HoldResult]:
        return await _hold_with_retry(self.database, requests)

    async def settle(self, items: Sequence[SettleItem], *, replay: bool = False) -> int:
        return await _settle_with_retry(self.database, items, replay=replay)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --- the wire format ------------------------------------------------------------------------

_LOG_UUIDS = ("account_id", "key_id", "gateway_id")


def _wire_default(value: Any) -> str:
    # UUIDs that are not `uuid.UUID` instances (asyncpg returns its own UUID type).
    if hasattr(value, "hex") and hasattr(value, "urn"):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be sent to the wallet writer")


def _frame(message: Any) -> bytes:
    body = encode(message)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"wallet writer frame of {size} bytes")
    return orjson.loads(await reader.readexactly(size))


def _log_from_wire(row: dict[str, Any]) -> dict[str, Any]:
    for name in _LOG_UUIDS:
        if row.get(name) is not None:
            row[name] = uuid.UUID(row[name])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    row.setdefault("step", 1)  # journaled by a server from before request steps
    return row


def item_to_wire(item: SettleItem) -> list[Any]:
    """A settlement as it crosses to the writer process and is kept in the settlement journal
    (`encode` turns it into bytes)."""
    return list(item)


def item_from_wire(wire: Sequence[Any]) -> SettleItem:
    hold_id, cost, log, mode = wire
    return (
        uuid.UUID(hold_id) if hold_id else None,
        int(cost),
        _log_from_wire(log) if log else None,
        _settle_mode(mode),
    )


def encode(message: Any) -> bytes:
    return orjson.dumps(message, default=_wire_default)


# Refusals a hold may meet, by the name that crosses the wire.
_REFUSALS: dict[str, type[Exception]] = {
    "insufficient_balance": ledger.InsufficientBalance,
    "account_not_found": ledger.WalletAccountNotFound,
    "invalid_amount": ValueError,
}


def _hold_result_to_wire(result: HoldResult) -> list[Any]:
    if isinstance(result, uuid.UUID):
        return ["held", result.hex]
    for kind, cls in _REFUSALS.items():
        if type(result) is cls:
            return [kind, str(result), getattr(result, "param", None)]
    logger.error("a hold failed: %r", result)
    return ["failed", "The wallet could not take the hold; retry shortly.", None]


def _hold_result_from_wire(wire: list[Any]) -> HoldResult:
    kind, value = wire[0], wire[1]
    if kind == "held":
        return uuid.UUID(value)
    param = wire[2] if len(wire) > 2 else None
    cls = _REFUSALS.get(kind)
    if cls is None:
        return WalletWriterUnavailable(str(value))
    if issubclass(cls, AppError):
        return cls(str(value), param=param)
    return cls(str(value))


# --- the writer process ---------------------------------------------------------------------


async def _serve(settings: Settings, sock: socket.socket) -> None:
    """Answer the server's requests until it closes its end (see `_Session`)."""
    # No ping per checkout on PostgreSQL (a round trip per transaction): a lost connection
    # fails its batch, which is retried (holds) or settled item by item (settlements).
    database = Database(settings, pre_ping=False, async_commit=settings.wallet_async_commit)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await _Session(database, reader, writer).run()
    finally:
        writer.close()
        await database.dispose()


# On SQLite, settlements are written this many calls per transaction, so a hold that arrives
# meanwhile waits for one of these at most, not for a whole batch. (On PostgreSQL each commit
# waits for the WAL to reach the disk, and a batch in one transaction measured 14% more calls
# per second at concurrency 16.)
SETTLE_CHUNK = 16


class _Session:
    """The writer's side of the socket. Frames are read as they arrive; a waiting hold goes
    before a waiting settlement, and between two chunks of a settlement: a call waits for its
    hold, while nobody waits for a settlement. Everything is written on this process's own
    thread (its event loop has nothing else to do), and the WAL is checkpointed when due."""

    def __init__(
        self, database: Database, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.database = database
        self.reader = reader
        self.writer = writer
        self.inbox: collections.deque[list[Any]] = collections.deque()
        self.arrived = asyncio.Event()

    async def run(self) -> None:
        reading = asyncio.get_running_loop().create_task(self._read())
        try:
            while True:
                while not self.inbox:
                    if reading.done():
                        return  # the server closed its end, or sent something not a frame
                    self.arrived.clear()
                    await self.arrived.wait()
                await self._reply(_next_message(self.inbox))
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    async def _read(self) -> None:
        try:
            while True:
                try:
                    message = await _read_frame(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the server closed its end, or died
                except ValueError:  # not a frame of ours: nothing more on this socket can be
                    logger.exception("the wallet writer got a malformed frame; stopping")
                    return
                if not (isinstance(message, list) and len(message) == 3):
                    logger.error("the wallet writer got a malformed message; stopping")
                    return
                self.inbox.append(message)
                self.arrived.set()
        finally:
            self.arrived.set()  # wake the loop to see that reading ended

    async def _reply(self, message: list[Any]) -> None:
        self.writer.write(_frame(await self._answer(message)))
        await self.writer.drain()
        self.database.checkpoint_if_due()
        await asyncio.sleep(0)  # let frames that came meanwhile into the inbox

    async def _answer(self, message: list[Any]) -> list[Any]:
        request_id, op, payload = message
        try:
            if op == "hold":
                requests = [
                    HoldRequest(uuid.UUID(a), int(m), str(r), int(f)) for a, m, r, f in payload
                ]
                results = await _hold_with_retry(self.database, requests)
                return [request_id, "ok", [_hold_result_to_wire(r) for r in results]]
            if op in ("settle", "replay"):
                items = [item_from_wire(wire) for wire in payload]
                done = await self._settle(items, replay=op == "replay")
                return [request_id, "ok", done]
            return [request_id, "failed", f"unknown operation {op!r}"]
        except Exception as exc:  # a bug: answer, so the caller does not wait forever
            logger.exception("wallet writer operation %s failed", op)
            return [request_id, "failed", str(exc)]

    async def _settle(self, items: list[SettleItem], *, replay: bool) -> int:
        size = len(items) if self.database.is_postgresql else SETTLE_CHUNK
        done = 0
        for start in range(0, len(items), size):
            if start:
                await self._holds_waiting()
            chunk = items[start : start + size]
            written = await _settle_with_retry(self.database, chunk, here=True, replay=replay)
            done += written
            if written < len(chunk):
                break
        return done

    async def _holds_waiting(self) -> None:
        """Answer the holds that arrived while a settlement was being written."""
        await asyncio.sleep(0)  # let them into the inbox
        while any(message[1] == "hold" for message in self.inbox):
            await self._reply(_next_message(self.inbox))


def _settle_mode(wire: Any) -> SettleMode:
    if wire not in SETTLE_MODES:
        raise ValueError(f"unknown settlement mode {wire!r}")
    return cast(SettleMode, wire)


def _next_message(inbox: collections.deque[list[Any]]) -> list[Any]:
    """The oldest waiting hold, else the oldest message."""
    for message in inbox:
        if message[1] == "hold":
            inbox.remove(message)
            return message
    return inbox.popleft()


def _child_main(settings: Settings, sock: socket.socket) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(_serve(settings, sock))


def _context() -> Any:
    """A fork server that has imported this module: each writer is a fork of it (fast, and
    safe: the fork server runs no threads)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class ProcessWriter:
    """The wallet's hot-path writes in a wallet-writer process (`AIVAX_WALLET_WRITER=process`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()

    async def hold_many(self, requests: Sequence[HoldRequest]) -> list[HoldResult]:
        payload = [[r.account_id, r.amount_micros, r.ref, r.minimum_balance] for r in requests]
        try:
            wire = await self._call("hold", payload)
        except WalletWriterUnavailable as exc:
            return [exc for _ in requests]
        return [_hold_result_from_wire(result) for result in wire]

    async def settle(self, items: Sequence[SettleItem], *, replay: bool = False) -> int:
        payload = [item_to_wire(item) for item in items]
        try:
            done = await self._call("replay" if replay else "settle", payload)
        except _WriterFailed:  # a bug on the writer's side: it would fail the same way again
            logger.exception("the wallet writer could not read a batch of %d calls", len(items))
            return len(items)
        except WalletWriterUnavailable as exc:
            logger.warning("a settlement batch of %d calls was not written: %s", len(items), exc)
            return 0
        return int(done)

    async def _call(self, op: str, payload: Any) -> Any:
        try:
            await self._ensure_started()
        except Exception as exc:  # e.g. no process can be started here
            logger.exception("the wallet writer could not be started")
            raise WalletWriterUnavailable("The wallet is not available; retry shortly.") from exc
        assert self._writer is not None  # noqa: S101 - started
        request_id = next(self._ids)
        frame = _frame([request_id, op, payload])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(frame)
        except (ConnectionError, RuntimeError) as exc:
            self._waiting.pop(request_id, None)
            raise WalletWriterUnavailable("The wallet is not available; retry shortly.") from exc
        # Shielded: a caller that leaves does not take the answer with it (a hold taken for
        # it is given back by the hold queue).
        return await asyncio.shield(future)

    async def start(self) -> None:
        try:
            await self._ensure_started()
        except Exception:
            logger.exception("the wallet writer could not be started; the first call retries")

    async def _ensure_started(self) -> None:
        if self._replies is not None and not self._replies.done():
            return
        async with self._starting:
            if self._replies is not None and not self._replies.done():
                return
            await self._stop_process()
            ours, theirs = socket.socketpair()
            try:
                process = _context().Process(
                    target=_child_main,
                    args=(self.settings, theirs),
                    name="aivax-wallet-writer",
                    daemon=True,
                )
                await asyncio.to_thread(process.start)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()  # the writer has its own copy
            self._process = process
            reader, self._writer = await asyncio.open_connection(sock=ours)
            self._replies = asyncio.get_running_loop().create_task(self._read_replies(reader))
            logger.info("wallet writer started (pid %s)", process.pid)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                request_id, status, result = await _read_frame(reader)
                future = self._waiting.pop(request_id, None)
                if future is None or future.done():
                    continue
                if status == "ok":
                    future.set_result(result)
                else:
                    future.set_exception(_WriterFailed(str(result)))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            if self._waiting:
                logger.error(
                    "the wallet writer stopped with %d calls waiting: %s", len(self._waiting), exc
                )
        finally:
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(
                        WalletWriterUnavailable("The wallet writer stopped; retry shortly.")
                    )

    async def _stop_process(self) -> None:
        """Close the socket (the writer ends after what it is doing) and reap the process."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._replies is not None:
            self._replies.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replies
            self._replies = None
        process, self._process = self._process, None
        if process is not None:
            await asyncio.to_thread(process.join, CLOSE_TIMEOUT_SECONDS)
            if process.is_alive():
                logger.error("the wallet writer did not stop; killing it")
                process.kill()
                await asyncio.to_thread(process.join)

    async def close(self) -> None:
        """Let the writer finish what it was given, then stop it."""
        if self._waiting:
            await asyncio.wait(list(self._waiting.values()), timeout=CLOSE_TIMEOUT_SECONDS)
        await self._stop_process()


def build_writer(settings: Settings, database: Database) -> WalletWriter:
    if settings.wallet_writer == "process":
        return ProcessWriter(settings)
    return InlineWriter(database)
