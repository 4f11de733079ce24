"""The wallet meter (`wallet.meter`): every priced call reserves and settles through it — chat,
embeddings, each re-ask — and the request log links the model requests of one API request by
its id and a step number."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from aivax.models import WalletHold
from aivax.services import AppServices
from aivax.wallet import service as wallet
from aivax.wallet.meter import Meter
from tests.fixtures.factories import AccountWithKeys, make_account

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _requests(
    services: AppServices, client: httpx.AsyncClient, account: AccountWithKeys
) -> list[dict[str, Any]]:
    await services.meter.drain()
    response = await client.get("/v1/requests", headers=account.headers)
    return list(reversed(response.json()["data"]))


async def _holds(services: AppServices, account: AccountWithKeys) -> list[WalletHold]:
    async with services.database.sessions() as session:
        rows = await session.scalars(select(WalletHold).where(WalletHold.account_id == account.id))
        return list(rows)


async def test_reasks_are_steps_of_one_request(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={
            "model": "test/fake-json-never",
            "messages": [{"role": "user", "content": "A city, as JSON."}],
            "response_schema": CITY,
        },
    )
    assert response.status_code == 422, response.text
    rows = await _requests(services, client, account)
    assert [row["request_id"] for row in rows] == [response.headers["x-request-id"]] * 3
    assert [row["step"] for row in rows] == [1, 2, 3]  # the call and its two re-asks
    assert all(row["cost_micros"] > 0 for row in rows)  # each reserved and settled


async def test_embeddings_reserve_from_the_wallet_lease_like_chat(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    assert services.settings.wallet_lease_calls > 0
    for _ in range(3):
        response = await client.post(
            "/v1/embeddings",
            headers=account.headers,
            json={"model": "test/fake-embed", "input": "alpha beta"},
        )
        assert response.status_code == 200, response.text
    # One lease took all three calls; no call held on its own.
    assert [hold.ref for hold in await _holds(services, account)] == ["lease"]
    rows = await _requests(services, client, account)
    assert [row["step"] for row in rows] == [1, 1, 1]
    await services.meter.flush(account.id)
    read = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert read["held_micros"] == 0
    assert read["balance_micros"] == 1_000_000 - sum(row["cost_micros"] for row in rows)


async def test_a_charge_never_exceeds_the_reservation(
    services: AppServices, account: AccountWithKeys
) -> None:
    meter: Meter = services.meter
    account_id = account.id
    free = await meter.reserve(account_id, 0, ref="free")
    assert meter.settle(free, 500, None) == 0  # nothing reserved, nothing charged
    reserved = await meter.reserve(account_id, 300, ref="capped")
    assert meter.settle(reserved, 1_000, None) == 300
    unused = await meter.reserve(account_id, 200, ref="unused")
    meter.release(unused)
    await meter.flush(account_id)
    async with services.database.sessions() as session:
        summary = await wallet.summary(session, account_id)
    assert (summary.balance_micros, summary.held_micros) == (1_000_000 - 300, 0)


async def test_with_leases_off_a_call_holds_on_its_own(
    settings: Any, account: AccountWithKeys
) -> None:
    built = AppServices.build(settings.model_copy(update={"wallet_lease_calls": 0}))
    try:
        reserved = await built.meter.reserve(account.id, 400, ref="req_own")
        assert built.meter.settle(reserved, 150, None) == 150
        await built.meter.flush()
        holds = await _holds(built, account)
        assert [(h.ref, h.amount_micros, h.status) for h in holds] == [("req_own", 400, "settled")]
    finally:
        await built.close()
