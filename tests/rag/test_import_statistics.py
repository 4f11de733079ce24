"""PostgreSQL: an import job refreshes the planner's statistics of the tables search reads."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import text

from aivax.rag.indexer import ANALYZE_MIN_DOCUMENTS
from aivax.services import AppServices
from tests.fixtures.factories import make_account
from tests.rag.helpers import create_collection, import_documents


async def _analyze_count(services: AppServices) -> int:
    async with services.database.engine.connect() as conn:
        count = await conn.scalar(
            text(
                "SELECT coalesce(analyze_count, 0) + coalesce(autoanalyze_count, 0) "
                "FROM pg_stat_user_tables WHERE relname = 'chunks'"
            )
        )
    return int(count or 0)


async def test_an_import_job_analyzes_the_chunk_table(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    if not services.database.is_postgresql:
        pytest.skip("ANALYZE is PostgreSQL's; SQLite plans without table statistics here")
    owner = await make_account(services, plan="starter", balance_micros=1_000_000)
    collection = await create_collection(client, owner)
    before = await _analyze_count(services)
    documents = [
        {"id": f"n{i}", "text": f"Note {i} about tides and harbours."}
        for i in range(ANALYZE_MIN_DOCUMENTS)
    ]
    await import_documents(client, services, owner, collection, documents)
    for _ in range(50):  # the statistics view is written when the analyzing session reports
        if await _analyze_count(services) > before:
            return
        await asyncio.sleep(0.1)
    pytest.fail("no ANALYZE of chunks after the import")
