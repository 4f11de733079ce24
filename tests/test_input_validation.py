"""Bad input is a 4xx in the OpenAI envelope naming what is wrong, never a 500, on SQLite and
PostgreSQL alike."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import httpx
import pytest

from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer

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
    await services.meter.drain()
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
    await services.meter.drain()
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


# --- JSON types: never coerced (OpenAI's `invalid_type`) ---------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [
        ("max_tokens", "5", "an integer", "a string"),
        ("stream", "yes", "a boolean", "a string"),
        ("temperature", "0.5", "a number", "a string"),
        ("n", True, "an integer", "a boolean"),
        ("seed", 1.5, "an integer", "a decimal number"),
        ("logprobs", 0, "a boolean", "an integer"),
    ],
)
async def test_a_value_of_the_wrong_json_type_is_400_invalid_type(
    client: httpx.AsyncClient,
    starter: AccountWithKeys,
    field: str,
    value: object,
    expected: str,
    got: str,
) -> None:
    error = assert_error(await _chat(client, starter, **{field: value}), 400, "invalid_type")
    assert error["param"] == field
    assert error["message"] == (
        f"Invalid type for {field!r}: expected {expected}, but got {got} instead."
    )
    assert error["type"] == "invalid_request_error"


async def test_an_integer_is_a_number(client: httpx.AsyncClient, starter: AccountWithKeys) -> None:
    response = await _chat(client, starter, temperature=1, top_p=1, max_tokens=5)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/keys", {"name": 5}, "name"),
        ("/v1/collections", {"name": "kb", "chunk_size": "64"}, "chunk_size"),
        ("/v1/gateways", {"slug": "g", "config": {"model": "m", "sampling": {"seed": "1"}}}, ""),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": "8"}, "dimensions"),
        ("/v1/collections/search", {"collection_ids": [], "query": "q", "top_k": "5"}, "top_k"),
    ],
)
async def test_other_request_bodies_refuse_coercion_too(
    client: httpx.AsyncClient, account: AccountWithKeys, path: str, body: Any, param: str
) -> None:
    response = await client.post(path, headers=account.headers, json=body)
    error = assert_error(response, 400, "invalid_type")
    assert str(error["param"]).startswith(param)


async def test_operator_bodies_refuse_coercion_too(
    client: httpx.AsyncClient, account: AccountWithKeys, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        f"/admin/accounts/{account.id}/topups",
        headers=admin_headers,
        json={"amount_micros": "5", "idempotency_key": "k"},
    )
    assert assert_error(response, 400, "invalid_type")["param"] == "amount_micros"


# --- NUL characters: refused by name on both databases --------------------------------------

NUL = "a\u0000b"


async def _collection(client: httpx.AsyncClient, account: AccountWithKeys) -> str:
    response = await client.post("/v1/collections", headers=account.headers, json={"name": "kb"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_nul_in_the_chat_body_is_400_naming_the_field(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    for body, param in [
        ({"model": "test/fake" + NUL}, "model"),
        ({"messages": [{"role": "user", "content": NUL}]}, "messages.0.content"),
        ({"metadata": {NUL: "x"}}, "metadata." + NUL),
        ({"user": NUL}, "user"),
    ]:
        error = assert_error(await _chat(client, starter, **body), 400, "nul_character")
        assert error["param"] == param
    # An escaped backslash followed by "u0000" is six ordinary characters.
    assert (await _chat(client, starter, user="\\u0000")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/keys", {"name": NUL}, "name"),
        ("/v1/gateways", {"slug": "nul", "name": NUL, "config": {"model": "m"}}, "name"),
        ("/v1/collections", {"name": "kb", "metadata": {"k": [NUL]}}, "metadata.k.0"),
        ("/v1/embeddings", {"model": "m", "input": [NUL]}, "input.0"),
    ],
)
async def test_nul_in_any_json_body_is_400_naming_the_field(
    client: httpx.AsyncClient, account: AccountWithKeys, path: str, body: Any, param: str
) -> None:
    error = assert_error(await client.post(path, headers=account.headers, json=body), 400)
    assert (error["code"], error["param"]) == ("nul_character", param)


async def test_nul_in_document_text_or_a_url_is_400(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    collection = await _collection(client, starter)
    documents = f"/v1/collections/{collection}/documents"
    response = await client.post(documents, headers=starter.headers, json={"text": NUL})
    assert assert_error(response, 400, "nul_character")["param"] == "text"
    response = await client.get("/v1/gateways/x%00y", headers=starter.headers)
    assert_error(response, 400, "nul_character")
    response = await client.get(documents, headers=starter.headers, params={"after": NUL})
    assert assert_error(response, 400, "nul_character")["param"] == "after"


async def test_nul_in_an_upload_is_400_naming_the_field(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    upload = f"/v1/collections/{await _collection(client, starter)}/documents/upload"
    for files, data, param in [
        ({"file": ("a.txt", b"hel\x00lo", "text/plain")}, {}, "file"),
        ({"file": ("a.txt", b"hello", "text/plain")}, {"title": NUL}, "title"),
        ({"file": ("a.txt", b"hello", "text/plain")}, {"id": NUL}, "id"),
        (
            {"file": ("a.txt", b"hello", "text/plain")},
            {"metadata": '{"k": "\\u0000"}'},
            "metadata.k",
        ),
    ]:
        response = await client.post(upload, headers=starter.headers, files=files, data=data)
        assert assert_error(response, 400, "nul_character")["param"] == param


async def test_an_import_line_with_nul_or_deep_nesting_is_rejected_alone(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    collection = await _collection(client, starter)
    deep = '{"text": "deep", "metadata": {"k": ' + "[" * 5000 + "]" * 5000 + "}}"
    shallow_but_over = '{"text": "deep", "metadata": {"k": ' + "[" * 70 + "]" * 70 + "}}"
    lines = [
        '{"id": "a", "text": "fine"}',
        '{"id": "b", "text": "a\\u0000b"}',
        deep,
        shallow_but_over,
        '{"id": "c", "text": "also fine", "metadata": {"k\\u0000": 1}}',
        '{"id": "d", "text": "fine too"}',
    ]
    response = await client.post(
        f"/v1/collections/{collection}/import",
        headers=starter.headers,
        content="\n".join(lines).encode(),
    )
    assert response.status_code == 202, response.text
    report = response.json()
    assert (report["accepted"], report["rejected_count"]) == (2, 4)
    reasons = {row["line"]: row["reason"] for row in report["rejected"]}
    assert set(reasons) == {2, 3, 4, 5}
    assert reasons[2].startswith("text: contains a NUL")
    assert "64 levels" in reasons[3]
    assert "64 levels" in reasons[4]
    assert "NUL" in reasons[5]


# --- JSON nesting: one limit (64 levels) everywhere the API parses JSON ----------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 900, 5000])
async def test_deep_json_bodies_are_400_json_too_deep(
    client: httpx.AsyncClient, starter: AccountWithKeys, depth: int
) -> None:
    nested = _nested(depth)
    for path, raw in [
        ("/v1/collections", '{"name": "kb", "metadata": {"k": DEEP}}'),
        ("/v1/keys", '{"name": DEEP}'),
        ("/v1/gateways", '{"slug": "deep", "config": {"model": "m", "tools": DEEP}}'),
    ]:
        response = await client.post(
            path,
            headers={**starter.headers, "content-type": "application/json"},
            content=raw.replace("DEEP", nested).encode(),
        )
        assert_error(response, 400, "json_too_deep")


@pytest.mark.parametrize("depth", [65, 900, 5000])
async def test_deep_json_in_a_chat_body_is_400_json_too_deep(
    client: httpx.AsyncClient, starter: AccountWithKeys, depth: int
) -> None:
    nested = _nested(depth)
    tool = '{"type": "function", "function": {"name": "f", "parameters": {"k": DEEP}}}'
    bodies = [
        '{"model": "test/fake-ok", "messages": [{"role": "user", "content": "x"}], '
        '"tools": [TOOL]}',
        '{"model": "test/fake-ok", "messages": [{"role": "user", "content": "x"}], '
        '"response_schema": {"k": DEEP}}',
        '{"model": "test/fake-ok", "messages": [{"role": "user", "content": "x"}, '
        '{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", '
        '"arguments": "DEEP"}}]}, {"role": "tool", "tool_call_id": "1", "content": "r"}]}',
    ]
    for raw in bodies:
        response = await client.post(
            "/v1/chat/completions",
            headers={**starter.headers, "content-type": "application/json"},
            content=raw.replace("TOOL", tool).replace("DEEP", nested).encode(),
        )
        assert_error(response, 400, "json_too_deep")


async def test_json_at_the_limit_is_accepted(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    nested = _nested(60)
    response = await client.post(
        "/v1/collections",
        headers={**starter.headers, "content-type": "application/json"},
        content=('{"name": "kb", "metadata": {"k": DEEP}}').replace("DEEP", nested).encode(),
    )
    assert response.status_code == 201, response.text
    args = json.dumps({"k": json.loads(nested)})
    response = await _chat(
        client,
        starter,
        messages=[
            *HELLO,
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": args}}],
            },
            {"role": "tool", "tool_call_id": "1", "content": "r"},
        ],
    )
    assert response.status_code == 200, response.text


async def test_deep_upload_metadata_is_400_json_too_deep(
    client: httpx.AsyncClient, starter: AccountWithKeys
) -> None:
    upload = f"/v1/collections/{await _collection(client, starter)}/documents/upload"
    for depth in (65, 5000):
        response = await client.post(
            upload,
            headers=starter.headers,
            files={"file": ("a.txt", b"hello", "text/plain")},
            data={"metadata": '{"k": DEEP}'.replace("DEEP", _nested(depth))},
        )
        assert assert_error(response, 400, "json_too_deep")["param"] == "metadata"


# --- An error response keeps the connection ---------------------------------------------------


def _two_requests_on_one_connection(
    server: ThreadedServer, headers: dict[str, str], first: tuple[str, str, bytes | None]
) -> tuple[int, str | None, int]:
    """(status of `first`, its Connection header, status of a GET /healthz sent after it on the
    same connection; the second request fails if the server closed the connection)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        method, path, body = first
        connection.request(
            method, path, body=body, headers={**headers, "content-type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        closing = response.getheader("connection")
        socket_before = connection.sock
        connection.request("GET", "/healthz")
        second = connection.getresponse()
        second.read()
        assert connection.sock is socket_before  # no reconnection happened
        return response.status, closing, second.status
    finally:
        connection.close()


async def test_error_responses_keep_the_connection(
    live_server: ThreadedServer,
    starter: AccountWithKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aivax.inference import repository, route

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(route, "respond", broken)
    monkeypatch.setattr(repository, "list_logs", broken)
    chat = b'{"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]}'
    cases: list[tuple[tuple[str, str, bytes | None], int]] = [
        (("POST", "/v1/chat/completions", b"{not json"), 400),
        (("POST", "/v1/chat/completions", b'{"model": "a\\u0000"}'), 400),
        (("POST", "/v1/keys", b'{"name": 5}'), 400),
        (("GET", "/v1/requests?after=" + "9" * 25, None), 400),
        (("GET", "/v1/nowhere", None), 404),
        (("POST", "/v1/chat/completions", chat), 500),
        (("GET", "/v1/requests", None), 500),
    ]
    for request, status in cases:
        answer = await asyncio.to_thread(
            _two_requests_on_one_connection, live_server, starter.headers, request
        )
        assert answer == (status, None, 200), request


@pytest.mark.parametrize("heal", [True, False])
@pytest.mark.parametrize(
    "output",
    [
        '{"a": ' + _nested(65) + "}",
        '{"a": ' + _nested(5000) + "}",
        "{'a': " + _nested(3000) + "}",  # not JSON: goes to the repairer
    ],
)
def test_a_model_document_nested_too_deep_is_invalid_not_an_error(heal: bool, output: str) -> None:
    from jsonschema import Draft202012Validator

    from aivax.structured import pipeline

    schema = {"type": "object"}
    plan = pipeline.StructuredPlan(schema, Draft202012Validator(schema), "response_schema", heal, 1)
    result = pipeline.check(plan, output)
    assert not result.valid
    assert result.errors in (
        ["the output is nested more than 64 levels deep"],
        ["the output is not JSON"],
    )
    assert pipeline.check(plan, '{"a": ' + _nested(60) + "}").valid
