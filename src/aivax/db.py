"""Engine and session factories. The request (or job, or CLI command) owns the transaction:
`get_session` commits on success and rolls back on error; services only flush.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aivax.config import Settings

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_pragmas_no_wait(dbapi_connection: Any, record: Any) -> None:
    """The inline connection never waits: not for the write lock, and not for a WAL checkpoint
    (which syncs the disk; the writer thread's connections run them)."""
    _sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


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


def create_engine(settings: Settings) -> AsyncEngine:
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
        pool_pre_ping=True,
    )


class Database:
    """The engine plus its session factory; built in the app lifespan or a CLI command."""

    def __init__(self, settings: Settings) -> None:
        self.engine = create_engine(settings)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # Hot-path writes on SQLite: one dedicated thread with a synchronous engine runs each
        # whole transaction in a single hop (instead of one thread hop per statement), and
        # serialises this process's writers without the busy handler's sleeps; short ones may
        # run inline instead (`write_now`).
        self._sync_engine: Engine | None = None
        self._inline_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        if settings.is_sqlite:
            url = make_url(settings.database_url).set(drivername="sqlite")
            self._sync_engine = sa_create_engine(
                url, pool_size=1, max_overflow=0, connect_args={"check_same_thread": False}
            )
            event.listen(self._sync_engine, "connect", _sqlite_pragmas)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivax-writer")
            # A second connection for `write_now`: it never waits for the write lock.
            self._inline_engine = sa_create_engine(
                url, pool_size=1, max_overflow=0, connect_args={"check_same_thread": False}
            )
            event.listen(self._inline_engine, "connect", _sqlite_pragmas_no_wait)

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Run `work(connection)` in one committed transaction (rolled back if it raises)."""
        if self._sync_engine is not None and self._writer is not None:
            engine = self._sync_engine

            def transaction() -> T:
                with engine.begin() as connection:
                    return work(connection)

            return await asyncio.get_running_loop().run_in_executor(self._writer, transaction)
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    def write_now(self, work: Callable[[Connection], T]) -> T | NotNow:
        """Run a short `work(connection)` transaction right here, on the calling thread, if
        that costs no waiting: on SQLite, when the write lock is free at once (the connection
        has no busy wait, so a locked database answers immediately). `NOT_NOW` otherwise —
        always on PostgreSQL — and the caller goes through `run_write`. For a short transaction
        the hop to the writer thread and back (and the writer's waits for the GIL while the
        event loop is busy) cost more than the transaction itself."""
        if self._inline_engine is None:
            return NOT_NOW
        try:
            with self._inline_engine.begin() as connection:
                return work(connection)
        except (OperationalError, sqlite3.OperationalError) as exc:
            if _is_busy(exc):
                return NOT_NOW
            raise

    async def write(self, work: Callable[[Connection], T]) -> T:
        """`write_now` when that costs no waiting, else `run_write`."""
        done = self.write_now(work)
        return await self.run_write(work) if done is NOT_NOW else done

    async def dispose(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        if self._inline_engine is not None:
            self._inline_engine.dispose()
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
    """

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self._sqlite: dict[frozenset[str], _Compiled] = {}

    def one(self, conn: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Execute once; the first RETURNING row, if any."""
        raw = _pysqlite(conn)
        if raw is None:
            row = conn.execute(self.statement, params).first()
            return tuple(row) if row is not None else None
        sql, arguments, results = self._compiled(conn, params)
        rows = raw.execute(sql, [argument(params) for argument in arguments]).fetchall()
        if not rows:
            return None
        return tuple(
            value if process is None else process(value)
            for value, process in zip(rows[0], results, strict=True)
        )

    def many(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Execute once per row of parameters (no RETURNING); every row has the same keys."""
        raw = _pysqlite(conn)
        if raw is None:
            conn.execute(self.statement, rows)
            return
        sql, arguments, _ = self._compiled(conn, rows[0])
        raw.executemany(sql, [[argument(row) for argument in arguments] for row in rows])

    def _compiled(self, conn: Connection, params: dict[str, Any]) -> _Compiled:
        names = frozenset(params)
        compiled_for = self._sqlite.get(names)
        if compiled_for is None:
            dialect = conn.dialect
            compiled = self.statement.compile(dialect=dialect, column_keys=list(params))
            defaults = {
                column.key: column
                for column in [*compiled.insert_prefetch, *compiled.update_prefetch]
            }
            arguments = [
                _argument(name, compiled.binds[name].type, defaults.get(name), dialect)
                for name in compiled.positiontup or []
            ]
            results = [
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in compiled.returning or []
            ]
            compiled_for = self._sqlite[names] = (str(compiled), arguments, results)
        return compiled_for


_Compiled = tuple[str, list[Callable[[dict[str, Any]], Any]], list[Any]]


def _pysqlite(conn: Connection) -> sqlite3.Connection | None:
    if conn.dialect.name != "sqlite" or conn.dialect.driver != "pysqlite":
        return None
    raw = conn.connection.driver_connection
    return raw if isinstance(raw, sqlite3.Connection) else None


def _argument(
    name: str, type_: Any, default_for: Any, dialect: Any
) -> Callable[[dict[str, Any]], Any]:
    """How to get one positional parameter from a parameter dict: the value (or the column's
    Python-side default when absent), through the type's bind processor."""
    process = type_.dialect_impl(dialect).bind_processor(dialect)
    default = None
    if default_for is not None:
        spec = default_for.onupdate if default_for.onupdate is not None else default_for.default
        if spec is not None and spec.is_callable:
            default = spec.arg
        elif spec is not None and spec.is_scalar:
            scalar = spec.arg
            default = lambda _context: scalar  # noqa: E731

    def argument(params: dict[str, Any]) -> Any:
        if name in params:
            value = params[name]
        elif default is not None:
            value = default(None)
        else:
            raise KeyError(f"missing parameter {name!r}")
        return process(value) if process is not None else value

    return argument
