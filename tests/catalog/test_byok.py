"""Bring-your-own-key credentials: encrypted, never returned, SSRF-guarded, own rate limit."""

from __future__ import annotations

import uuid

import httpx
import pytest

from aivax.catalog import service as catalog
from aivax.catalog.schemas import CredentialCreate
from aivax.kit.ssrf import GuardedTransport, SSRFBlocked, vetted_address
from aivax.models import ProviderCredential
from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account, make_plan

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def _add_credential(
    client: httpx.AsyncClient, account: AccountWithKeys, fake: FakeUpstream, **extra: object
) -> httpx.Response:
    return await client.post(
        "/v1/credentials",
        headers=account.headers,
        json={
            "name": "mine",
            "provider": "openai",
            "base_url": fake.base_url,
            "api_key": "sk-fake-upstream",
            "models": ["fake-ok"],
            **extra,
        },
    )


async def test_credential_is_encrypted_and_never_returned(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    created = await _add_credential(client, account, fake_openai)
    assert created.status_code == 201, created.text
    assert created.json()["key_last4"] == "ream"
    assert "sk-fake-upstream" not in created.text
    listed = await client.get("/v1/credentials", headers=account.headers)
    assert "sk-fake-upstream" not in listed.text
    async with services.database.sessions() as session:
        row = await session.get(ProviderCredential, uuid.UUID(created.json()["id"]))
    assert row is not None
    assert "sk-fake-upstream" not in row.api_key_encrypted
    assert services.secret_box.decrypt(row.api_key_encrypted) == "sk-fake-upstream"
    duplicate = await _add_credential(client, account, fake_openai)
    assert_error(duplicate, 409, "credential_exists")


async def test_byok_call_is_logged_unpriced_and_not_charged(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    owner = await make_account(services, plan="free", balance_micros=5_000)
    await _add_credential(client, owner, fake_openai)
    models = (await client.get("/v1/models", headers=owner.headers)).json()["data"]
    assert "byok/mine/fake-ok" in {m["id"] for m in models}
    response = await client.post(
        "/v1/chat/completions", headers=owner.headers, json={"model": "byok/mine/fake-ok", **CHAT}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake"
    assert response.json()["aivax"]["cost_micros"] is None
    await services.meter.drain()
    wallet = (await client.get("/v1/wallet", headers=owner.headers)).json()
    assert wallet["balance_micros"] == 5_000
    logs = (await client.get("/v1/requests", headers=owner.headers)).json()["data"]
    assert logs[0]["byok"] is True
    assert logs[0]["cost_micros"] is None
    assert logs[0]["input_tokens"] == 11


async def test_priced_byok_model_is_billed(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    owner = await make_account(services, plan="free", balance_micros=50_000)
    await _add_credential(
        client,
        owner,
        fake_openai,
        prices={"fake-ok": {"input_price_per_m": 1_000_000, "output_price_per_m": 1_000_000}},
    )
    response = await client.post(
        "/v1/chat/completions", headers=owner.headers, json={"model": "byok/mine/fake-ok", **CHAT}
    )
    assert response.json()["aivax"]["cost_micros"] == 14
    await services.meter.drain()
    assert (await client.get("/v1/wallet", headers=owner.headers)).json()["balance_micros"] == (
        50_000 - 14
    )


async def test_byok_uses_the_plans_byok_rpm(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    plan = await make_plan(services, byok_rpm=2, integrated_rpm=0)
    owner = await make_account(services, plan=plan)
    await _add_credential(client, owner, fake_openai)
    body = {"model": "byok/mine/fake-ok", **CHAT}
    for _ in range(2):
        assert (
            await client.post("/v1/chat/completions", headers=owner.headers, json=body)
        ).status_code == 200
    limited = await client.post("/v1/chat/completions", headers=owner.headers, json=body)
    assert_error(limited, 429, "rate_limit_requests")
    assert limited.headers["x-should-retry"] == "false"


async def test_wrong_upstream_key_is_reported_as_the_callers_credential(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    owner = await make_account(services)
    await client.post(
        "/v1/credentials",
        headers=owner.headers,
        json={
            "name": "bad",
            "provider": "openai",
            "base_url": fake_openai.base_url,
            "api_key": "sk-wrong",
        },
    )
    response = await client.post(
        "/v1/chat/completions", headers=owner.headers, json={"model": "byok/bad/fake-ok", **CHAT}
    )
    assert_error(response, 400, "byok_credential_rejected")


async def test_other_accounts_credentials_are_invisible(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    owner = await make_account(services)
    stranger = await make_account(services)
    created = (await _add_credential(client, owner, fake_openai)).json()
    use = await client.post(
        "/v1/chat/completions",
        headers=stranger.headers,
        json={"model": "byok/mine/fake-ok", **CHAT},
    )
    assert_error(use, 404, "model_not_found")
    delete = await client.delete(f"/v1/credentials/{created['id']}", headers=stranger.headers)
    assert_error(delete, 404)
    assert (
        await client.delete(f"/v1/credentials/{created['id']}", headers=owner.headers)
    ).status_code == 204


async def test_malformed_byok_model_name(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.post(
        "/v1/chat/completions", headers=account.headers, json={"model": "byok/only-name", **CHAT}
    )
    assert "byok/<credential>/<upstream-model>" in str(assert_error(response, 404)["message"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/v1",
        "http://10.0.0.8/v1",
        "http://169.254.169.254/latest",
        "http://[::1]/v1",
        "http://localhost/v1",
        "file:///etc/passwd",
        "http://user:pw@example.com",
    ],
)
async def test_ssrf_guard_refuses_private_targets_at_creation(
    services: AppServices, url: str
) -> None:
    owner = await make_account(services)
    async with services.database.sessions() as session:
        with pytest.raises(catalog.InvalidCredential) as raised:
            await catalog.create_credential(
                session,
                account_id=owner.id,
                data=CredentialCreate(name="x", provider="openai", base_url=url, api_key="k"),
                secret_box=services.secret_box,
                ssrf_allowlist=frozenset(),
            )
    assert raised.value.param == "base_url"


async def test_ssrf_guard_checks_the_address_on_every_request() -> None:
    transport = GuardedTransport(httpx.AsyncHTTPTransport(), allowlist=frozenset())
    async with httpx.AsyncClient(transport=transport) as http:
        for url in ("http://127.0.0.1:1/", "http://169.254.169.254/", "http://localhost:1/"):
            with pytest.raises(httpx.ConnectError, match="SSRF"):
                await http.get(url)
    with pytest.raises(SSRFBlocked):
        await vetted_address("0.0.0.0", 80, allowlist=frozenset())  # noqa: S104
    assert await vetted_address("127.0.0.1", 80, allowlist=frozenset({"127.0.0.1"})) == (
        "127.0.0.1"
    )


async def test_request_log_is_scoped_to_the_account(
    client: httpx.AsyncClient, services: AppServices, fake_openai: FakeUpstream
) -> None:
    owner = await make_account(services)
    stranger = await make_account(services)
    await _add_credential(client, owner, fake_openai)
    await client.post(
        "/v1/chat/completions", headers=owner.headers, json={"model": "byok/mine/fake-ok", **CHAT}
    )
    await services.meter.drain()
    owned = (await client.get("/v1/requests", headers=owner.headers)).json()["data"]
    assert [row["model"] for row in owned] == ["byok/mine/fake-ok"]
    assert (await client.get("/v1/requests", headers=stranger.headers)).json()["data"] == []
    stranger_usage = await client.get("/v1/usage", headers=stranger.headers)
    assert stranger_usage.json()["data"] == []
    usage = (
        await client.get("/v1/usage", headers=owner.headers, params={"group_by": "model"})
    ).json()
    assert usage["data"] == [
        {
            "model": "byok/mine/fake-ok",
            "requests": 1,
            "input_tokens": 11,
            "output_tokens": 3,
            "cost_micros": 0,
        }
    ]
    by_key = (
        await client.get("/v1/usage", headers=owner.headers, params={"group_by": "key"})
    ).json()["data"]
    assert by_key[0]["key"] == str(owner.private_key_id)


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/usage", {"group_by": "planet"}, "group_by"),
        ("/v1/usage", {"since": "yesterday"}, "since"),
        ("/v1/requests", {"after": "abc"}, "after"),
        ("/v1/requests", {"limit": 0}, "limit"),
    ],
)
async def test_usage_and_request_log_refuse_bad_parameters(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    path: str,
    params: dict[str, object],
    param: str,
) -> None:
    response = await client.get(path, headers=account.headers, params=params)
    assert assert_error(response, 400)["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "provider": "cohere", "api_key": "k"}, "provider"),
        ({"name": "x", "provider": "openai"}, "api_key"),
        ({"name": "has spaces", "provider": "openai", "api_key": "k"}, "name"),
        ({"name": "x", "provider": "openai", "api_key": "k", "secret": 1}, "secret"),
    ],
)
async def test_credential_validation_names_the_field(
    client: httpx.AsyncClient, account: AccountWithKeys, body: dict[str, object], param: str
) -> None:
    response = await client.post("/v1/credentials", headers=account.headers, json=body)
    assert assert_error(response, 400)["param"] == param
