"""`/v1/mcp/collections` refuses what it should: public keys before any header is read, every
method but POST (405, as the streamable HTTP transport specifies for a server with no event
stream), bodies that are not UTF-8 JSON within the nesting limit (JSON-RPC -32700) and NUL
characters, which PostgreSQL cannot store (-32602)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from aivax.kit.jsonlimits import MAX_JSON_DEPTH
from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer

PATH = "/v1/mcp/collections"
MCP_ACCEPT = {"accept": "application/json, text/event-stream"}


@pytest.fixture
async def owner(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=5_000_000)


@pytest.fixture
async def collection(client: httpx.AsyncClient, owner: AccountWithKeys) -> str:
    created = await client.post("/v1/collections", headers=owner.headers, json={"name": "kb"})
    assert created.status_code == 201, created.text
    collection_id = str(created.json()["id"])
    added = await client.post(
        f"/v1/collections/{collection_id}/documents?wait=true",
        headers=owner.headers,
        json={
            "id": "bread",
            "text": "# Sourdough\n\nFeed the starter and knead the dough.",
            "content_type": "markdown",
            "metadata": {"lang": "en"},
        },
    )
    assert added.json()["status"] == "ready", added.text
    return collection_id


def _rpc(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}


INITIALIZE = _rpc(
    "initialize",
    {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
)
MESSAGES = {
    "initialize": INITIALIZE,
    "tools/list": _rpc("tools/list"),
    "tools/call": _rpc(
        "tools/call", {"name": "search_collections", "arguments": {"query": "sourdough"}}
    ),
}


@contextlib.asynccontextmanager
async def _mcp(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        httpx.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def _ranker_credential(
    client: httpx.AsyncClient, owner: AccountWithKeys, upstream: FakeUpstream
) -> None:
    response = await client.post(
        "/v1/credentials",
        headers=owner.headers,
        json={
            "name": "ranker",
            "provider": "openai",
            "base_url": upstream.base_url,
            "api_key": "sk-account-secret",
        },
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("method", list(MESSAGES))
async def test_public_key_cannot_use_the_mcp_server(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    collection: str,
    fake_openai: FakeUpstream,
    method: str,
) -> None:
    await _ranker_credential(client, owner, fake_openai)
    public_key = {"Authorization": f"Bearer {owner.public_key}"}
    elsewhere = await client.get("/v1/collections", headers=public_key)
    expected = assert_error(elsewhere, 403, "private_key_required")["message"]
    before = len(fake_openai.recorder.requests)
    public = {**public_key, **MCP_ACCEPT, "x-aivax-collections": collection}
    for extra in [
        {},
        {"x-aivax-rerank": "none"},
        {"x-aivax-rerank": "model:test/fake-judge"},
        {"x-aivax-rerank": "endpoint:ranker:rerank-fake"},
        {"x-aivax-allow-writes": "true"},
        {"x-aivax-top-k": "0"},  # refused for the key before the headers are read
        {"x-aivax-rerank": "bogus"},
        {"x-aivax-collections": ""},
    ]:
        response = await client.post(PATH, headers={**public, **extra}, json=MESSAGES[method])
        error = assert_error(response, 403, "private_key_required")
        assert error["message"] == expected, extra
        assert error["type"] == "permission_error"
    assert len(fake_openai.recorder.requests) == before  # no reranker call, no credential sent


async def test_suspended_account_cannot_use_the_mcp_server(
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    collection: str,
    admin_headers: dict[str, str],
) -> None:
    suspended = await client.patch(
        f"/admin/accounts/{owner.id}", headers=admin_headers, json={"status": "suspended"}
    )
    assert suspended.status_code == 200, suspended.text
    headers = {**owner.headers, **MCP_ACCEPT, "x-aivax-collections": collection}
    response = await client.post(PATH, headers=headers, json=MESSAGES["tools/call"])
    assert_error(response, 403, "account_suspended")


async def test_private_key_searches_and_reranks_with_the_official_client(
    live_server: ThreadedServer,
    client: httpx.AsyncClient,
    owner: AccountWithKeys,
    collection: str,
    fake_openai: FakeUpstream,
) -> None:
    headers = {
        **owner.headers,
        "x-aivax-collections": collection,
        "x-aivax-rerank": "model:test/fake-judge",
    }
    async with _mcp(live_server.url + PATH, headers) as session:
        assert [t.name for t in (await session.list_tools()).tools] == ["search_collections"]
        result = await session.call_tool("search_collections", {"query": "sourdough starter"})
        assert not result.isError, result
        found = result.structuredContent["results"]  # type: ignore[index]
        assert found[0]["heading_path"] == ["Sourdough"]
    assert fake_openai.recorder.last()["model"] == "fake-judge"


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "PATCH"])
async def test_only_post_is_served_and_nothing_hangs(
    live_server: ThreadedServer, owner: AccountWithKeys, collection: str, method: str
) -> None:
    headers = {
        "accept": "text/event-stream",
        "x-aivax-collections": collection,
        "mcp-session-id": "any",
    }
    public = {**headers, "Authorization": f"Bearer {owner.public_key}"}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=10) as http:
        response = await http.request(method, PATH, headers={**headers, **owner.headers})
        error = assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"
        assert "POST" in str(error["message"])
        refused = await http.request(method, PATH, headers=public)
        assert_error(refused, 403, "private_key_required")
        assert_error(await http.request(method, PATH, headers=headers), 401)


async def _post_raw(
    http: httpx.AsyncClient, headers: dict[str, str], body: bytes, code: int = -32700
) -> Any:
    response = await http.post(
        PATH, headers={**headers, "content-type": "application/json"}, content=body
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()
    assert message["jsonrpc"] == "2.0"
    assert message["id"] is None
    assert message["error"]["code"] == code
    return message["error"]["message"]


def _call_with_filter(filter_json: str) -> bytes:
    return (
        '{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": '
        '"search_collections", "arguments": {"query": "bread", "filter": ' + filter_json + "}}}"
    ).encode()


async def test_bodies_that_are_not_utf8_json_within_the_limit_are_parse_errors(
    live_server: ThreadedServer, owner: AccountWithKeys, collection: str
) -> None:
    headers = {**owner.headers, **MCP_ACCEPT, "x-aivax-collections": collection}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as http:
        for depth in (5_000, MAX_JSON_DEPTH + 1):
            deep = '{"a": ' * depth + "1" + "}" * depth
            message = await _post_raw(http, headers, _call_with_filter(deep))
            assert f"{MAX_JSON_DEPTH} levels" in message
        lists = "[" * 100_000 + "]" * 100_000
        assert f"{MAX_JSON_DEPTH} levels" in await _post_raw(http, headers, lists.encode())
        broken = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "x": "\xff\xfe"}'
        assert "UTF-8" in await _post_raw(http, headers, broken)
        surrogate = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "x": "\xed\xa0\x80"}'
        assert "UTF-8" in await _post_raw(http, headers, surrogate)
        assert "UTF-8" in await _post_raw(http, headers, b"{not json")
        writer = {**headers, "x-aivax-allow-writes": "true"}
        for name, arguments in [
            ("insert_document", {"text": "nul\u0000byte", "id": "nul"}),
            ("search_collections", {"query": "bread\u0000"}),
        ]:
            call = {"name": name, "arguments": arguments}
            body = json.dumps(_rpc("tools/call", call)).encode()
            message = await _post_raw(http, writer, body, code=-32602)
            assert "'params.arguments." in message
            assert "NUL character" in message
        # The server is unharmed: the next call is answered.
        listed = await http.post(PATH, headers=headers, json=MESSAGES["tools/list"])
        assert listed.status_code == 200, listed.text
        assert listed.json()["result"]["tools"][0]["name"] == "search_collections"


async def test_a_filter_outside_the_grammar_is_a_tool_error(
    live_server: ThreadedServer, owner: AccountWithKeys, collection: str
) -> None:
    headers = {**owner.headers, "x-aivax-collections": collection}
    nested: Any = 1
    for _ in range(40):  # within the body's nesting limit, far past the filter's grammar
        nested = {"$eq": nested}
    async with _mcp(live_server.url + PATH, headers) as session:
        for bad in [{"lang": {"$in": [{"$gt": 1}]}}, {"lang": nested}]:
            outcome = await session.call_tool("search_collections", {"query": "x", "filter": bad})
            assert outcome.isError, bad
            text = outcome.content[0].text  # type: ignore[union-attr]
            assert "filter['lang']" in text
            assert "$in and $nin take a list" in text
        good = await session.call_tool(
            "search_collections", {"query": "sourdough", "filter": {"lang": {"$in": ["en"]}}}
        )
        assert not good.isError, good
        assert json.dumps(good.structuredContent).count("Sourdough") >= 1
