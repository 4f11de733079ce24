"""Engines: the async engine every session comes from, the SQLite connection settings, and
dialect helpers shared by the repositories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aivax.config import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Pages are read through a memory map instead of a read() call each: after the other process
# (the wallet writer) commits, the next transaction here re-reads the pages it changed, which
# on the chat path was about five read calls per call. Writes still go through the WAL.
# Address space only, not memory.
SQLITE_MMAP_BYTES = 256 * 1024 * 1024


def sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
    cursor.close()


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
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
        # asyncpg sends these with each new connection.
        connect_args={"server_settings": {"synchronous_commit": "off"}} if async_commit else {},
    )


def insert_ignoring_conflicts(dialect: str, table: Any, *, conflict_on: list[str]) -> Any:
    """`INSERT … ON CONFLICT (cols) DO NOTHING` for `dialect` ("sqlite" or "postgresql")."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=conflict_on)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=conflict_on)
