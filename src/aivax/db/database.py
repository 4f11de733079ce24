"""`Database`: the engine, its session factory and, on SQLite, the single-writer lane."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_sessionmaker

from aivax.config import Settings
from aivax.db.engine import create_engine
from aivax.db.sqlite_writer import NOT_NOW, NotNow, SqliteWriteLane

T = TypeVar("T")


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
        self._lane = SqliteWriteLane(settings.database_url) if settings.is_sqlite else None

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Run `work(connection)` in one committed transaction (rolled back if it raises)."""
        if self._lane is not None:
            return await self._lane.run(work)
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    def write_now(self, work: Callable[[Connection], T]) -> T | NotNow:
        """Run a short `work(connection)` transaction right here, on the calling thread, if
        that costs no waiting: on SQLite, when the write lock is free at once. `NOT_NOW`
        otherwise — always on PostgreSQL — and the caller goes through `run_write`. For a short
        transaction the hop to the writer thread and back (and the writer's waits for the GIL
        while the event loop is busy) cost more than the transaction itself."""
        return NOT_NOW if self._lane is None else self._lane.write_now(work)

    async def write(self, work: Callable[[Connection], T]) -> T:
        """`write_now` when that costs no waiting, else `run_write`."""
        done = self.write_now(work)
        return await self.run_write(work) if done is NOT_NOW else done

    def checkpoint_if_due(self) -> None:
        """SQLite: copy the WAL back into the database, at most once a second (see
        `SqliteWriteLane.checkpoint_if_due`). Called by the writer thread after each
        transaction, and by the wallet-writer process after each message (never on the
        server's event loop). A no-op on PostgreSQL."""
        if self._lane is not None:
            self._lane.checkpoint_if_due()

    async def dispose(self) -> None:
        if self._lane is not None:
            self._lane.close()
        await self.engine.dispose()
