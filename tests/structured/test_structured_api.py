"""Structured output through the API: response_schema with healing and re-ask, json_only,
response_format healing behind the account switch, streams with a final validated document."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from aivax.services import AppServices
from tests.conftest import FakeUpstream
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
PARIS = {"city": "Paris", "population": 2_100_000}
ASK = [{"role": "user", "content": "Largest city of France, as JSON."}]


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


async def _post(client: httpx.AsyncClient, account: AccountWithKeys, **body: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", headers=account.headers, json={"messages": ASK, **body}
    )


async def _logs(
    services: AppServices, client: httpx.AsyncClient, account: AccountWithKeys
) -> list[dict[str, Any]]:
    await services.meter.drain()
    data: list[dict[str, Any]] = (await client.get("/v1/requests", headers=account.headers)).json()[
        "data"
    ]
    return list(reversed(data))


async def test_broken_json_is_healed_locally(
    client: httpx.AsyncClient, account: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    marker = f"s-{uuid.uuid4()}"
    response = await _post(
        client, account, model="test/fake-json-broken", response_schema=CITY, user=marker
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert json.loads(body["choices"][0]["message"]["content"]) == PARIS
    healing = body["aivax"]["json_healing"]
    assert healing["steps"] == ["code_fence", "syntax", "scalar_types"]
    assert (healing["attempts"], healing["valid"]) == (1, True)
    sent = next(r for r in fake_openai.recorder.requests if r.get("user") == marker)
    assert sent["response_format"]["json_schema"]["schema"] == CITY  # native path


async def test_cut_off_json_is_re_asked_and_every_attempt_billed(
    client: httpx.AsyncClient,
    services: AppServices,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    marker = f"s-{uuid.uuid4()}"
    response = await _post(
        client, account, model="test/fake-json-cut", response_schema=CITY, user=marker
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == PARIS
    assert response.json()["aivax"]["json_healing"]["attempts"] == 2
    retry = [r for r in fake_openai.recorder.requests if r.get("user") == marker][-1]
    assert retry["messages"][-2] == {"role": "assistant", "content": '{"city": "Par'}
    assert "not valid JSON" in retry["messages"][-1]["content"]
    logs = await _logs(services, client, account)
    assert [row["status"] for row in logs] == [200, 200]
    assert all(row["cost_micros"] > 0 for row in logs)
    assert response.json()["aivax"]["cost_micros"] == sum(r["cost_micros"] for r in logs)


async def test_final_failure_is_422_with_errors_and_the_last_output(
    client: httpx.AsyncClient, services: AppServices, account: AccountWithKeys
) -> None:
    response = await _post(client, account, model="test/fake-json-never", response_schema=CITY)
    error = assert_error(response, 422, "json_validation_failed")
    assert "not JSON" in str(error["message"])
    assert "I would rather not say." in str(error["message"])
    assert len(await _logs(services, client, account)) == 3  # the call and two re-asks


async def test_json_only_returns_the_document_itself(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await _post(
        client, account, model="test/fake-json-broken", response_schema=CITY, json_only=True
    )
    assert response.status_code == 200
    assert response.json() == PARIS
    assert int(response.headers["x-aivax-cost-micros"]) > 0
    assert int(response.headers["x-aivax-usage-completion-tokens"]) == 3
    assert response.headers["x-aivax-json-healing"] == "code_fence,syntax,scalar_types"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"response_schema": {"type": "objekt"}}, "invalid_schema", "response_schema"),
        (
            {"response_schema": CITY, "response_format": {"type": "json_object"}},
            "invalid_request",
            "response_schema",
        ),
        ({"json_only": True}, "invalid_request", "json_only"),
        (
            {"json_only": True, "stream": True, "response_schema": CITY},
            "invalid_request",
            "json_only",
        ),
    ],
)
async def test_bad_structured_requests_are_400(
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    body: dict[str, Any],
    code: str,
    param: str,
) -> None:
    error = assert_error(await _post(client, account, model="test/fake-ok", **body), 400, code)
    assert error["param"] == param


async def test_response_format_is_healed_only_when_the_account_allows_it(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    raw = await _post(
        client, account, model="test/fake-json-broken", response_format=response_format
    )
    assert raw.json()["choices"][0]["message"]["content"].startswith("```json")
    assert "json_healing" not in raw.json()["aivax"]
    await client.patch(
        "/v1/account",
        headers=account.headers,
        json={"settings": {"json_healing_for_response_format": True}},
    )
    healed = await _post(
        client, account, model="test/fake-json-broken", response_format=response_format
    )
    assert json.loads(healed.json()["choices"][0]["message"]["content"]) == PARIS


async def test_models_without_native_json_get_an_instruction(
    client: httpx.AsyncClient, account: AccountWithKeys, fake_anthropic: FakeUpstream
) -> None:
    response = await _post(client, account, model="test/claude-plain", response_schema=CITY)
    assert_error(response, 422, "json_validation_failed")  # the fake only says "Bonjour !"
    assert "JSON Schema" in fake_anthropic.recorder.last()["system"]


@pytest.fixture
async def sdk(
    live_server: ThreadedServer, account: AccountWithKeys
) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=live_server.url + "/v1", api_key=account.private_key, max_retries=0
    )
    yield client
    await client.close()


async def test_sdk_stream_ends_with_the_validated_document(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="test/fake-json-broken",
        messages=ASK,
        stream=True,  # type: ignore[arg-type]
        extra_body={"response_schema": CITY},
    )
    chunks = [chunk async for chunk in stream]
    finals = [c.model_extra["aivax"] for c in chunks if c.model_extra and "aivax" in c.model_extra]
    assert finals, [c.model_dump() for c in chunks][-2:]
    final = {"aivax": finals[-1]}
    assert final["aivax"]["document"] == PARIS
    assert final["aivax"]["json_healing"]["valid"] is True


async def test_sdk_stream_that_cannot_be_healed_ends_with_an_error(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.chat.completions.create(
        model="test/fake-json-never",
        messages=ASK,
        stream=True,  # type: ignore[arg-type]
        extra_body={"response_schema": CITY},
    )
    with pytest.raises(openai.APIError, match="did not produce JSON"):
        async for _ in stream:
            pass


async def test_sdk_non_streamed_response_schema(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="test/fake-json-broken",
        messages=ASK,  # type: ignore[arg-type]
        extra_body={"response_schema": CITY},
    )
    assert json.loads(completion.choices[0].message.content or "") == PARIS


HEALABLE = ["fenced", "prose", "trailing", "quotes", "comments", "scalars"]
REASK = ["cut", "missing"]  # cut off or missing a field: only a re-ask can fix these


@pytest.fixture
async def healing_sdk(
    live_server: ThreadedServer,
    services: AppServices,
    client: httpx.AsyncClient,
    fake_models: list[str],
) -> AsyncIterator[openai.AsyncOpenAI]:
    owner = await make_account(services, plan="starter", balance_micros=5_000_000)
    # Switch response_format healing on before the live server ever sees this key.
    await client.patch(
        "/v1/account",
        headers=owner.headers,
        json={"settings": {"json_healing_for_response_format": True}},
    )
    sdk_client = openai.AsyncOpenAI(
        base_url=live_server.url + "/v1", api_key=owner.private_key, max_retries=0
    )
    yield sdk_client
    await sdk_client.close()


def _path(path: str) -> dict[str, Any]:
    if path == "response_schema":
        return {"extra_body": {"response_schema": CITY}}
    if path == "json_schema":
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY},
            }
        }
    return {"response_format": {"type": "json_object"}}


async def _document(
    sdk_client: openai.AsyncOpenAI, model: str, stream: bool, extra: dict[str, Any]
) -> Any:
    arguments: dict[str, Any] = {
        "model": model,
        "messages": ASK,
        "user": f"u-{uuid.uuid4()}",
        **extra,
    }
    if not stream:
        completion = await sdk_client.chat.completions.create(**arguments)
        return json.loads(completion.choices[0].message.content or "")
    chunks = [c async for c in await sdk_client.chat.completions.create(stream=True, **arguments)]
    finals = [c.model_extra["aivax"] for c in chunks if c.model_extra and "aivax" in c.model_extra]
    return finals[-1]["document"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path", ["response_schema", "json_schema", "json_object"])
@pytest.mark.parametrize("corruption", HEALABLE)
async def test_sdk_every_path_heals_every_local_corruption(
    healing_sdk: openai.AsyncOpenAI, corruption: str, path: str, stream: bool
) -> None:
    document = await _document(healing_sdk, f"test/fake-json-{corruption}", stream, _path(path))
    if path == "json_object" and corruption == "scalars":
        # json_object has no schema types, so a number sent as a string stays a string.
        assert document == {**PARIS, "population": "2100000"}
    else:
        assert document == PARIS


@pytest.mark.parametrize("path", ["response_schema", "json_schema"])
@pytest.mark.parametrize("corruption", REASK)
async def test_sdk_re_asks_what_cannot_be_healed_locally(
    healing_sdk: openai.AsyncOpenAI, corruption: str, path: str
) -> None:
    document = await _document(healing_sdk, f"test/fake-json-{corruption}", False, _path(path))
    assert document == PARIS
    # Streams are not re-asked: they end with a clear error instead of invalid JSON.
    with pytest.raises(openai.APIError, match="did not produce JSON"):
        await _document(healing_sdk, f"test/fake-json-{corruption}", True, _path(path))


async def test_sdk_json_only(healing_sdk: openai.AsyncOpenAI) -> None:
    raw = await healing_sdk.chat.completions.with_raw_response.create(
        model="test/fake-json-quotes",
        messages=ASK,  # type: ignore[arg-type]
        extra_body={"response_schema": CITY, "json_only": True},
    )
    assert raw.http_response.json() == PARIS
    assert raw.headers["content-type"] == "application/json"


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_real_local_model_with_a_schema(
    live_server: ThreadedServer, services: AppServices, stream: bool
) -> None:
    owner = await make_account(services, plan="free", balance_micros=1_000_000)
    sdk_client = openai.AsyncOpenAI(
        base_url=live_server.url + "/v1", api_key=owner.private_key, max_retries=0
    )
    try:
        document = await _document(
            sdk_client,
            "aivax/smollm2-135m",
            stream,
            {"extra_body": {"response_schema": CITY}, "temperature": 0, "max_tokens": 40},
        )
    finally:
        await sdk_client.close()
    assert set(document) == {"city", "population"}
    assert isinstance(document["population"], int)


async def test_json_only_with_tools_and_an_enormous_schema_are_400(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    with_tools = await _post(
        client, account, model="test/fake-ok", response_schema=CITY, json_only=True, tools=tools
    )
    assert assert_error(with_tools, 400)["param"] == "json_only"
    enormous = {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "x" * 100} for i in range(1_000)
        },
    }
    huge = await _post(client, account, model="test/fake-ok", response_schema=enormous)
    assert "limit" in str(assert_error(huge, 400, "invalid_schema")["message"])


@pytest.mark.parametrize("field", ["response_schema", "response_format"])
async def test_local_model_refuses_keywords_its_grammar_cannot_enforce(
    client: httpx.AsyncClient, services: AppServices, fake_models: list[str], field: str
) -> None:
    owner = await make_account(services, plan="free", balance_micros=1_000_000)
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    extra: dict[str, Any] = (
        {"response_schema": schema}
        if field == "response_schema"
        else {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": schema},
            }
        }
    )
    response = await _post(client, owner, model="aivax/smollm2-135m", **extra)
    error = assert_error(response, 400, "unsupported_schema_keyword")
    assert "#/properties/tags/uniqueItems" in str(error["message"])
    wallet = (await client.get("/v1/wallet", headers=owner.headers)).json()
    assert wallet["held_micros"] == 0
    # The same schema is fine for a model that is not grammar-constrained.
    starter = await make_account(services, plan="starter", balance_micros=1_000_000)
    elsewhere = await _post(client, starter, model="test/fake-json-fenced", **extra)
    assert elsewhere.status_code == 200, elsewhere.text
