"""The call kernel called directly, with no HTTP: a caller that stands in for a batch item is
billed and logged like an API call, streamed or not; the tool loop runs a server-side tool
and bills each step; hooks and augmenters registered on the kernel see the call."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from aivax.inference.caller import Caller
from aivax.inference.events import CallDone, CallResult, Finished, ToolActivity
from aivax.inference.extensions import (
    Augmentation,
    CallView,
    ToolCall,
    ToolDefinition,
    ToolResult,
)
from aivax.inference.schemas import ChatCompletionRequest, SystemMessage
from aivax.inference.service import run_call, stream_call
from aivax.models import RequestLog
from aivax.providers.base import TextDelta, ToolCallDelta
from aivax.services import AppServices
from aivax.wallet import service as wallet
from tests.conftest import FakeUpstream
from tests.fixtures.factories import AccountWithKeys, make_account, principal_of

BALANCE = 1_000_000


@pytest.fixture
async def account(services: AppServices, fake_models: list[str]) -> AccountWithKeys:
    return await make_account(services, plan="starter", balance_micros=BALANCE)


async def _batch_item(services: AppServices, account: AccountWithKeys) -> Caller:
    principal = await principal_of(services, account.private_key)
    request_id = f"req_{uuid.uuid4().hex}"
    return Caller("batch_item", principal, request_id, ids={"batch": "b1", "item": "7"})


def _request(model: str, *, stream: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "stream": stream,
        }
    )


async def _rows(services: AppServices, request_id: str) -> list[RequestLog]:
    await services.meter.drain()
    async with services.database.sessions() as session:
        rows = await session.scalars(
            select(RequestLog).where(RequestLog.request_id == request_id).order_by(RequestLog.step)
        )
        return list(rows)


async def _spent(services: AppServices, account: AccountWithKeys) -> int:
    await services.meter.flush(account.id)
    async with services.database.sessions() as session:
        summary = await wallet.summary(session, account.id)
    assert summary.held_micros == 0
    return BALANCE - summary.balance_micros


async def test_a_batch_item_call_is_billed_and_logged_like_an_api_call(
    services: AppServices, account: AccountWithKeys
) -> None:
    caller = await _batch_item(services, account)
    result = await run_call(services.kernel, _request("test/fake-ok"), caller)
    assert isinstance(result, CallResult)
    assert (result.content, result.finish_reason) == ("Hello from fake", "stop")
    assert (result.usage.input_tokens, result.usage.output_tokens) == (11, 3)
    assert result.cost_micros == 11 + 2 * 3 == result.total_cost_micros
    rows = await _rows(services, caller.request_id)
    assert [(r.step, r.status, r.cost_micros, r.stream) for r in rows] == [(1, 200, 17, False)]
    assert rows[0].key_id == caller.principal.key_id
    assert await _spent(services, account) == 17


async def test_a_streamed_batch_item_call_yields_typed_events_and_settles(
    services: AppServices, account: AccountWithKeys
) -> None:
    caller = await _batch_item(services, account)
    stream = await stream_call(services.kernel, _request("test/fake-ok", stream=True), caller)
    events = [event async for event in stream]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from fake"
    assert [type(e) for e in events[-2:]] == [Finished, CallDone]
    done = events[-1]
    assert isinstance(done, CallDone)
    assert done.result.cost_micros == 17
    rows = await _rows(services, caller.request_id)
    assert [(r.step, r.status, r.cost_micros, r.stream) for r in rows] == [(1, 200, 17, True)]
    assert await _spent(services, account) == 17


class WeatherTools:
    """A server-side tool provider for the tool loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ToolCall]] = []

    async def list_tools(self, call: CallView) -> list[ToolDefinition]:
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
        return [ToolDefinition("get_weather", "The weather in a city.", parameters)]

    async def execute(self, call: CallView, tool_call: ToolCall) -> ToolResult:
        self.calls.append((call.caller.kind, tool_call))
        return ToolResult("Sunny, 24 C")


@pytest.fixture
async def weather(services: AppServices) -> AsyncIterator[WeatherTools]:
    provider = WeatherTools()
    services.kernel.extensions.tools.append(provider)
    try:
        yield provider
    finally:
        services.kernel.extensions.tools.remove(provider)


def _tool_exchange(fake_openai: FakeUpstream, request_id: str) -> list[dict[str, Any]]:
    """The messages of the model request that followed the tool call."""
    last = fake_openai.recorder.last()
    assert last["model"] == "fake-tool-loop"
    assert any(t["function"]["name"] == "get_weather" for t in last["tools"])
    return list(last["messages"][-2:])


