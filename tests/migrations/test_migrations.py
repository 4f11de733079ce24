"""Migration 0005, the open holds' partial index: the queries that look holds up by status use
it, and the migration goes down and up again on either database with the holds in place."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, inspect, select
from sqlalchemy.ext.asyncio import create_async_engine

from aivax.db import Database
from aivax.migrate import alembic_config, upgrade_to_head
from aivax.models import WalletHold
from aivax.services import AppServices
from aivax.wallet import holds, open_holds
from tests.fixtures.databases import create_database, drop_database
from tests.fixtures.factories import make_account

OLD = {"ix_wallet_holds_account_id_status", "ix_wallet_holds_status_created_at"}
NEW = {"ix_wallet_holds_open"}


def _hold_indexes(conn: Connection) -> set[str]:
    return {str(index["name"]) for index in inspect(conn).get_indexes("wallet_holds")}


async def test_open_holds_are_looked_up_through_the_partial_index(services: AppServices) -> None:
    engine = services.database.engine
    async with engine.connect() as conn:
        assert await conn.run_sync(_hold_indexes) == NEW
    if engine.dialect.name != "sqlite":
        return  # PostgreSQL picks plans by table statistics: there the index is what is checked
    queries = [
        open_holds.open_total_query(uuid.uuid4()),
        open_holds.stale_holds_query(created_before=datetime.now(UTC), limit=10),
    ]
    async with engine.connect() as conn:
        for query in queries:
            # Planned as it runs: with its parameters as parameters (their values do not matter
            # to the plan; whether the open-hold condition is one does).
            sql = str(query.compile(dialect=engine.dialect))
            arguments = ("x",) * sql.count("?")
            plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", arguments)).all()
            assert any("ix_wallet_holds_open" in str(row[-1]) for row in plan), plan


@pytest.fixture
async def fresh_database_url(tmp_path: Path) -> AsyncIterator[str]:
    server_url = os.environ.get("AIVAX_TEST_DATABASE_URL")
    if not server_url:
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    name, url = await create_database(server_url, "aivax_migrations")
    try:
        yield url
    finally:
        await drop_database(server_url, name)


async def test_0005_goes_down_and_up_with_holds_in_place(
    fresh_database_url: str, services: AppServices
) -> None:
    config = alembic_config(fresh_database_url)
    await asyncio.to_thread(upgrade_to_head, fresh_database_url)
    database = Database(services.settings.model_copy(update={"database_url": fresh_database_url}))
    try:
        account = await make_account(replace(services, database=database), balance_micros=1_000)
        opened = await database.write(
            lambda conn: holds.hold(conn, account_id=account.id, amount_micros=300, ref="kept")
        )
        assert isinstance(opened, uuid.UUID)
        engine = create_async_engine(fresh_database_url)
        try:
            await asyncio.to_thread(command.downgrade, config, "0004")
            async with engine.connect() as conn:
                assert await conn.run_sync(_hold_indexes) == OLD
            await asyncio.to_thread(command.upgrade, config, "head")
            async with engine.connect() as conn:
                assert await conn.run_sync(_hold_indexes) == NEW
                status = (await conn.execute(select(WalletHold.status))).scalar_one()
                assert status == "open"
                total = await conn.run_sync(lambda c: open_holds.open_hold_total(c, account.id))
                assert total == 300
        finally:
            await engine.dispose()
    finally:
        await database.dispose()
