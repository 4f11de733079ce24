"""/v1/chat/completions and /v1/models through the official openai SDK against the live server,
with fake upstreams on loopback. Covers billing, errors, streaming and disconnects."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from aivax.models import HoldStatus, RequestLog, WalletHold
from aivax.services import AppServices
from aivax.wallet import service as wallet
from tests.conftest import FakeUpstream
from tests.fixtures.factories import AccountWithKeys, make_account, make_plan
from tests.fixtures.servers import ThreadedServer

HELLO = [{"role": "user", "content": "Say hello"}]


class CountingClient:
    """An openai SDK client whose HTTP requests are counted (to prove what it retried)."""

    def __init__(self, server: ThreadedServer, key: str, *, max_retries: int = 0) -> None:
        self.sent = 0

        async def count(_: httpx.Request) -> None:
            self.sent += 1

        self.http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=60)
        self.sdk = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=key, max_retries=max_retries, http_client=self.http
        )
        _OPEN.append(self)


@pytest.fixture
async def starter(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=1_000_000)


_OPEN: list[CountingClient] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().http.aclose()


def sdk(server: ThreadedServer, key: str, *, max_retries: int = 0) -> openai.AsyncOpenAI:
    return CountingClient(server, key, max_retries=max_retries).sdk


async def _balance(server: ThreadedServer, services: AppServices, account: AccountWithKeys) -> int:
    """The balance as GET /v1/wallet reports it once no call is in flight — reading the wallet
    closes the server's idle wallet lease, so every call is charged and nothing is held — and
    the same in the database, where the ledger must sum to it."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        read = (await http.get("/v1/wallet", headers=account.headers)).json()
    async with services.database.sessions() as session:
        report = await wallet.check_invariant(session, account.id)
    assert report.holds, report
    assert (read["balance_micros"], read["held_micros"]) == (report.cached_balance_micros, 0)
    return report.cached_balance_micros


async def _logs(services: AppServices, account_id: uuid.UUID) -> list[RequestLog]:
    async with services.database.sessions() as session:
        rows = await session.scalars(
            select(RequestLog).where(RequestLog.account_id == account_id).order_by(RequestLog.id)
        )
        return list(rows)


async def _wait_for_logs(
    services: AppServices, account_id: uuid.UUID, count: int
) -> list[RequestLog]:
    for _ in range(100):
        logs = await _logs(services, account_id)
        if len(logs) >= count:
            return logs
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} request log rows")


