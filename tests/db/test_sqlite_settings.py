"""Every SQLite connection the server opens — the pool's and the hot-path write connection —
has the settings the wallet depends on: WAL, foreign keys, and reads through a memory map."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection

from aivax.db import NOT_NOW, SQLITE_MMAP_BYTES
from aivax.services import AppServices


def _settings(conn: Connection) -> tuple[object, ...]:
    return tuple(
        conn.exec_driver_sql(f"PRAGMA {name}").scalar()
        for name in ("journal_mode", "foreign_keys", "mmap_size")
    )


async def test_pool_and_write_connections_share_the_settings(services: AppServices) -> None:
    if services.database.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    expected = ("wal", 1, SQLITE_MMAP_BYTES)
    async with services.database.engine.connect() as conn:
        assert await conn.run_sync(_settings) == expected
    written = services.database.write_now(_settings)
    assert written is not NOT_NOW
    assert written == expected
