"""The operator API under /admin."""

from __future__ import annotations

import uuid

import httpx

from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys


async def test_admin_requires_an_admin_token(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    assert_error(await client.get("/admin/plans"), 401, "missing_admin_token")
    assert_error(await client.get("/admin/plans", headers=account.headers), 401)
    forged = {"Authorization": "Bearer aivax_admin_" + "A" * 38}
    assert_error(await client.get("/admin/plans", headers=forged), 401, "invalid_admin_token")


async def test_create_list_show_and_change_plan_of_accounts(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await client.post(
        "/admin/accounts", headers=admin_headers, json={"name": "Acme", "plan": "starter"}
    )
    assert created.status_code == 201
    account_id = created.json()["id"]
    assert created.json()["plan"]["id"] == "starter"
    shown = (await client.get(f"/admin/accounts/{account_id}", headers=admin_headers)).json()
    assert shown["name"] == "Acme"
    moved = await client.patch(
        f"/admin/accounts/{account_id}", headers=admin_headers, json={"plan": "pro"}
    )
    assert moved.json()["plan"]["id"] == "pro"
    assert_error(
        await client.patch(
            f"/admin/accounts/{account_id}", headers=admin_headers, json={"plan": "gold"}
        ),
        404,
        "plan_not_found",
    )
    assert_error(
        await client.post(
            "/admin/accounts", headers=admin_headers, json={"name": "x", "plan": "z"}
        ),
        404,
    )
    assert_error(
        await client.get(f"/admin/accounts/{uuid.uuid4()}", headers=admin_headers),
        404,
        "account_not_found",
    )


async def test_account_list_paginates_without_gaps(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for i in range(5):
        await client.post("/admin/accounts", headers=admin_headers, json={"name": f"page {i}"})
    seen: list[str] = []
    after: str | None = None
    for _ in range(100):
        params = {"limit": 3, **({"after": after} if after else {})}
        page = (await client.get("/admin/accounts", headers=admin_headers, params=params)).json()
        seen += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == len(set(seen))
    assert len(seen) >= 5


async def test_top_up_is_idempotent_by_header_or_body(
    client: httpx.AsyncClient, admin_headers: dict[str, str], account: AccountWithKeys
) -> None:
    url = f"/admin/accounts/{account.id}/topups"
    headers = {**admin_headers, "Idempotency-Key": "pay-001"}
    first = await client.post(url, headers=headers, json={"amount_usd": "2.50"})
    assert first.status_code == 201
    assert first.json()["replayed"] is False
    assert first.json()["entry"]["amount_micros"] == 2_500_000
    replay = await client.post(url, headers=headers, json={"amount_usd": "2.50"})
    assert replay.status_code == 200
    assert replay.json()["replayed"] is True
    assert replay.json()["entry"]["id"] == first.json()["entry"]["id"]
    body_key = await client.post(
        url, headers=admin_headers, json={"amount_micros": 1, "idempotency_key": "pay-001"}
    )
    assert_error(body_key, 409, "idempotency_key_reused")
    wallet = (
        await client.get(f"/admin/accounts/{account.id}/wallet", headers=admin_headers)
    ).json()
    assert wallet["balance_micros"] == 3_500_000


async def test_top_up_validation(
    client: httpx.AsyncClient, admin_headers: dict[str, str], account: AccountWithKeys
) -> None:
    url = f"/admin/accounts/{account.id}/topups"
    assert_error(
        await client.post(url, headers=admin_headers, json={"amount_micros": -5}),
        400,
        "invalid_amount",
    )
    assert_error(
        await client.post(url, headers=admin_headers, json={"amount_usd": "0.0000001"}), 400
    )
    assert_error(await client.post(url, headers=admin_headers, json={"amount_usd": "ten"}), 400)
    assert_error(await client.post(url, headers=admin_headers, json={}), 400)
    assert_error(
        await client.post(url, headers=admin_headers, json={"amount_micros": 1, "amount_usd": "1"}),
        400,
    )
    assert_error(
        await client.post(
            f"/admin/accounts/{uuid.uuid4()}/topups",
            headers=admin_headers,
            json={"amount_micros": 1},
        ),
        404,
    )


async def test_negative_adjustment_and_ledger_view(
    client: httpx.AsyncClient, admin_headers: dict[str, str], account: AccountWithKeys
) -> None:
    url = f"/admin/accounts/{account.id}/adjustments"
    response = await client.post(
        url, headers=admin_headers, json={"amount_micros": -400_000, "description": "correction"}
    )
    assert response.status_code == 201
    too_much = await client.post(url, headers=admin_headers, json={"amount_micros": -700_000})
    error = assert_error(too_much, 402, "insufficient_balance")
    assert too_much.headers["x-should-retry"] == "false"
    assert "0.600000 USD available" in str(error["message"])
    ledger = (
        await client.get(f"/admin/accounts/{account.id}/ledger", headers=admin_headers)
    ).json()
    assert ledger["data"][0]["kind"] == "adjustment"
    assert ledger["data"][0]["description"] == "correction"


async def test_plans_are_data_the_operator_edits(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    plans = (await client.get("/admin/plans", headers=admin_headers)).json()["data"]
    assert {plan["id"] for plan in plans} >= {"free", "starter", "pro", "enterprise"}
    created = await client.post(
        "/admin/plans",
        headers=admin_headers,
        json={"id": f"team-{uuid.uuid4().hex[:6]}", "name": "Team", "limits": {"byok_rpm": 7}},
    )
    assert created.status_code == 201
    plan_id = created.json()["id"]
    edited = await client.patch(
        f"/admin/plans/{plan_id}",
        headers=admin_headers,
        json={"limits": {"integrated_rpm": 99, "models_allowed": ["aivax/*", "openai/*"]}},
    )
    assert edited.status_code == 200
    limits = edited.json()["limits"]
    assert limits["integrated_rpm"] == 99
    assert limits["byok_rpm"] == 7  # untouched limits keep their values
    unknown = await client.patch(
        f"/admin/plans/{plan_id}", headers=admin_headers, json={"limits": {"rpm": 1}}
    )
    assert assert_error(unknown, 400, "invalid_plan_limits")["param"] == "limits.rpm"
    negative = await client.patch(
        f"/admin/plans/{plan_id}", headers=admin_headers, json={"limits": {"byok_rpm": -1}}
    )
    assert_error(negative, 400, "invalid_plan_limits")
    duplicate = await client.post(
        "/admin/plans", headers=admin_headers, json={"id": plan_id, "name": "Again"}
    )
    assert_error(duplicate, 409, "plan_exists")


async def test_operator_manages_keys_of_any_account(
    client: httpx.AsyncClient, admin_headers: dict[str, str], account: AccountWithKeys
) -> None:
    base = f"/admin/accounts/{account.id}/keys"
    created = await client.post(base, headers=admin_headers, json={"name": "ops"})
    assert created.status_code == 201
    token = created.json()["key"]
    assert (await client.get("/v1/account", headers={"Authorization": f"Bearer {token}"})).json()[
        "id"
    ] == str(account.id)
    listed = (await client.get(base, headers=admin_headers)).json()["data"]
    assert created.json()["id"] in {key["id"] for key in listed}
    revoked = await client.delete(f"{base}/{account.private_key_id}", headers=admin_headers)
    assert revoked.status_code == 200
    assert_error(await client.get("/v1/account", headers=account.headers), 401, "api_key_revoked")
    other_account_path = f"/admin/accounts/{uuid.uuid4()}/keys/{created.json()['id']}"
    assert_error(await client.delete(other_account_path, headers=admin_headers), 404)