async def test_models_list_follows_plan_and_key_kind(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    starter_ids = {m.id for m in (await sdk(live_server, starter.private_key).models.list()).data}
    assert {"aivax/smollm2-135m", "test/fake-ok", "test/claude-plain"} <= starter_ids
    free = await make_account(services, plan="free")
    free_ids = {m.id for m in (await sdk(live_server, free.private_key).models.list()).data}
    assert "aivax/smollm2-135m" in free_ids
    assert all(model_id.startswith("aivax/") for model_id in free_ids)  # Free: aivax/* only
    public = (await sdk(live_server, starter.public_key).models.list()).data
    assert public == []
    one = await sdk(live_server, starter.private_key).models.retrieve("test/fake-ok")
    assert one.model_extra is not None
    assert one.model_extra["aivax"]["pricing"] == {
        "input_micros_per_m": 1_000_000,
        "output_micros_per_m": 2_000_000,
    }
    with pytest.raises(openai.NotFoundError):
        await sdk(live_server, free.private_key).models.retrieve("test/fake-ok")


async def test_non_streaming_call_bills_upstream_usage(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    client = sdk(live_server, starter.private_key)
    raw = await client.chat.completions.with_raw_response.create(
        model="test/fake-ok",
        messages=HELLO,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from fake"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 3)
    assert completion.model_extra is not None
    assert completion.model_extra["aivax"]["cost_micros"] == 11 * 1 + 3 * 2
    assert raw.headers["x-aivax-cost-micros"] == "17"
    assert raw.headers["x-ratelimit-limit-requests"] == "60"
    [log] = await _wait_for_logs(services, starter.id, 1)
    assert await _balance(live_server, services, starter) == 1_000_000 - 17
    assert (log.status, log.cost_micros, log.estimated, log.stream) == (200, 17, False, False)
    assert log.key_id == starter.private_key_id
    async with services.database.sessions() as session:
        open_holds = await session.scalar(
            select(func.count()).where(
                WalletHold.account_id == starter.id, WalletHold.status == HoldStatus.OPEN.value
            )
        )
    assert open_holds == 0


async def test_streaming_call_with_usage_chunk(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    stream = await sdk(live_server, starter.private_key).chat.completions.create(
        model="test/fake-ok",
        messages=HELLO,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    text, usage, extra = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage, extra = chunk.usage, chunk.model_extra
    assert text == "Hello from fake"
    assert usage is not None
    assert usage.total_tokens == 14
    assert extra is not None
    assert extra["aivax"]["cost_micros"] == 17
    await _wait_for_logs(services, starter.id, 1)
    assert await _balance(live_server, services, starter) == 1_000_000 - 17


async def test_streaming_without_usage_request_is_still_billed(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    stream = await sdk(live_server, starter.private_key).chat.completions.create(
        model="test/fake-ok",
        messages=HELLO,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    [log] = await _wait_for_logs(services, starter.id, 1)
    assert (log.cost_micros, log.output_tokens, log.stream) == (17, 3, True)


async def test_missing_upstream_usage_is_counted_locally_and_marked(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    completion = await sdk(live_server, starter.private_key).chat.completions.create(
        model="test/fake-no-usage",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3  # "Hello from fake" in cl100k
    assert completion.usage.prompt_tokens > 0
    assert completion.model_extra is not None
    assert completion.model_extra["aivax"]["usage_estimated"] is True
    [log] = await _wait_for_logs(services, starter.id, 1)
    assert log.estimated is True
    assert log.cost_micros is not None
    assert log.cost_micros > 0


async def test_client_tools_pass_through_and_tool_calls_come_back(
    live_server: ThreadedServer, starter: AccountWithKeys, fake_openai: FakeUpstream
) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    client = sdk(live_server, starter.private_key)
    completion = await client.chat.completions.create(
        model="test/fake-tools",
        messages=HELLO,
        tools=tools,
        tool_choice="auto",  # type: ignore[arg-type]
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert fake_openai.recorder.last()["tools"] == tools
    stream = await client.chat.completions.create(
        model="test/fake-tools",
        messages=HELLO,
        tools=tools,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [
        c.choices[0].delta.tool_calls
        async for c in stream
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert "".join(p[0].function.arguments or "" for p in pieces) == '{"city": "Paris"}'  # type: ignore[union-attr]


async def test_anthropic_model_through_the_api(
    live_server: ThreadedServer, starter: AccountWithKeys
) -> None:
    completion = await sdk(live_server, starter.private_key).chat.completions.create(
        model="test/claude-thinking",
        messages=HELLO,  # type: ignore[arg-type]
    )
    message = completion.choices[0].message
    assert message.content == "Bonjour !"
    assert message.model_extra is not None
    assert message.model_extra["reasoning_content"] == "Let me think."
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 27
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 5


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}]},
            "messages.0.content",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{not json"},
                            }
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0",
        ),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
        ({"temperature": 7}, "temperature"),
        ({"max_tokens": 5000}, "max_tokens"),
    ],
)
async def test_bad_input_is_400_naming_the_parameter(
    live_server: ThreadedServer, starter: AccountWithKeys, kwargs: dict[str, Any], param: str
) -> None:
    arguments: dict[str, Any] = {"model": "test/fake-ok", "messages": HELLO, **kwargs}
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(live_server, starter.private_key).chat.completions.create(**arguments)
    body: Any = raised.value.body
    assert str(body["param"]).startswith(param), body


async def test_text_only_model_refuses_images(
    live_server: ThreadedServer, starter: AccountWithKeys
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(live_server, starter.private_key).chat.completions.create(
            model="aivax/smollm2-135m",
            messages=[
                {
                    "role": "user",
                    "content": [  # type: ignore[list-item]
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
                    ],
                }
            ],
        )
    assert raised.value.code == "unsupported_content"


async def test_auth_plan_and_model_errors_map_to_sdk_exceptions(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    with pytest.raises(openai.AuthenticationError):
        await sdk(live_server, "aivax_sk_" + "x" * 38).chat.completions.create(
            model="test/fake-ok",
            messages=HELLO,  # type: ignore[arg-type]
        )
    free = await make_account(services, plan="free", balance_micros=1_000_000)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk(live_server, free.private_key).chat.completions.create(
            model="test/fake-ok",
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(live_server, starter.public_key).chat.completions.create(
            model="test/fake-ok",
            messages=HELLO,  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk(live_server, starter.private_key).chat.completions.create(
            model="nope/none",
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert missing.value.code == "model_not_found"


async def test_wallet_402_and_rate_limit_429_are_not_retried_by_the_sdk(
    live_server: ThreadedServer, services: AppServices, fake_models: list[str]
) -> None:
    broke = await make_account(services, plan="starter", balance_micros=0)
    client = CountingClient(live_server, broke.private_key, max_retries=3)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.sdk.chat.completions.create(model="test/fake-ok", messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.status_code == 402
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert client.sent == 1
    plan = await make_plan(services, integrated_rpm=1)
    limited = await make_account(services, plan=plan, balance_micros=1_000_000)
    client = CountingClient(live_server, limited.private_key, max_retries=3)
    await client.sdk.chat.completions.create(model="test/fake-ok", messages=HELLO)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as limited_error:
        await client.sdk.chat.completions.create(model="test/fake-ok", messages=HELLO)  # type: ignore[arg-type]
    headers = limited_error.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert client.sent == 2


async def test_input_token_rate_limit(
    live_server: ThreadedServer, services: AppServices, fake_models: list[str]
) -> None:
    plan = await make_plan(services, integrated_input_tpm=150)
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    client = sdk(live_server, account.private_key)
    prompt = [{"role": "user", "content": "word " * 100}]  # about 106 input tokens
    await client.chat.completions.create(model="test/fake-ok", messages=prompt)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="test/fake-ok", messages=prompt)  # type: ignore[arg-type]
    assert raised.value.code == "rate_limit_tokens"
    assert raised.value.response.headers["x-ratelimit-limit-tokens"] == "150"


async def test_free_plan_context_cap(
    live_server: ThreadedServer, services: AppServices, fake_models: list[str]
) -> None:
    plan = await make_plan(services, context_cap_tokens=50)
    account = await make_account(services, plan=plan, balance_micros=1_000_000)
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(live_server, account.private_key).chat.completions.create(
            model="test/fake-ok",
            messages=long,  # type: ignore[arg-type]
        )
    assert raised.value.code == "context_length_exceeded"
    assert "at most 50" in raised.value.message


async def test_upstream_failure_before_first_byte_bills_nothing(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    client = sdk(live_server, starter.private_key)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(
                model="test/fake-500",
                messages=HELLO,
                stream=stream,  # type: ignore[call-overload]
            )
        assert raised.value.status_code == 502
    logs = await _wait_for_logs(services, starter.id, 2)
    assert await _balance(live_server, services, starter) == 1_000_000
    assert [(log.status, log.cost_micros) for log in logs] == [(502, 0), (502, 0)]


async def test_failure_after_first_byte_is_an_sse_error_event(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    stream = await sdk(live_server, starter.private_key).chat.completions.create(
        model="test/fake-midstream-error",
        messages=HELLO,
        stream=True,  # type: ignore[arg-type]
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        await _drain(stream, received)
    assert "".join(received) == "Hello"
    assert "upstream exploded" in str(raised.value)
    [log] = await _wait_for_logs(services, starter.id, 1)
    assert log.status == 502
    assert log.estimated is True
    assert log.output_tokens >= 1  # what was generated is billed
    assert await _balance(live_server, services, starter) == 1_000_000 - (log.cost_micros or 0)


async def test_client_disconnect_mid_stream_settles_what_was_generated(
    live_server: ThreadedServer, services: AppServices, starter: AccountWithKeys
) -> None:
    async with (
        httpx.AsyncClient(base_url=live_server.url, timeout=30) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            headers=starter.headers,
            json={"model": "test/fake-slow", "messages": HELLO, "stream": True},
        ) as response,
    ):
        lines: AsyncIterator[str] = response.aiter_lines()
        seen = [line async for line in _first(lines, 3)]
    assert any('"Hello"' in line for line in seen)
    [log] = await _wait_for_logs(services, starter.id, 1)
    assert log.status == 499
    assert await _balance(live_server, services, starter) == 1_000_000 - (log.cost_micros or 0)
    async with services.database.sessions() as session:
        open_holds = await session.scalar(
            select(func.count()).where(
                WalletHold.account_id == starter.id, WalletHold.status == HoldStatus.OPEN.value
            )
        )
    assert open_holds == 0


async def _drain(stream: Any, received: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices:
            received.append(chunk.choices[0].delta.content or "")


async def _first(lines: AsyncIterator[str], count: int) -> AsyncIterator[str]:
    async for line in lines:
        if line.startswith("data:"):
            yield line
            count -= 1
            if count == 0:
                return


async def test_max_tokens_is_clamped_to_what_the_balance_affords(
    live_server: ThreadedServer,
    services: AppServices,
    fake_openai: FakeUpstream,
    fake_models: list[str],
) -> None:
    plan = await make_plan(services)
    account = await make_account(services, plan=plan, balance_micros=500)
    raw = await sdk(live_server, account.private_key).chat.completions.with_raw_response.create(
        model="test/fake-ok",
        messages=HELLO,
        user="clamp",  # type: ignore[arg-type]
    )
    header = raw.headers["x-aivax-max-tokens-clamped"]
    requested, clamped = (int(part) for part in header.split("->"))
    assert clamped < requested
    sent = next(r for r in reversed(fake_openai.recorder.requests) if r.get("user") == "clamp")
    assert sent["max_tokens"] == clamped
    completion = raw.parse()
    assert completion.model_extra is not None
    assert completion.model_extra["aivax"]["max_tokens"] == clamped


async def test_40_parallel_requests_against_a_balance_for_10(
    live_server: ThreadedServer, services: AppServices, fake_models: list[str]
) -> None:
    plan = await make_plan(services)
    probe = await make_account(services, plan=plan, balance_micros=1_000_000)
    client = sdk(live_server, probe.private_key)
    await client.chat.completions.create(model="test/fake-slow", messages=HELLO, max_tokens=100)  # type: ignore[arg-type]
    # One call's worst case (what it holds): its input and 100 output tokens at the model's prices.
    [probe_log] = await _wait_for_logs(services, probe.id, 1)
    listed = await client.models.retrieve("test/fake-slow")
    assert listed.model_extra is not None
    pricing = listed.model_extra["aivax"]["pricing"]
    hold = -(
        -(
            probe_log.input_tokens * pricing["input_micros_per_m"]
            + 100 * pricing["output_micros_per_m"]
        )
        // 1_000_000
    )  # rounded up, as prices are
    account = await make_account(services, plan=plan, balance_micros=hold * 10)
    client = sdk(live_server, account.private_key)

    async def one() -> int:
        try:
            await client.chat.completions.create(
                model="test/fake-slow",
                messages=HELLO,
                max_tokens=100,  # type: ignore[arg-type]
            )
        except openai.APIStatusError as exc:
            return exc.status_code
        return 200

    statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert set(statuses) <= {200, 402}
    assert statuses.count(200) >= 10
    # How many get a 402 depends on timing: each finished call returns most of what it held,
    # and a call that arrives then is served with max_tokens clamped to what is left (and
    # charged at most what it held).
    logs = await _wait_for_logs(services, account.id, statuses.count(200))
    assert all(log.status == 200 and 0 < (log.cost_micros or 0) <= 17 for log in logs)
    balance = await _balance(live_server, services, account)  # also checks ledger sum == balance
    assert balance >= 0  # never more served than the money pays for
    assert balance == hold * 10 - sum(log.cost_micros or 0 for log in logs)
