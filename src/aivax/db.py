"""Engine and session factories. The request (or job, or CLI command) owns the transaction:
`get_session` commits on success and rolls back on error; services only flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from sqlalchemy import JSON, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aivax.config import Settings

T = TypeVar("T")
logger = logging.getLogger("aivax.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Pages are read through a memory map instead of a read() call each: after the other process
# (the wallet writer) commits, the next transaction here re-reads the pages it changed, which
# on the chat path was about five read calls per call. Writes still go through the WAL.
# Address space only, not memory.
SQLITE_MMAP_BYTES = 256 * 1024 * 1024


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
    cursor.close()


def _sqlite_pragmas_no_wait(dbapi_connection: Any, record: Any) -> None:
    """The hot-path write connection waits for nothing by default: not for the write lock
    (the writer thread turns the busy wait on for its own transactions), and not for a WAL
    checkpoint, which syncs the disk (`Database` runs them on a connection of their own)."""
    _sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


# How often the writer thread copies the hot-path connection's WAL back into the database.
# A checkpoint with nothing new to copy costs next to nothing; at full load a second of writes
# is a few thousand WAL pages, which SQLite then reuses from the start of the file.
WAL_CHECKPOINT_SECONDS = 1.0


def connection_lost(error: BaseException) -> bool:
    """A database error raised because the connection was gone (the server restarted, or a
    pooled connection went stale): through SQLAlchemy, which has dropped it from the pool, or
    straight from asyncpg (`FastStatement.first_on_asyncpg`)."""
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated)
    try:
        from asyncpg import exceptions as asyncpg_errors
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    lost = (
        asyncpg_errors.ConnectionDoesNotExistError,
        asyncpg_errors.InterfaceError,
        # The server's goodbye on an idle pooled connection racing the next query: asyncpg
        # refuses to start it ("another operation is in progress"); nothing was sent.
        asyncpg_errors.InternalClientError,
        asyncpg_errors.PostgresConnectionError,
        asyncpg_errors.AdminShutdownError,
        ConnectionError,
    )
    return isinstance(error, lost)


def _is_busy(error: OperationalError | sqlite3.OperationalError) -> bool:
    # Raised by SQLAlchemy (wrapping the driver's error) or by the driver itself (FastStatement).
    driver_error = error.orig if isinstance(error, OperationalError) else error
    code = getattr(driver_error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class NotNow(enum.Enum):
    NOT_NOW = "not now"


NOT_NOW = NotNow.NOT_NOW


def ensure_sqlite_directory(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def create_engine(
    settings: Settings, *, pre_ping: bool = True, async_commit: bool = False
) -> AsyncEngine:
    if settings.is_sqlite:
        ensure_sqlite_directory(settings.database_url)
        engine = create_async_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_size,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
        # asyncpg sends these with each new connection.
        connect_args={"server_settings": {"synchronous_commit": "off"}} if async_commit else {},
    )


class Database:
    """The engine plus its session factory; built in the app lifespan or a CLI command.

    PostgreSQL only: `pre_ping=False` takes connections from the pool without a round trip to
    check them (the caller retries when a stale one fails, see `connection_lost`);
    `async_commit=True` commits without waiting for the WAL to reach the disk."""

    def __init__(
        self, settings: Settings, *, pre_ping: bool = True, async_commit: bool = False
    ) -> None:
        self.is_postgresql = not settings.is_sqlite
        self.engine = create_engine(settings, pre_ping=pre_ping, async_commit=async_commit)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Hot-path writes on SQLite go through one synchronous connection, shared (under
        # `_write_lock`) by a dedicated writer thread, which runs each whole transaction in a
        # single hop instead of one thread hop per statement, and by short transactions run
        # inline on the event loop (`write_now`). One connection keeps its page cache: two
        # connections writing in turn each find the other's changes and re-read the pages
        # (measured: a third less CPU per hold taken alone).
        self._write_engine: Engine | None = None
        self._write_connection: Connection | None = None  # opened once, used under the lock
        self._write_lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._database_path: str | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointed = time.monotonic()
        if settings.is_sqlite:
            url = make_url(settings.database_url).set(drivername="sqlite")
            self._write_engine = sa_create_engine(
                url, pool_size=1, max_overflow=0, connect_args={"check_same_thread": False}
            )
            event.listen(self._write_engine, "connect", _sqlite_pragmas_no_wait)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivax-writer")
            if url.database and url.database != ":memory:":
                self._database_path = str(Path(url.database).expanduser())

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Run `work(connection)` in one committed transaction (rolled back if it raises)."""
        if self._write_engine is not None and self._writer is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writer, self._write_in_thread, work)
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    def _write_in_thread(self, work: Callable[[Connection], T]) -> T:
        """The writer thread's transaction: it waits for the write lock like any connection
        (another process, or the app's other connections, may hold it)."""
        with self._write_lock:
            connection = self._writing_connection()
            driver = connection.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)  # noqa: S101 - pysqlite
            driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            try:
                with connection.begin():
                    result = work(connection)
            finally:
                driver.execute("PRAGMA busy_timeout=0")
        self.checkpoint_if_due()
        return result

    def _writing_connection(self) -> Connection:
        """The hot-path write connection, under `_write_lock`. It stays checked out for the
        life of the `Database`: a checkout and a new `Connection` per transaction cost about as
        much CPU as a lone hold's statements (profile of a concurrency-1 run)."""
        assert self._write_engine is not None  # noqa: S101 - SQLite only
        if self._write_connection is None or self._write_connection.invalidated:
            if self._write_connection is not None:
                self._write_connection.close()
            self._write_connection = self._write_engine.connect()
        return self._write_connection

    def checkpoint_if_due(self) -> None:
        """At most once a second, outside the write lock: copy the WAL back into the database
        on a connection of its own, so the disk sync never holds up a write (PASSIVE: it waits
        for no reader or writer). Called by the writer thread after each transaction, and by
        the wallet-writer process after each message (never on the server's event loop). A
        no-op on PostgreSQL."""
        now = time.monotonic()
        if self._database_path is None or now - self._checkpointed < WAL_CHECKPOINT_SECONDS:
            return
        self._checkpointed = now
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self._database_path, check_same_thread=False)
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            logger.exception("WAL checkpoint failed; the next one will retry")

    def write_now(self, work: Callable[[Connection], T]) -> T | NotNow:
        """Run a short `work(connection)` transaction right here, on the calling thread, if
        that costs no waiting: on SQLite, when the write lock is free at once (the connection
        has no busy wait, so a locked database answers immediately). `NOT_NOW` otherwise —
        always on PostgreSQL — and the caller goes through `run_write`. For a short transaction
        the hop to the writer thread and back (and the writer's waits for the GIL while the
        event loop is busy) cost more than the transaction itself."""
        if self._write_engine is None or not self._write_lock.acquire(blocking=False):
            return NOT_NOW
        try:
            connection = self._writing_connection()
            with connection.begin():
                return work(connection)
        except (OperationalError, sqlite3.OperationalError) as exc:
            if _is_busy(exc):
                return NOT_NOW
            raise
        finally:
            self._write_lock.release()

    async def write(self, work: Callable[[Connection], T]) -> T:
        """`write_now` when that costs no waiting, else `run_write`."""
        done = self.write_now(work)
        return await self.run_write(work) if done is NOT_NOW else done

    async def dispose(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._write_connection is not None:
            with self._write_lock:
                self._write_connection.close()
                self._write_connection = None
        if self._write_engine is not None:
            self._write_engine.dispose()
        if self._checkpointer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._checkpointer.close()
        await self.engine.dispose()


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    database: Database = request.app.state.services.database
    async with database.sessions() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


# scope="function": the commit happens before the response is sent, so a failed commit is
# reported to the client instead of being hidden behind an already-sent 200.
SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]


