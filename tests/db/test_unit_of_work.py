"""The unit of work: the request owns the transaction, services only write into it, and what
must follow a commit (clearing the hot-path caches, waking the job runner) runs only after a
commit that happened, before the response is sent."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlalchemy import func, select

from aivax.db import SessionDep, on_commit
from aivax.gateways import service as gateway_service
from aivax.gateways.schemas import GatewayCreate
from aivax.keys import service as key_service
from aivax.models import Document, Gateway
from aivax.rag import importer
from aivax.rag import service as rag_service
from aivax.services import AppServices
from tests.fixtures.factories import AccountWithKeys, make_account

SENTINEL = (uuid.UUID(int=0), "cached-before-the-change")


class AfterTheWrite(RuntimeError):
    """Raised by a test endpoint once its service has written."""


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


@pytest.fixture
def cached(services: AppServices) -> Iterator[None]:
    """A gateway lookup in the hot-path cache, as a call made before the change leaves it."""
    services.caches.gateways[SENTINEL] = cast(Any, "old target")
    yield
    services.caches.gateways.pop(SENTINEL, None)


def _failing_app(services: AppServices, token: str) -> FastAPI:
    """Endpoints written like the real ones (`SessionDep`, a service call, the caches cleared
    after commit) that fail after their service has written."""
    app = FastAPI()
    app.state.services = services

    async def principal(session: Any) -> key_service.Principal:
        return await key_service.authenticate(
            session, token, secret=services.secret, touch_interval=timedelta(hours=1)
        )

    @app.post("/gateways")
    async def create_gateway_then_fail(session: SessionDep) -> None:
        caller = await principal(session)
        data = GatewayCreate.model_validate(
            {"slug": "doomed", "name": "doomed", "config": {"model": "test/fake-ok"}}
        )
        await gateway_service.create(session, caller.account_id, data, services.secret_box)
        services.caches.clear_after_commit(session)
        raise AfterTheWrite

    @app.post("/collections/{collection_id}/import")
    async def import_then_fail(collection_id: str, request: Request, session: SessionDep) -> None:
        caller = await principal(session)
        collection = await rag_service.get_collection(session, caller.account_id, collection_id)
        await importer.import_jsonl(services, session, caller, collection, request)
        raise AfterTheWrite

    return app


async def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://aivax.test")


async def test_an_action_runs_after_the_commit_and_never_after_a_rollback(
    services: AppServices,
) -> None:
    ran: list[str] = []
    async with services.database.sessions() as session:
        await session.execute(select(1))
        on_commit(session, lambda: ran.append("rolled back"))
        await session.rollback()
        await session.execute(select(1))
        on_commit(session, lambda: ran.append("committed"))
        assert ran == []
        await session.commit()
        await session.commit()  # a later transaction runs nothing again
    assert ran == ["committed"]


async def test_a_session_closed_without_a_commit_drops_its_actions(
    services: AppServices,
) -> None:
    ran: list[str] = []
    async with services.database.sessions() as session:
        await session.execute(select(1))
        on_commit(session, lambda: ran.append("never committed"))
    await session.execute(select(1))  # a closed session can begin again
    await session.commit()
    await session.close()
    assert ran == []


async def test_a_savepoint_runs_nothing_until_the_outer_transaction_commits(
    services: AppServices,
) -> None:
    ran: list[str] = []
    async with services.database.sessions() as session:
        await session.execute(select(1))
        on_commit(session, lambda: ran.append("outer"))
        async with session.begin_nested():
            on_commit(session, lambda: ran.append("savepoint"))
        with pytest.raises(AfterTheWrite):
            async with session.begin_nested():
                raise AfterTheWrite
        assert ran == []  # neither the release nor the rollback of a savepoint counts
        await session.commit()
    assert ran == ["outer", "savepoint"]


async def test_an_action_registered_twice_runs_once_and_a_failing_one_stops_no_other(
    services: AppServices, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("broken action")

    def record() -> None:
        ran.append("recorded")

    async with services.database.sessions() as session:
        await session.execute(select(1))
        for action in (record, broken, record):
            on_commit(session, action)
        with caplog.at_level(logging.ERROR, logger="aivax.db"):
            await session.commit()  # the commit stands: the failure is logged, not raised
    assert ran == ["recorded"]
    assert "after-commit action failed" in caplog.text


async def test_a_request_that_fails_after_its_change_keeps_nothing_and_clears_no_cache(
    services: AppServices, owner: AccountWithKeys, cached: None
) -> None:
    async with await _client(_failing_app(services, owner.private_key)) as client:
        with pytest.raises(AfterTheWrite):
            await client.post("/gateways")
    assert SENTINEL in services.caches.gateways
    async with services.database.sessions() as session:
        found = await session.scalar(
            select(func.count()).where(Gateway.account_id == owner.id, Gateway.slug == "doomed")
        )
    assert found == 0


async def test_a_committed_change_clears_the_caches_before_the_response_starts(
    app: FastAPI, services: AppServices, owner: AccountWithKeys, cached: None
) -> None:
    at_response_start: list[bool] = []

    async def watching(scope: Any, receive: Any, send: Any) -> None:
        async def watched_send(message: Any) -> None:
            if message["type"] == "http.response.start" and scope["method"] == "PATCH":
                at_response_start.append(SENTINEL in services.caches.gateways)
            await send(message)

        await app(scope, receive, watched_send)

    async with await _client(watching) as client:
        created = await client.post(
            "/v1/gateways",
            headers=owner.headers,
            json={"slug": "live", "name": "live", "config": {"model": "test/fake-ok"}},
        )
        assert created.status_code == 201, created.text
        services.caches.gateways[SENTINEL] = cast(Any, "old target")
        changed = await client.patch(
            f"/v1/gateways/{created.json()['id']}",
            headers=owner.headers,
            json={"config": {"system_instruction": "Be terse."}},
        )
    assert changed.status_code == 200, changed.text
    assert at_response_start == [False]


async def test_an_import_that_fails_after_writing_keeps_no_document(
    client: httpx.AsyncClient, services: AppServices, owner: AccountWithKeys
) -> None:
    response = await client.post("/v1/collections", headers=owner.headers, json={"name": "kb"})
    assert response.status_code == 201, response.text
    collection = response.json()["id"]
    lines = "".join(json.dumps({"id": f"d{n}", "text": f"text {n}"}) + "\n" for n in range(3))
    async with await _client(_failing_app(services, owner.private_key)) as failing:
        with pytest.raises(AfterTheWrite):
            await failing.post(f"/collections/{collection}/import", content=lines.encode())
    async with services.database.sessions() as session:
        kept = await session.scalar(
            select(func.count()).where(Document.collection_id == uuid.UUID(collection))
        )
    assert kept == 0
