"""Moderation settings checked on save, and a moderation service that cannot answer: a 502
`moderation_unavailable` in the OpenAI envelope, nothing sent to the model, nothing charged."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


def _broken_moderation_app() -> Starlette:
    async def http_500(request: Request) -> Response:
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    async def not_json(request: Request) -> Response:
        return Response("<html>maintenance</html>", media_type="text/html")

    async def wrong_shape(request: Request) -> Response:
        return JSONResponse({"results": "nope"})

    return Starlette(
        routes=[
            Route("/http500/moderations", http_500, methods=["POST"]),
            Route("/notjson/moderations", not_json, methods=["POST"]),
            Route("/shape/moderations", wrong_shape, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def broken_moderation() -> Iterator[str]:
    server = ThreadedServer(_broken_moderation_app()).start()
    yield server.url
    server.stop()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens once the socket is closed


async def _credential(
    client: httpx.AsyncClient, account: AccountWithKeys, base_url: str, provider: str = "openai"
) -> str:
    name = f"mod-{uuid.uuid4().hex[:8]}"
    created = await client.post(
        "/v1/credentials",
        headers=account.headers,
        json={"name": name, "provider": provider, "base_url": base_url, "api_key": "sk-x"},
    )
    assert created.status_code == 201, created.text
    return name


async def _save(
    client: httpx.AsyncClient, account: AccountWithKeys, moderation: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        "/v1/gateways",
        headers=account.headers,
        json={
            "slug": f"modf-{uuid.uuid4().hex[:8]}",
            "config": {"model": "test/fake-ok", "moderation": moderation},
        },
    )


async def test_an_unknown_credential_is_refused_on_save(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await _save(client, account, {"provider": "openai", "credential": "nope"})
    error = assert_error(response, 400, "credential_not_found")
    assert error["param"] == "config.moderation.credential"
    missing = await _save(client, account, {"provider": "openai"})
    assert assert_error(missing, 400, "invalid_gateway")["param"] == "config.moderation.credential"


async def test_another_accounts_credential_looks_exactly_like_a_missing_one(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    other = await make_account(services, plan="starter")
    theirs = await _credential(client, other, fake_openai.base_url)
    absent = f"mod-{uuid.uuid4().hex[:8]}"
    refused = await _save(client, account, {"provider": "openai", "credential": theirs})
    unknown = await _save(client, account, {"provider": "openai", "credential": absent})
    assert refused.status_code == unknown.status_code == 400
    assert refused.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
        absent, theirs
    )
    assert {k: v for k, v in refused.json()["error"].items() if k != "message"} == {
        k: v for k, v in unknown.json()["error"].items() if k != "message"
    }
    # The owner may use it.
    assert (await _save(client, other, {"provider": "openai", "credential": theirs})).is_success


async def test_update_is_checked_too_and_a_non_openai_credential_is_refused(
    client: httpx.AsyncClient, account: AccountWithKeys, fake_anthropic: FakeUpstream
) -> None:
    saved = await _save(client, account, {"keywords": ["x"]})
    assert saved.status_code == 201, saved.text
    patched = await client.patch(
        f"/v1/gateways/{saved.json()['slug']}",
        headers=account.headers,
        json={"config": {"moderation": {"provider": "openai", "credential": "nope"}}},
    )
    assert_error(patched, 400, "credential_not_found")
    anthropic = await _credential(client, account, fake_anthropic.server.url, "anthropic")
    wrong = await _save(client, account, {"provider": "openai", "credential": anthropic})
    assert_error(wrong, 400, "invalid_gateway")


@pytest.mark.parametrize("failure", ["refused", "http500", "notjson", "shape"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_moderation_service_that_cannot_answer_is_a_502_before_anything_is_sent(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
    broken_moderation: str,
    failure: str,
    stream: bool,
) -> None:
    base_url = (
        f"http://127.0.0.1:{_closed_port()}/v1"
        if failure == "refused"
        else f"{broken_moderation}/{failure}"
    )
    name = await _credential(client, account, base_url)
    saved = await _save(client, account, {"provider": "openai", "credential": name})
    assert saved.status_code == 201, saved.text
    marker = f"m-{uuid.uuid4()}"
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={
            "model": saved.json()["slug"],
            "stream": stream,
            "user": marker,
            "messages": [{"role": "user", "content": "hello"}],
        },
    )
    error = assert_error(response, 502, "moderation_unavailable")
    assert "moderation service" in str(error["message"])
    assert not any(r.get("user") == marker for r in fake_openai.recorder.requests)
    wallet = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert (wallet["balance_micros"], wallet["held_micros"]) == (1_000_000, 0)


async def test_output_moderation_that_cannot_answer_is_a_502(
    client: httpx.AsyncClient, account: AccountWithKeys, broken_moderation: str
) -> None:
    name = await _credential(client, account, f"{broken_moderation}/notjson")
    saved = await _save(
        client, account, {"provider": "openai", "credential": name, "input": False, "output": True}
    )
    assert saved.status_code == 201, saved.text
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": saved.json()["slug"], "messages": [{"role": "user", "content": "hi"}]},
    )
    assert_error(response, 502, "moderation_unavailable")