def insert_ignoring_conflicts(dialect: str, table: Any, *, conflict_on: list[str]) -> Any:
    """`INSERT … ON CONFLICT (cols) DO NOTHING` for `dialect` ("sqlite" or "postgresql")."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=conflict_on)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=conflict_on)


class FastStatement:
    """A Core statement that also runs straight on the pysqlite connection of a SQLite writer.

    For the wallet's small hot-path statements, SQLAlchemy's per-execution machinery (execution
    context, per-row parameter processing, result wrapping) costs more CPU than SQLite itself
    (bench/gateway.py). On a pysqlite connection the statement is compiled once per set of
    parameter names (an INSERT takes its columns from them); parameters go through the same type
    processors SQLAlchemy applies (UUIDs, datetimes, JSON), Python-side column defaults
    (`updated_at`) are filled in the same way, and RETURNING values come back through the
    columns' result processors. Every other connection (PostgreSQL, the async SQLite engine)
    executes the Core statement as usual, so the statement is written once.

    `first_on_asyncpg` runs it the same way on a raw asyncpg connection, for the one PostgreSQL
    statement whose round trip is on every call's response path (a lone hold).
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        # Keyed by dialect and the parameter names in the caller's order: a call site always
        # builds its dict the same way, and a tuple is cheaper to make and hash than a set.
        self._compiled_by: dict[tuple[str, tuple[str, ...]], _Compiled] = {}

    def one(self, conn: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Execute once; the first RETURNING row, if any."""
        raw = _pysqlite(conn)
        if raw is None:
            row = conn.execute(self.statement, params).first()
            return tuple(row) if row is not None else None
        compiled = self._compiled(conn.dialect, params)
        rows = raw.execute(compiled.sql, compiled.arguments(params)).fetchall()
        return compiled.row(rows[0]) if rows else None

    def many(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Execute once per row of parameters (no RETURNING); every row has the same keys."""
        raw = _pysqlite(conn)
        if raw is None:
            conn.execute(self.statement, rows)
            return
        compiled = self._compiled(conn.dialect, rows[0])
        raw.executemany(compiled.sql, [compiled.arguments(row) for row in rows])

    async def first_on_asyncpg(
        self, driver: Any, dialect: Any, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """Execute on `driver`, an asyncpg connection with no transaction open (the statement
        commits on its own); the first row it returns, if any."""
        compiled = self._compiled(dialect, params)
        row = await driver.fetchrow(compiled.sql, *compiled.arguments(params))
        return compiled.row(row) if row is not None else None

    def _compiled(self, dialect: Any, params: dict[str, Any]) -> _Compiled:
        key = (dialect.name, tuple(params))
        compiled_for = self._compiled_by.get(key)
        if compiled_for is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=list(params))
            defaults = {
                column.key: column
                for column in [*compiled.insert_prefetch, *compiled.update_prefetch]
            }
            positions = compiled.positiontup or []
            missing = [name for name in positions if name not in params]
            returned = compiled.returning or list(getattr(self.statement, "selected_columns", []))
            compiled_for = self._compiled_by[key] = _Compiled(
                sql=str(compiled),
                binds=[
                    (name, _bind_processor(compiled.binds[name].type, dialect))
                    for name in positions
                ],
                defaults=[
                    (name, _default_of(name, defaults.get(name), compiled.binds[name]))
                    for name in missing
                ],
                results=[
                    column.type.dialect_impl(dialect).result_processor(dialect, None)
                    for column in returned
                ],
            )
        return compiled_for


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    binds: list[tuple[str, Callable[[Any], Any] | None]]  # positional order
    defaults: list[tuple[str, Callable[[Any], Any]]]  # names the caller leaves to the column
    results: list[Any]

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        """The positional parameters of one execution, each through its bind processor."""
        if self.defaults:
            params = {**params, **{name: make(None) for name, make in self.defaults}}
        return [
            params[name] if process is None else process(params[name])
            for name, process in self.binds
        ]

    def row(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """A returned row, each value through its column's result processor."""
        return tuple(
            value if process is None else process(value)
            for value, process in zip(values, self.results, strict=True)
        )


def _bind_processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor for `type_`, except for the two kinds every wallet row
    carries on SQLite, done the same way at a fraction of the cost: a UTC timestamp (SQLAlchemy
    goes through the type decorator and a %-format: a third of the writer's parameter time) and
    a JSON document (orjson instead of the standard library). Anything else, and any value the
    fast path does not expect, gets SQLAlchemy's own processor."""
    from aivax.models.base import UTCDateTime  # the models import this module

    process: Callable[[Any], Any] | None = type_.dialect_impl(dialect).bind_processor(dialect)
    if dialect.name != "sqlite" or process is None:
        return process
    if isinstance(type_, UTCDateTime):
        return partial(_sqlite_utc_timestamp, process)
    if isinstance(type_, JSON):
        return partial(_sqlite_json, process)
    return process


def _sqlite_utc_timestamp(fallback: Callable[[Any], Any], value: Any) -> Any:
    """SQLAlchemy's SQLite format, "YYYY-MM-DD HH:MM:SS.ffffff", of a UTC timestamp, cut from
    orjson's RFC 3339 text (0.8 µs, against 2.7 µs through SQLAlchemy; `isoformat` is no
    faster than SQLAlchemy). orjson leaves out a zero fraction."""
    if type(value) is datetime and value.tzinfo is UTC:
        text = orjson.dumps(value).decode()  # "YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00"
        if len(text) == 34 and text.endswith('+00:00"'):
            return text[1:11] + " " + text[12:27]
        if len(text) == 27 and text.endswith('+00:00"'):
            return text[1:11] + " " + text[12:20] + ".000000"
    return fallback(value)


def _sqlite_json(fallback: Callable[[Any], Any], value: Any) -> Any:
    if type(value) is dict or type(value) is list:
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
            pass
    return fallback(value)


def _pysqlite(conn: Connection) -> sqlite3.Connection | None:
    if conn.dialect.name != "sqlite" or conn.dialect.driver != "pysqlite":
        return None
    raw = conn.connection.driver_connection
    return raw if isinstance(raw, sqlite3.Connection) else None


def _default_of(name: str, column: Any, bind: Any) -> Callable[[Any], Any]:
    """The Python-side default (or on-update value) of a column the caller left out, or the
    value of a literal written into the statement."""
    if column is None and bind.value is not None:
        literal = bind.value
        return lambda _context: literal
    spec = None
    if column is not None:
        spec = column.onupdate if column.onupdate is not None else column.default
    if spec is not None and spec.is_callable:
        function: Callable[[Any], Any] = spec.arg
        return function
    if spec is not None and spec.is_scalar:
        scalar = spec.arg
        return lambda _context: scalar
    raise KeyError(f"missing parameter {name!r}")
