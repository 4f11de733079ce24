"""The public-key rule, walked over every surface: a public key (aivax_pk_…) calls public
gateways by UUID and lists them, and nothing else — it never selects a model, a collection,
a credential, a reranker or a tool, and never receives retrieved passages."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.rag.test_rag_gateways import _kb

ORIGIN = "https://shop.example.com"

# The only surfaces a public key reaches; each is checked in its own test below.
PUBLIC_SURFACES = {
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
}
# Not behind API keys at all.
OPEN_SURFACES = {("GET", "/healthz"), ("GET", "/readyz")}
MCP_PATH = "/v1/mcp/collections"


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=5_000_000)


def _surfaces(app: FastAPI) -> list[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    return sorted(
        (method.upper(), path)
        for path, operations in paths.items()
        for method in operations
        if path.startswith("/v1/")
    )


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda _: str(uuid.uuid4()), path)


async def test_every_v1_surface_but_public_gateways_refuses_a_public_key(
    app: FastAPI, client: httpx.AsyncClient, owner: AccountWithKeys
) -> None:
    surfaces = _surfaces(app)
    assert ("POST", "/v1/embeddings") in surfaces  # the walk sees the whole API
    headers = {"Authorization": f"Bearer {owner.public_key}"}
    refused = []
    for method, path in surfaces:
        if (method, path) in PUBLIC_SURFACES | OPEN_SURFACES:
            continue
        response = await client.request(
            method, _concrete(path), headers=headers, json={"model": "test/fake-ok"}
        )
        assert_error(response, 403, "private_key_required")
        refused.append(path)
    assert len(refused) >= 30, refused


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"x-aivax-rerank": "model:test/fake-ok"},
        {"x-aivax-rerank": "endpoint:mine:rerank-1"},
        {"x-aivax-allow-writes": "true"},
    ],
)
async def test_mcp_collections_refuse_a_public_key_whatever_the_headers(
    client: httpx.AsyncClient, owner: AccountWithKeys, extra: dict[str, str]
) -> None:
    collection = await _kb(client, owner)
    response = await client.post(
        MCP_PATH,
        headers={
            "Authorization": f"Bearer {owner.public_key}",
            "Accept": "application/json, text/event-stream",
            "x-aivax-collections": collection,
            **extra,
        },
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    )
    assert_error(response, 403, "private_key_required")


async def _public_gateway(
    client: httpx.AsyncClient, owner: AccountWithKeys, config: dict[str, Any]
) -> str:
    response = await client.post(
        "/v1/gateways",
        headers=owner.headers,
        json={
            "slug": f"widget-{uuid.uuid4().hex[:8]}",
            "config": {
                "model": "test/fake-ok",
                **config,
                "public": {"enabled": True, **config.get("public", {})},
            },
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def _ask(client: httpx.AsyncClient, key: str, model: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Origin": ORIGIN},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "When will my refund reach my card?"}],
            **extra,
        },
    )


async def test_public_calls_get_no_collection_search_unless_the_gateway_opts_in(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    for strategy in ("always", "rewrite", "tool"):
        gateway = await _public_gateway(
            client, owner, {"collections": {"ids": [collection], "strategy": strategy}}
        )
        response = await _ask(client, owner.public_key, gateway)
        assert response.status_code == 200, response.text
        sent = fake_openai.recorder.last()["messages"]
        assert all("five business days" not in str(m["content"]) for m in sent), strategy
        assert "retrieval" not in response.json()["aivax"]
        # The same gateway with a private key searches: the rule is about the caller.
        private = await _ask(client, owner.private_key, gateway)
        assert private.status_code == 200, private.text


async def test_an_opted_in_public_gateway_feeds_the_model_but_never_the_caller(
    client: httpx.AsyncClient, owner: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    collection = await _kb(client, owner)
    gateway = await _public_gateway(
        client,
        owner,
        {"collections": {"ids": [collection], "top_k": 1}, "public": {"retrieval": True}},
    )
    response = await _ask(client, owner.public_key, gateway)
    assert response.status_code == 200, response.text
    sent = fake_openai.recorder.last()["messages"]
    assert any("five business days" in str(m["content"]) for m in sent)
    assert "retrieval" not in response.json()["aivax"]
    for stream in (False, True):
        asked = await _ask(
            client, owner.public_key, gateway, stream=stream, aivax={"include_retrieval": True}
        )
        error = assert_error(asked, 403, "include_retrieval_not_allowed")
        assert error["param"] == "aivax.include_retrieval"
    mine = await _ask(client, owner.private_key, gateway, aivax={"include_retrieval": True})
    assert mine.json()["aivax"]["retrieval"]["results"], mine.text


async def test_a_public_key_selects_no_model_or_gateway_by_name(
    client: httpx.AsyncClient, owner: AccountWithKeys
) -> None:
    gateway = await _public_gateway(client, owner, {})
    slug = (await client.get(f"/v1/gateways/{gateway}", headers=owner.headers)).json()["slug"]
    for model, code in (
        ("test/fake-ok", "model_not_allowed"),
        ("aivax/smollm2-135m", "model_not_allowed"),
        (slug, "gateway_not_public"),
    ):
        assert_error(await _ask(client, owner.public_key, model), 403, code)
    ok = await _ask(client, owner.public_key, gateway)
    assert ok.status_code == 200, ok.text
    headers = {"Authorization": f"Bearer {owner.public_key}"}
    listed = (await client.get("/v1/models", headers=headers)).json()["data"]
    assert [m["id"] for m in listed] == [gateway]
    assert (await client.get(f"/v1/models/{gateway}", headers=headers)).status_code == 200
    hidden = await client.get("/v1/models/test/fake-ok", headers=headers)
    assert_error(hidden, 404)
