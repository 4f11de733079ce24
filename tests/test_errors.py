"""Bad input gets the OpenAI error envelope with the right status, and nothing leaks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from aivax.app import create_app
from aivax.config import Settings
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys


async def test_malformed_json_is_400_invalid_json(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.post(
        "/v1/keys",
        headers={**account.headers, "content-type": "application/json"},
        content=b'{"name": "x",',
    )
    error = assert_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"


async def test_invalid_utf8_is_400(client: httpx.AsyncClient, account: AccountWithKeys) -> None:
    response = await client.post(
        "/v1/keys",
        headers={**account.headers, "content-type": "application/json"},
        content=b'{"name": "\xff\xfe"}',
    )
    assert_error(response, 400, "invalid_json")


async def test_wrong_type_names_the_parameter(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.post("/v1/keys", headers=account.headers, json={"name": ["list"]})
    error = assert_error(response, 400, "invalid_type")
    assert error["param"] == "name"


async def test_an_error_about_the_whole_body_says_so(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.post("/v1/keys", headers=account.headers, json=["not", "an object"])
    error = assert_error(response, 400, "invalid_type")
    assert error["param"] is None
    assert str(error["message"]).startswith("Invalid type for the request body: expected")
    assert "None" not in str(error["message"])


async def test_unknown_field_is_refused(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    response = await client.post("/v1/keys", headers=account.headers, json={"nmae": "typo"})
    error = assert_error(response, 400)
    assert error["param"] == "nmae"


async def test_body_over_limit_by_content_length_is_413(
    client: httpx.AsyncClient, account: AccountWithKeys, settings: Settings
) -> None:
    payload = b'{"name": "' + b"a" * settings.max_body_bytes + b'"}'
    response = await client.post(
        "/v1/keys", headers={**account.headers, "content-type": "application/json"}, content=payload
    )
    assert_error(response, 413, "request_too_large")


async def test_streamed_body_over_limit_is_413(
    client: httpx.AsyncClient, account: AccountWithKeys, settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    response = await client.post(
        "/v1/keys",
        headers={**account.headers, "content-type": "application/json"},
        content=chunks(),
    )
    assert_error(response, 413, "request_too_large")


async def test_unknown_path_is_404_envelope(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.get("/v1/nothing-here"), 404, "not_found")
    assert "/v1/nothing-here" in str(error["message"])


async def test_wrong_method_is_405_envelope(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    assert_error(await client.put("/v1/wallet", headers=account.headers), 405, "method_not_allowed")


async def test_malformed_id_in_path_is_404(
    client: httpx.AsyncClient, account: AccountWithKeys
) -> None:
    assert_error(await client.get("/v1/keys/not-a-uuid", headers=account.headers), 404)


@pytest.fixture
def crashing_app(settings: Settings, services: AppServices) -> FastAPI:
    application = create_app(settings, services=services)

    @application.get("/v1/_crash")
    async def crash() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    return application


async def test_unexpected_error_is_500_envelope_without_stack_trace(
    crashing_app: FastAPI,
) -> None:
    transport = httpx.ASGITransport(app=crashing_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://aivax.test") as http:
        response = await http.get("/v1/_crash", headers={"x-request-id": "trace-500"})
    error = assert_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "secret internal detail" not in response.text
    assert "Traceback" not in response.text
    assert "trace-500" in str(error["message"])