async def test_the_tool_loop_runs_a_server_side_tool_and_bills_each_step(
    services: AppServices,
    account: AccountWithKeys,
    weather: WeatherTools,
    fake_openai: FakeUpstream,
) -> None:
    caller = await _batch_item(services, account)
    result = await run_call(services.kernel, _request("test/fake-tool-loop"), caller)
    assert [(kind, c.name, c.arguments) for kind, c in weather.calls] == [
        ("batch_item", "get_weather", '{"city": "Paris"}')
    ]
    assistant, tool = _tool_exchange(fake_openai, caller.request_id)
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert (tool["role"], tool["tool_call_id"], tool["content"]) == (
        "tool",
        "call_1",
        "Sunny, 24 C",
    )
    assert (result.content, result.tool_calls, result.steps) == ("Hello from fake", [], 2)
    assert [a.result.content for a in result.tool_activity] == ["Sunny, 24 C"]
    rows = await _rows(services, caller.request_id)
    assert [(r.step, r.status) for r in rows] == [(1, 200), (2, 200)]
    assert all(r.cost_micros for r in rows)
    assert result.cost_micros == sum(r.cost_micros or 0 for r in rows)
    assert result.usage.input_tokens == 22  # both steps
    assert await _spent(services, account) == result.cost_micros


async def test_a_streamed_tool_loop_shows_tool_activity_not_the_server_side_call(
    services: AppServices, account: AccountWithKeys, weather: WeatherTools
) -> None:
    caller = await _batch_item(services, account)
    request = _request("test/fake-tool-loop", stream=True)
    events = [event async for event in await stream_call(services.kernel, request, caller)]
    assert not any(isinstance(e, ToolCallDelta) for e in events)
    activity = [e for e in events if isinstance(e, ToolActivity)]
    assert [(a.step, a.call.name, a.result.content) for a in activity] == [
        (1, "get_weather", "Sunny, 24 C")
    ]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from fake"
    done = events[-1]
    assert isinstance(done, CallDone)
    rows = await _rows(services, caller.request_id)
    assert [(r.step, r.status) for r in rows] == [(1, 200), (2, 200)]
    assert done.result.cost_micros == sum(r.cost_micros or 0 for r in rows)
    assert await _spent(services, account) == done.result.cost_micros


async def test_without_server_side_tools_a_tool_call_goes_back_to_the_caller(
    services: AppServices, account: AccountWithKeys
) -> None:
    caller = await _batch_item(services, account)
    result = await run_call(services.kernel, _request("test/fake-tool-loop"), caller)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert result.finish_reason == "tool_calls"
    assert [r.step for r in await _rows(services, caller.request_id)] == [1]


class Recording:
    """A hook and an augmenter that remember what they saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.results: list[CallResult] = []

    async def request(self, call: CallView) -> None:
        self.seen.append(("request", call.caller.kind, call.model.id))

    async def response(self, call: CallView, result: CallResult) -> None:
        self.results.append(result)

    async def augment(self, call: CallView) -> Augmentation | None:
        self.seen.append(("augment", call.caller.kind, call.model.id))
        note = SystemMessage(role="system", content="Remembered: the user likes rain.")
        return Augmentation(
            call.request.model_copy(update={"messages": [note, *call.request.messages]})
        )


async def test_a_registered_hook_and_augmenter_see_an_api_call(
    services: AppServices,
    client: httpx.AsyncClient,
    account: AccountWithKeys,
    fake_openai: FakeUpstream,
) -> None:
    recording = Recording()
    extensions = services.kernel.extensions
    extensions.hooks.append(recording)
    extensions.augmenters.append(recording)
    try:
        response = await client.post(
            "/v1/chat/completions",
            headers=account.headers,
            json={"model": "test/fake-ok", "messages": [{"role": "user", "content": "hi"}]},
        )
    finally:
        extensions.hooks.remove(recording)
        extensions.augmenters.remove(recording)
    assert response.status_code == 200, response.text
    assert recording.seen == [
        ("augment", "api_key", "test/fake-ok"),
        ("request", "api_key", "test/fake-ok"),
    ]
    assert [r.request_id for r in recording.results] == [response.headers["x-request-id"]]
    assert recording.results[0].cost_micros == response.json()["aivax"]["cost_micros"]
    sent = fake_openai.recorder.last()["messages"]
    assert sent[0] == {"role": "system", "content": "Remembered: the user likes rain."}
