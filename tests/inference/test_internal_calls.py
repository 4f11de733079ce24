"""RAG's own model requests go through the kernel as `internal` calls and are steps of the
request they serve: a search's query embedding and its reranking judge share the search's
request id, numbered by step, and a gateway's rewrite call is a step of the chat call."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from aivax.models import RequestLog
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.rag.test_rag_gateways import _kb


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=5_000_000)


async def _rows(services: AppServices, owner: AccountWithKeys) -> list[RequestLog]:
    await services.meter.drain()
    async with services.database.sessions() as session:
        rows = await session.scalars(
            select(RequestLog)
            .where(RequestLog.account_id == owner.id)
            .order_by(RequestLog.created_at, RequestLog.step)
        )
        return list(rows)


async def test_a_search_logs_its_query_embedding_and_judge_as_its_own_steps(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    collection = await _kb(client, owner, "test/fake-embed")
    before = {row.id for row in await _rows(services, owner)}
    judged = await client.post(
        f"/v1/collections/{collection}/search",
        headers=owner.headers,
        json={
            "query": "sourdough bread",
            "top_k": 2,
            "mode": "vector",
            "rerank": {"type": "model", "model": "test/fake-judge", "candidates": 2},
        },
    )
    assert judged.status_code == 200, judged.text
    rows = [row for row in await _rows(services, owner) if row.id not in before]
    request_id = judged.headers["x-request-id"]
    assert [(row.request_id, row.step, row.model) for row in rows] == [
        (request_id, 1, "test/fake-embed"),
        (request_id, 2, "test/fake-judge"),
    ]
    assert all(row.cost_micros for row in rows)
