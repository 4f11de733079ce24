"""The SQLite single-writer lane for hot-path writes.

Hot-path writes on SQLite go through one synchronous connection, shared (under a lock) by a
dedicated writer thread, which runs each whole transaction in a single hop instead of one thread
hop per statement, and by short transactions run inline on the event loop (`write_now`). One
connection keeps its page cache: two connections writing in turn each find the other's changes
and re-read the pages (measured: a third less CPU per hold taken alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError

from aivax.db.engine import SQLITE_BUSY_TIMEOUT_MS, sqlite_pragmas

T = TypeVar("T")
logger = logging.getLogger("aivax.db")

# How often the writer thread copies the hot-path connection's WAL back into the database.
# A checkpoint with nothing new to copy costs next to nothing; at full load a second of writes
# is a few thousand WAL pages, which SQLite then reuses from the start of the file.
WAL_CHECKPOINT_SECONDS = 1.0


class NotNow(enum.Enum):
    NOT_NOW = "not now"


NOT_NOW = NotNow.NOT_NOW


def _sqlite_pragmas_no_wait(dbapi_connection: Any, record: Any) -> None:
    """The hot-path write connection waits for nothing by default: not for the write lock
    (the writer thread turns the busy wait on for its own transactions), and not for a WAL
    checkpoint, which syncs the disk (the lane runs them on a connection of their own)."""
    sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _is_busy(error: OperationalError | sqlite3.OperationalError) -> bool:
    # Raised by SQLAlchemy (wrapping the driver's error) or by the driver itself (FastStatement).
    driver_error = error.orig if isinstance(error, OperationalError) else error
    code = getattr(driver_error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteWriteLane:
    """One write connection, one writer thread, and the WAL checkpoints, for `database_url`."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url).set(drivername="sqlite")
        self._engine: Engine = create_engine(
            url, pool_size=1, max_overflow=0, connect_args={"check_same_thread": False}
        )
        event.listen(self._engine, "connect", _sqlite_pragmas_no_wait)
        self._connection: Connection | None = None  # opened once, used under the lock
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aivax-writer")
        self._database_path: str | None = None
        if url.database and url.database != ":memory:":
            self._database_path = str(Path(url.database).expanduser())
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointed = time.monotonic()

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` in one committed transaction on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._write_in_thread, work)

    def _write_in_thread(self, work: Callable[[Connection], T]) -> T:
        """The writer thread's transaction: it waits for the write lock like any connection
        (another process, or the app's other connections, may hold it)."""
        with self._lock:
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
        """The write connection, under the lock. It stays checked out for the life of the lane:
        a checkout and a new `Connection` per transaction cost about as much CPU as a lone
        hold's statements (profile of a concurrency-1 run)."""
        if self._connection is None or self._connection.invalidated:
            if self._connection is not None:
                self._connection.close()
            self._connection = self._engine.connect()
        return self._connection

    def write_now(self, work: Callable[[Connection], T]) -> T | NotNow:
        """`work(connection)` on the calling thread if the write lock is free at once (the
        connection has no busy wait, so a locked database answers immediately); `NOT_NOW`
        otherwise."""
        if not self._lock.acquire(blocking=False):
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
            self._lock.release()

    def checkpoint_if_due(self) -> None:
        """At most once a second, outside the write lock: copy the WAL back into the database
        on a connection of its own, so the disk sync never holds up a write (PASSIVE: it waits
        for no reader or writer)."""
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

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._connection is not None:
            with self._lock:
                self._connection.close()
                self._connection = None
        self._engine.dispose()
        if self._checkpointer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._checkpointer.close()
