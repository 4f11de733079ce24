"""Persistence plumbing: engines and session factories (`engine`, `database`), the SQLite
single-writer lane for hot-path writes (`sqlite_writer`), statements that skip SQLAlchemy's
per-execution machinery (`fast_statement`), and the unit of work (`unit_of_work`): the request
(or job, or CLI command) owns the transaction, commits on success, rolls back on error and runs
its after-commit actions; services only flush.

The names below are the package's interface; import them from `aivax.db`.
"""

from aivax.db.database import Database
from aivax.db.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_MMAP_BYTES,
    connection_lost,
    create_engine,
    ensure_sqlite_directory,
    insert_ignoring_conflicts,
)
from aivax.db.fast_statement import FastStatement
from aivax.db.sqlite_writer import NOT_NOW, NotNow
from aivax.db.unit_of_work import SessionDep, on_commit

__all__ = [
    "NOT_NOW",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_MMAP_BYTES",
    "Database",
    "FastStatement",
    "NotNow",
    "SessionDep",
    "connection_lost",
    "create_engine",
    "ensure_sqlite_directory",
    "insert_ignoring_conflicts",
    "on_commit",
]
