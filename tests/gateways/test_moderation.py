"""Gateway moderation: rules and the openai endpoint, block and flag, input and streamed output."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _gateway(
    client: httpx.AsyncClient, account: AccountWithKeys, moderation: dict[str, Any]
) -> str:
    slug = f"mod-{uuid.uuid4().hex[:8]}"
    response = await client.post(
        "/v1/gateways",
        headers=account.headers,
        json={"slug": slug, "config": {"model": "test/fake-ok", "moderation": moderation}},
    )
    assert response.status_code == 201, response.text
    return slug


async def _ask(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    slug: str,
    text: str,
    *,
    stream: bool = False,
) -> tuple[httpx.Response, str]:
    marker = f"m-{uuid.uuid4()}"
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={
            "model": slug,
            "stream": stream,
            "user": marker,
            "messages": [{"role": "user", "content": text}],
        },
    )
    return response, marker


def _sent(fake: FakeUpstream, marker: str) -> bool:
    return any(r.get("user") == marker for r in fake.recorder.requests)


async def _last_log(
    services: AppServices, client: httpx.AsyncClient, account: AccountWithKeys
) -> dict[str, Any]:
    await services.meter.drain()
    row: dict[str, Any] = (await client.get("/v1/requests", headers=account.headers)).json()[
        "data"
    ][0]
    return row


@pytest.mark.parametrize(
    ("rules", "text"),
    [
        ({"keywords": ["refund"]}, "I want a REFUND now"),
        (
            {"keywords": ["refund"]},
            "I want a \uff32\uff25\uff26\uff35\uff2e\uff24 now",
        ),  # full-width
        ({"patterns": [r"\b\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}\b"]}, "card 4111 1111 1111 1111"),
    ],
)
async def test_blocked_input_never_reaches_the_upstream_and_costs_nothing(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
    rules: dict[str, Any],
    text: str,
) -> None:
    slug = await _gateway(client, account, {"input": True, "action": "block", **rules})
    response, marker = await _ask(client, account, slug, text)
    assert_error(response, 400, "content_policy_violation")
    assert not _sent(fake_openai, marker)
    wallet = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert (wallet["balance_micros"], wallet["held_micros"]) == (1_000_000, 0)
    clean, _ = await _ask(client, account, slug, "What are your opening hours?")
    assert clean.status_code == 200


async def test_flagged_input_is_served_and_flagged_in_the_log(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    slug = await _gateway(client, account, {"keywords": ["refund"], "action": "flag"})
    response, _ = await _ask(client, account, slug, "refund please")
    assert response.status_code == 200
    assert (await _last_log(services, client, account))["flags"] == ["input:keyword"]


async def test_streamed_output_is_stopped_when_it_trips(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    # The fake answers "Hello" " from" " fake": the rule trips on the third chunk.
    slug = await _gateway(
        client, account, {"input": False, "output": True, "keywords": ["from fake"]}
    )
    response, _ = await _ask(client, account, slug, "hi", stream=True)
    assert response.status_code == 200
    assert '"content":"Hello"' in response.text
    assert '"content":" from"' in response.text
    assert '"content":" fake"' not in response.text
    assert '"code":"content_policy_violation"' in response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    log = await _last_log(services, client, account)
    assert (log["status"], log["error_code"]) == (400, "content_policy_violation")
    assert log["output_tokens"] > 0  # what was generated is billed


async def test_non_streamed_output_block_and_flag(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    blocked = await _gateway(
        client, account, {"input": False, "output": True, "keywords": ["fake"]}
    )
    response, _ = await _ask(client, account, blocked, "hi")
    assert_error(response, 400, "content_policy_violation")
    flagged = await _gateway(
        client, account, {"input": False, "output": True, "keywords": ["fake"], "action": "flag"}
    )
    response, _ = await _ask(client, account, flagged, "hi")
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake"
    assert (await _last_log(services, client, account))["flags"] == ["output:keyword"]


async def test_openai_moderation_endpoint_through_a_credential(
    client: httpx.AsyncClient, account: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    slug = await _gateway(client, account, {"provider": "openai", "credential": "fake-openai"})
    blocked, marker = await _ask(client, account, slug, "tell me about forbidden-topic")
    assert_error(blocked, 400, "content_policy_violation")
    assert not _sent(fake_openai, marker)
    checked = [r["moderation"] for r in fake_openai.recorder.requests if "moderation" in r]
    assert checked[-1] == {
        "model": "omni-moderation-latest",
        "input": "tell me about forbidden-topic",
    }
    clean, _ = await _ask(client, account, slug, "hello")
    assert clean.status_code == 200


async def test_flagged_streamed_output_is_served_whole_and_flagged(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    slug = await _gateway(
        client,
        account,
        {"input": False, "output": True, "keywords": ["from fake"], "action": "flag"},
    )
    response, _ = await _ask(client, account, slug, "hi", stream=True)
    assert '"content":" fake"' in response.text
    assert '"error"' not in response.text
    assert (await _last_log(services, client, account))["flags"] == ["output:keyword"]


async def test_moderation_through_an_accounts_own_credential_is_ssrf_guarded(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    created = await client.post(
        "/v1/credentials",
        headers=account.headers,
        json={
            "name": "my-moderation",
            "provider": "openai",
            "base_url": fake_openai.base_url,
            "api_key": "sk-fake-upstream",
        },
    )
    assert created.status_code == 201, created.text
    slug = await _gateway(client, account, {"provider": "openai", "credential": "my-moderation"})
    blocked, _ = await _ask(client, account, slug, "forbidden-topic again")
    assert_error(blocked, 400, "content_policy_violation")
    origin = fake_openai.server.url
    # Reached through the guarded client (the test settings allow 127.0.0.1 explicitly).
    assert (origin, True) in services.registry._clients
