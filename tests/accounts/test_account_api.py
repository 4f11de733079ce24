"""The account API with a private key: account, keys, wallet; another account's objects are 404."""

from __future__ import annotations

import uuid

import httpx

from aivax.services import AppServices
from aivax.wallet import service as wallet
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account


async def test_get_account_shows_plan_limits_and_balance(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    body = (await client.get("/v1/account", headers=account.headers)).json()
    assert body["object"] == "account"
    assert body["id"] == str(account.id)
    assert body["plan"]["id"] == "free"
    assert body["plan"]["limits"]["integrated_rpm"] == 20
    assert body["balance_micros"] == 1_000_000
    assert body["status"] == "active"
    assert "hook_key" not in body
    assert "hook_key_encrypted" not in body


async def test_patch_account_settings_and_unknown_setting(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.patch(
        "/v1/account",
        headers=account.headers,
        json={"name": "Renamed", "settings": {"json_healing_for_response_format": True}},
    )
    assert response.status_code == 200
    assert response.json()["name"] == "Renamed"
    assert response.json()["settings"]["json_healing_for_response_format"] is True
    bad = await client.patch(
        "/v1/account", headers=account.headers, json={"settings": {"no_such_setting": 1}}
    )
    error = assert_error(bad, 400)
    assert error["param"] == "settings.no_such_setting"


async def test_hook_key_is_readable_by_owner_and_rotates(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    first = (await client.get("/v1/account/hook-key", headers=account.headers)).json()["hook_key"]
    assert len(first) >= 40
    rotated = (await client.post("/v1/account/hook-key/rotate", headers=account.headers)).json()[
        "hook_key"
    ]
    assert rotated != first
    again = (await client.get("/v1/account/hook-key", headers=account.headers)).json()["hook_key"]
    assert again == rotated


async def test_key_lifecycle_shows_secret_only_on_create(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services)
    created = await client.post(
        "/v1/keys",
        headers=owner.headers,
        json={"name": "web", "kind": "public", "allowed_origins": ["https://App.example.com/"]},
    )
    assert created.status_code == 201
    body = created.json()
    assert body["key"].startswith("aivax_pk_")
    assert body["allowed_origins"] == ["https://app.example.com"]
    assert body["display_prefix"] == body["key"][:13]
    listed = (await client.get("/v1/keys", headers=owner.headers)).json()
    assert listed["object"] == "list"
    assert {k["id"] for k in listed["data"]} >= {body["id"], str(owner.private_key_id)}
    assert all("key" not in k for k in listed["data"])
    assert owner.private_key not in str(listed)
    fetched = (await client.get(f"/v1/keys/{body['id']}", headers=owner.headers)).json()
    assert "key" not in fetched
    assert fetched["name"] == "web"


async def test_key_validation_errors(client: httpx.AsyncClient, account: AccountWithKeys) -> None:
    private_with_origins = await client.post(
        "/v1/keys", headers=account.headers, json={"allowed_origins": ["https://a.example"]}
    )
    assert_error(private_with_origins, 400)
    bad_origin = await client.post(
        "/v1/keys",
        headers=account.headers,
        json={"kind": "public", "allowed_origins": ["https://a.example/path"]},
    )
    error = assert_error(bad_origin, 400)
    assert error["param"] == "allowed_origins"
    bad_kind = await client.post("/v1/keys", headers=account.headers, json={"kind": "admin"})
    assert_error(bad_kind, 400)


async def test_last_private_key_cannot_be_revoked_by_its_account(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services)
    response = await client.delete(f"/v1/keys/{owner.private_key_id}", headers=owner.headers)
    assert_error(response, 409, "last_private_key")
    public = await client.delete(f"/v1/keys/{owner.public_key_id}", headers=owner.headers)
    assert public.status_code == 200


async def test_key_count_limit(client: httpx.AsyncClient, services: AppServices) -> None:
    owner = await make_account(services)
    limit = services.settings.max_keys_per_account
    for _ in range(limit - 2):
        assert (await client.post("/v1/keys", headers=owner.headers, json={})).status_code == 201
    assert_error(
        await client.post("/v1/keys", headers=owner.headers, json={}), 409, "too_many_api_keys"
    )


async def test_another_accounts_key_is_404_everywhere(
    client: httpx.AsyncClient, account: AccountWithKeys, other_account: AccountWithKeys
) -> None:
    foreign = other_account.private_key_id
    assert_error(await client.get(f"/v1/keys/{foreign}", headers=account.headers), 404)
    assert_error(await client.delete(f"/v1/keys/{foreign}", headers=account.headers), 404)
    missing = uuid.uuid4()
    assert_error(await client.get(f"/v1/keys/{missing}", headers=account.headers), 404)
    # The foreign key still works: nothing was revoked.
    assert (await client.get("/v1/account", headers=other_account.headers)).status_code == 200


async def test_wallet_and_ledger_show_only_own_entries(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    other_account: AccountWithKeys,
) -> None:
    async with services.database.sessions() as session:
        held = await wallet.hold(session, account_id=account.id, amount_micros=250_000, ref="r")
        await session.commit()
    summary = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert summary == {
        "object": "wallet",
        "account_id": str(account.id),
        "currency": "usd",
        "balance_micros": 750_000,
        "held_micros": 250_000,
        "balance_usd": "0.750000",
        "held_usd": "0.250000",
    }
    ledger = (await client.get("/v1/wallet/ledger", headers=account.headers)).json()
    assert [entry["kind"] for entry in ledger["data"]] == ["hold", "topup"]
    assert ledger["data"][0]["hold_id"] == str(held.id)
    assert all(entry["account_id"] == str(account.id) for entry in ledger["data"])
    other = (await client.get("/v1/wallet/ledger", headers=other_account.headers)).json()
    assert str(held.id) not in str(other)


async def test_ledger_pagination_and_kind_filter(
    client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, balance_micros=100)
    async with services.database.sessions() as session:
        for _ in range(4):
            held = await wallet.hold(session, account_id=owner.id, amount_micros=10, ref="p")
            await wallet.settle(session, held.id, 5)
        await session.commit()
    seen: list[int] = []
    after: str | None = None
    while True:
        params = {"limit": 5, **({"after": after} if after else {})}
        page = (await client.get("/v1/wallet/ledger", headers=owner.headers, params=params)).json()
        seen += [entry["id"] for entry in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == 13  # topup + 4 * (hold, release, usage)
    assert seen == sorted(seen, reverse=True)
    usage = (
        await client.get("/v1/wallet/ledger", headers=owner.headers, params={"kind": "usage"})
    ).json()
    assert [entry["amount_micros"] for entry in usage["data"]] == [-5, -5, -5, -5]
    assert_error(
        await client.get("/v1/wallet/ledger", headers=owner.headers, params={"limit": 101}), 400
    )
