"""Account-key middleware and the dependencies built on it."""

from __future__ import annotations

import asyncio
import hmac
import math
import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, select

from aivax.app import create_app
from aivax.auth.dependencies import AnyKey
from aivax.config import Settings
from aivax.keys.schemas import KEY_PREFIXES, KeyKind
from aivax.keys.service import kind_of_token
from aivax.kit.crypto import BASE62, derive_key, generate_token, token_hash
from aivax.models import ApiKey
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account


@pytest.fixture
def statements(services: AppServices) -> Iterator[list[str]]:
    """Every SQL statement the engine runs while the test is active."""
    seen: list[str] = []

    def record(_c: object, _cur: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    event.listen(services.database.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(services.database.engine.sync_engine, "before_cursor_execute", record)


def test_generated_keys_have_prefix_entropy_and_valid_checksum() -> None:
    for kind, prefix in KEY_PREFIXES.items():
        token = generate_token(prefix)
        assert token.startswith(prefix)
        assert len(token) == len(prefix) + 38
        assert kind_of_token(token) is kind
        body = token[len(prefix) : -6]
        assert len(body) * math.log2(len(set(BASE62))) >= 160
    assert len({generate_token("aivax_sk_") for _ in range(1000)}) == 1000


def test_every_single_character_typo_fails_the_checksum() -> None:
    token = generate_token(KEY_PREFIXES[KeyKind.PRIVATE])
    prefix_length = len(KEY_PREFIXES[KeyKind.PRIVATE])
    for position in range(prefix_length, len(token)):
        original = token[position]
        typo = BASE62[(BASE62.index(original) + 1) % 62]
        mistyped = token[:position] + typo + token[position + 1 :]
        assert kind_of_token(mistyped) is None, f"typo at {position} not caught"


def test_a_key_hash_is_the_hmac_sha256_of_the_key_under_each_servers_own_sub_key() -> None:
    """The keyed HMAC is reused across calls: the hash must stay exactly the HMAC of the key,
    and each server secret must keep its own."""
    token = generate_token("sk-aivax-")
    hashes = set()
    for secret in (b"a" * 32, b"b" * 32):
        expected = hmac.digest(derive_key(secret, "api-key-hmac"), token.encode(), "sha256").hex()
        assert token_hash(secret, token) == token_hash(secret, token) == expected
        hashes.add(expected)
    assert len(hashes) == 2


async def test_mistyped_key_is_rejected_without_a_database_lookup(
    client: httpx.AsyncClient, account: AccountWithKeys, statements: list[str]
) -> None:
    mistyped = account.private_key[:-1] + ("A" if account.private_key[-1] != "A" else "B")
    response = await client.get("/v1/account", headers={"Authorization": f"Bearer {mistyped}"})
    assert_error(response, 401, "invalid_api_key")
    assert statements == []


async def test_keys_are_stored_only_as_hmac(
    services: AppServices, account: AccountWithKeys
) -> None:
    async with services.database.sessions() as session:
        key = await session.get(ApiKey, account.private_key_id)
    assert key is not None
    assert key.key_hash == token_hash(services.secret, account.private_key)
    assert account.private_key not in repr(key.__dict__)
    assert key.display_prefix == account.private_key[: len("aivax_sk_") + 4]


async def test_missing_key_is_401(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/account"), 401, "missing_api_key")


async def test_unknown_well_formed_key_is_401(client: httpx.AsyncClient) -> None:
    token = generate_token("aivax_sk_")
    response = await client.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401, "invalid_api_key")
    assert "x-aivax-account-id" not in response.headers


async def test_x_api_key_header_is_accepted(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.get("/v1/account", headers={"x-api-key": account.private_key})
    assert response.status_code == 200
    assert response.json()["id"] == str(account.id)


async def test_responses_carry_account_key_and_request_ids(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.get("/v1/account", headers=account.headers)
    assert response.headers["x-aivax-account-id"] == str(account.id)
    assert response.headers["x-aivax-key-id"] == str(account.private_key_id)
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", generated)
    again = await client.get("/v1/account", headers=account.headers)
    assert again.headers["x-request-id"] != generated
    echoed = await client.get(
        "/v1/account", headers={**account.headers, "x-request-id": "trace-123"}
    )
    assert echoed.headers["x-request-id"] == "trace-123"
    hostile = await client.get(
        "/v1/account", headers={**account.headers, "x-request-id": "bad id\twith spaces"}
    )
    assert hostile.headers["x-request-id"].startswith("req_")


async def test_revoked_key_is_401(client: httpx.AsyncClient, services: AppServices) -> None:
    owner = await make_account(services)
    created = await client.post("/v1/keys", headers=owner.headers, json={"name": "temp"})
    assert created.status_code == 201
    token, key_id = created.json()["key"], created.json()["id"]
    assert (
        await client.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    ).status_code == 200
    revoked = await client.delete(f"/v1/keys/{key_id}", headers=owner.headers)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    response = await client.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401, "api_key_revoked")


async def test_suspended_account_is_403(
    client: httpx.AsyncClient, services: AppServices, admin_headers: dict[str, str]
) -> None:
    owner = await make_account(services)
    suspended = await client.patch(
        f"/admin/accounts/{owner.id}", headers=admin_headers, json={"status": "suspended"}
    )
    assert suspended.status_code == 200
    assert_error(await client.get("/v1/account", headers=owner.headers), 403, "account_suspended")
    await client.patch(
        f"/admin/accounts/{owner.id}", headers=admin_headers, json={"status": "active"}
    )
    assert (await client.get("/v1/account", headers=owner.headers)).status_code == 200


async def test_public_key_on_private_endpoint_is_403(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    headers = {"Authorization": f"Bearer {account.public_key}"}
    for path in ("/v1/account", "/v1/keys", "/v1/wallet", "/v1/wallet/ledger"):
        assert_error(await client.get(path, headers=headers), 403, "private_key_required")


async def test_last_used_is_written_at_most_once_per_interval(
    client: httpx.AsyncClient, services: AppServices, statements: list[str]
) -> None:
    owner = await make_account(services)
    for _ in range(5):
        assert (await client.get("/v1/account", headers=owner.headers)).status_code == 200
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE API_KEYS")]
    assert len(updates) == 1
    async with services.database.sessions() as session:
        last_used = await session.scalar(
            select(ApiKey.last_used_at).where(ApiKey.id == owner.private_key_id)
        )
    assert last_used is not None


async def test_concurrent_first_use_touches_last_used_once(
    client: httpx.AsyncClient, services: AppServices, statements: list[str]
) -> None:
    owner = await make_account(services)
    responses = await asyncio.gather(
        *(client.get("/v1/account", headers=owner.headers) for _ in range(8))
    )
    assert all(r.status_code == 200 for r in responses)
    async with services.database.sessions() as session:
        first = await session.scalar(
            select(ApiKey.last_used_at).where(ApiKey.id == owner.private_key_id)
        )
    await client.get("/v1/account", headers=owner.headers)
    async with services.database.sessions() as session:
        second = await session.scalar(
            select(ApiKey.last_used_at).where(ApiKey.id == owner.private_key_id)
        )
    assert first == second


@pytest.fixture
async def any_key_client(settings: Settings, services: AppServices) -> httpx.AsyncClient:
    """The real app plus one route that accepts any key, to pin the public-key rules."""
    application: FastAPI = create_app(settings, services=services)

    @application.get("/v1/_probe")
    async def probe(principal: AnyKey) -> dict[str, str]:
        return {"kind": principal.key_kind.value, "account": str(principal.account_id)}

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=application), base_url="http://aivax.test"
    )


async def test_public_key_origin_allow_list(
    any_key_client: httpx.AsyncClient, services: AppServices
) -> None:
    owner = await make_account(services, origins=["https://shop.example.com"])
    headers = {"Authorization": f"Bearer {owner.public_key}"}
    allowed = await any_key_client.get(
        "/v1/_probe", headers={**headers, "Origin": "https://shop.example.com"}
    )
    assert allowed.status_code == 200
    assert allowed.json() == {"kind": "public", "account": str(owner.id)}
    assert_error(
        await any_key_client.get(
            "/v1/_probe", headers={**headers, "Origin": "https://evil.example.com"}
        ),
        403,
        "origin_not_allowed",
    )
    assert_error(await any_key_client.get("/v1/_probe", headers=headers), 403, "origin_not_allowed")


async def test_public_key_without_origins_is_accepted_anywhere(
    any_key_client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await any_key_client.get(
        "/v1/_probe", headers={"Authorization": f"Bearer {account.public_key}"}
    )
    assert response.status_code == 200
