"""Bad input is a 4xx in the OpenAI envelope naming what is wrong, never a 500, on SQLite and
PostgreSQL alike."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
async def starter(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _chat(client: httpx.AsyncClient, account: AccountWithKeys, **body: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": "test/fake-ok", "messages": HELLO, **body},
    )


async def test_usage_by_day_counts_the_calls_made(
    client: httpx.AsyncClient, services: AppServices, starter: AccountWithKeys
) -> None:
    for _ in range(2):
        assert (await _chat(client, starter)).status_code == 200
    await services.settler.drain()
    logged = (await client.get("/v1/requests", headers=starter.headers)).json()["data"]
    day = logged[0]["created_at"][:10]
    for params in ({}, {"group_by": "day"}, {"since": "2020-01-01T00:00:00Z"}, {"since": day}):
        response = await client.get("/v1/usage", headers=starter.headers, params=params)
        assert response.status_code == 200, (params, response.text)
        assert response.json()["data"] == [
            {
                "day": day,
                "requests": 2,
                "input_tokens": 22,
                "output_tokens": 6,
                "cost_micros": 34,
            }
        ]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
        ({"until": "9999-12-31T23:59:59-05:00"}, "until"),
        ({"since": "2020-01-02T00:00:00Z", "until": "2020-01-01T00:00:00Z"}, "since"),
    ],
)
async def test_usage_refuses_times_out_of_range_by_name(
    client: httpx.AsyncClient,
    services: AppServices,
    starter: AccountWithKeys,
    params: dict[str, str],
    param: str,
) -> None:
    assert (await _chat(client, starter)).status_code == 200
    await services.settler.drain()
    response = await client.get("/v1/usage", headers=starter.headers, params=params)
    assert assert_error(response, 400)["param"] == param


async def test_usage_until_near_the_first_year_is_an_empty_report(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.get(
        "/v1/usage", headers=account.headers, params={"until": "0001-01-05T00:00:00Z"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []


@pytest.mark.parametrize(
    "path", ["/v1/requests", "/v1/wallet/ledger", "/admin/accounts/{account}/ledger"]
)
@pytest.mark.parametrize(
    "after", ["9223372036854775808", "-9223372036854775809", "1" * 25, "-1", "-" + "9" * 30]
)
async def test_id_cursors_out_of_range_are_400_naming_after(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    admin_headers: dict[str, str],
    path: str,
    after: str,
) -> None:
    admin = path.startswith("/admin")
    response = await client.get(
        path.format(account=account.id),
        headers=admin_headers if admin else account.headers,
        params={"after": after},
    )
    error = assert_error(response, 400, "invalid_value")
    assert error["param"] == "after"


@pytest.mark.parametrize("after", ["0", "9223372036854775807"])
async def test_id_cursors_at_the_bounds_are_accepted(
    client: httpx.AsyncClient, account: AccountWithKeys, after: str
) -> None:
    for path in ("/v1/requests", "/v1/wallet/ledger"):
        response = await client.get(path, headers=account.headers, params={"after": after})
        assert response.status_code == 200, response.text
