"""Provider adapters against fake upstreams on loopback: SSE robustness, retries, errors,
and the Anthropic translation both ways."""

from __future__ import annotations

import codecs
import json
import socket
import uuid
from typing import Any

import httpx
import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from aivax.providers.anthropic import AnthropicProvider, translate_request
from aivax.providers.base import (
    FinishEvent,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageEvent,
)
from aivax.providers.http import EventStreamDecoder, HttpxUpstream, UpstreamHTTP
from aivax.providers.http1 import Http1Upstream
from aivax.providers.openai_compat import OpenAICompatProvider
from tests.conftest import FakeUpstream


def _request(model: str, **body: Any) -> UpstreamRequest:
    return UpstreamRequest(
        upstream_model=model,
        body={"messages": [{"role": "user", "content": "hi"}], **body},
        max_tokens=50,
        timeout_seconds=10,
    )


async def _collect(provider: Any, request: UpstreamRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


@pytest.fixture(params=["httpx", "http1"])
async def http(request: pytest.FixtureRequest) -> Any:
    """Every adapter test runs on both clients the registry uses: httpx (account-supplied URLs,
    behind the SSRF guard) and `Http1Upstream` (operator upstreams)."""
    if request.param == "http1":
        upstream: UpstreamHTTP = Http1Upstream(connect_timeout=5)
    else:
        upstream = HttpxUpstream(httpx.AsyncClient())
    yield upstream
    await upstream.aclose()


def _openai(
    http: UpstreamHTTP, fake: FakeUpstream, key: str = "sk-fake-upstream", retries: int = 2
) -> OpenAICompatProvider:
    return OpenAICompatProvider(http, base_url=fake.base_url, api_key=key, retries=retries)


async def _drain(stream: Any, seen: list[StreamEvent]) -> None:
    async for event in stream:
        seen.append(event)


def _text(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_openai_stream_yields_text_finish_and_usage(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    events = await _collect(_openai(http, fake_openai), _request("fake-ok", user="u1"))
    assert _text(events) == "Hello from fake"
    assert FinishEvent("stop") in events
    assert UsageEvent(input_tokens=11, output_tokens=3) in events
    sent = fake_openai.recorder.last()
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_openai_sse_comments_keepalives_multiline_and_missing_done(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    events = await _collect(_openai(http, fake_openai), _request("fake-noisy"))
    assert _text(events) == "Hello from fake"
    assert any(isinstance(e, UsageEvent) for e in events)


async def test_openai_json_answer_to_a_stream_request_is_accepted(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    events = await _collect(_openai(http, fake_openai), _request("fake-json"))
    assert _text(events) == "Hello from fake"
    assert FinishEvent("stop") in events


async def test_openai_tool_call_pieces_arrive_in_order(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    events = await _collect(_openai(http, fake_openai), _request("fake-tools"))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0].id == "call_1"
    assert calls[0].name == "get_weather"
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert FinishEvent("tool_calls") in events


async def test_openai_retries_429_before_first_byte(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    user = f"retry-{uuid.uuid4()}"
    events = await _collect(_openai(http, fake_openai), _request("fake-flaky", user=user))
    assert _text(events) == "Hello from fake"
    assert fake_openai.recorder.attempts[f"fake-flaky:{user}"] == 2


async def test_openai_5xx_after_retries_keeps_status_and_body(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    before = len(fake_openai.recorder.requests)
    with pytest.raises(UpstreamError) as raised:
        await _collect(_openai(http, fake_openai, retries=1), _request("fake-500"))
    assert raised.value.status == 500
    assert raised.value.message == "boom"
    assert '"boom"' in raised.value.body
    assert len(fake_openai.recorder.requests) - before == 2


async def test_openai_abrupt_disconnect_is_an_upstream_error(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    seen: list[StreamEvent] = []
    with pytest.raises(UpstreamError) as raised:
        await _drain(_openai(http, fake_openai).stream(_request("fake-disconnect")), seen)
    assert raised.value.code == "upstream_disconnected"
    assert _text(seen) == "Hello from"


async def test_openai_error_event_mid_stream(http: UpstreamHTTP, fake_openai: FakeUpstream) -> None:
    with pytest.raises(UpstreamError) as raised:
        await _collect(_openai(http, fake_openai), _request("fake-midstream-error"))
    assert "upstream exploded" in raised.value.message


async def test_openai_bad_credential_is_401_not_retried(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    before = len(fake_openai.recorder.requests)
    with pytest.raises(UpstreamError) as raised:
        await _collect(_openai(http, fake_openai, key="sk-wrong"), _request("fake-ok"))
    assert raised.value.status == 401
    assert len(fake_openai.recorder.requests) - before == 1


async def test_connection_refused_is_502_after_retries(http: UpstreamHTTP) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAICompatProvider(
        http, base_url=f"http://127.0.0.1:{port}/v1", api_key="k", retries=1
    )
    with pytest.raises(UpstreamError) as raised:
        await _collect(provider, _request("x"))
    assert raised.value.status == 502
    assert raised.value.code == "upstream_unreachable"


def test_anthropic_request_translation() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "x"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_9", "content": "42"},
            {"role": "tool", "tool_call_id": "call_9", "content": "43"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Look up",
                    "parameters": {"type": "object"},
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 0.2,
        "user": "user-7",
    }
    payload = translate_request(UpstreamRequest("claude-x", body, max_tokens=300))
    assert payload["system"] == "Be brief.\n\nUse French."
    assert payload["messages"][0]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
    }
    assert payload["messages"][1]["content"][0]["type"] == "tool_use"
    assert payload["messages"][1]["content"][0]["input"] == {"q": "x"}
    results = payload["messages"][2]["content"]
    assert [r["content"] for r in results] == ["42", "43"]  # merged into one user turn
    assert payload["tools"][0]["input_schema"] == {"type": "object"}
    assert payload["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert payload["stop_sequences"] == ["END"]
    assert payload["metadata"] == {"user_id": "user-7"}
    assert payload["max_tokens"] == 300


def test_anthropic_reasoning_effort_becomes_thinking_budget() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "reasoning_effort": "low",
        "temperature": 0.5,
    }
    payload = translate_request(UpstreamRequest("claude-x", body, max_tokens=4000))
    assert payload["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert "temperature" not in payload


async def test_anthropic_stream_translates_text_thinking_tools_and_usage(
    http: UpstreamHTTP, fake_anthropic: FakeUpstream
) -> None:
    provider = AnthropicProvider(http, base_url=fake_anthropic.server.url, api_key="sk-ant-fake")
    thinking = await _collect(provider, _request("claude-thinking"))
    assert ReasoningDelta("Let me think.") in thinking
    assert _text(thinking) == "Bonjour !"
    usage = next(e for e in thinking if isinstance(e, UsageEvent))
    assert usage == UsageEvent(
        input_tokens=27, output_tokens=7, cached_input_tokens=5, cache_write_tokens=2
    )
    assert FinishEvent("stop") in thinking
    tools = await _collect(provider, _request("claude-tools"))
    calls = [e for e in tools if isinstance(e, ToolCallDelta)]
    assert calls[0].index == 0
    assert calls[0].id == "toolu_1"
    assert "".join(c.arguments for c in calls) == '{"city": "Lyon"}'
    assert FinishEvent("tool_calls") in tools
    sent = fake_anthropic.recorder.last()
    assert sent["stream"] is True
    assert fake_anthropic.recorder.headers[-1]["anthropic-version"] == "2023-06-01"


async def test_anthropic_error_event_and_bad_key(
    http: UpstreamHTTP, fake_anthropic: FakeUpstream
) -> None:
    provider = AnthropicProvider(http, base_url=fake_anthropic.server.url, api_key="sk-ant-fake")
    with pytest.raises(UpstreamError) as overloaded:
        await _collect(provider, _request("claude-overloaded"))
    assert overloaded.value.status == 529
    wrong = AnthropicProvider(http, base_url=fake_anthropic.server.url, api_key="nope")
    with pytest.raises(UpstreamError) as refused:
        await _collect(wrong, _request("claude-plain"))
    assert refused.value.status == 401
    assert refused.value.message == "invalid x-api-key"


def _events_of(*parts: bytes) -> list[tuple[str, str]]:
    decoder = EventStreamDecoder()
    return [event for part in parts for event in decoder.feed(part)] + decoder.end()


def _reference_events(*parts: bytes) -> list[tuple[str, str]]:
    """httpx-sse's decoders alone, on the same chunks."""
    text = codecs.getincrementaldecoder("utf-8")("replace")
    lines, decoder = SSELineDecoder(), SSEDecoder()
    found = [decoder.decode(line) for part in parts for line in lines.decode(text.decode(part))]
    tail = text.decode(b"", final=True)
    found += [decoder.decode(line) for line in [*lines.decode(tail), *lines.flush(), ""]]
    return [(event.event, event.data) for event in found if event is not None]


OPENAI_STREAM = (
    b"".join(
        b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for chunk in [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": "Olá, "}}]},
            {"choices": [{"index": 0, "delta": {"content": "mundo"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        ]
    )
    + b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type": "message_start"}\n\n'
    b"event: ping\ndata: {}\n\n"
    b'event: content_block_delta\ndata: {"delta": {"text": "\xc3\xa9"}}\n\n'
)


@pytest.mark.parametrize(
    "parts",
    [
        [OPENAI_STREAM],
        [ANTHROPIC_STREAM],
        [OPENAI_STREAM[:40], OPENAI_STREAM[40:]],  # an event split across chunks
        [OPENAI_STREAM, b": keep-alive\n\n", OPENAI_STREAM],  # a comment mid-stream
        [b"data: a\n\n", b"data:b\n\n", b"data: c\n\n"],  # no space after the colon
        [b"data: a\n\n", b"id: 7\ndata: b\n\n", b"data: c\n\n"],  # an id is kept after
        [b"event: \ndata: a\n\n"],  # an empty event name is a message
        [b"data: a\r\n\r\n", b"data: b\n\n"],
        [b"data: \xff\n\n", b"data: b\n\n"],  # invalid UTF-8
        [b"data: a\ndata: b\n\n"],  # two data lines
        [b"data: a\n\n\ndata: b\n\n"],  # an extra blank line
        [b"data: a\n\n", b"data: last"],  # no closing blank line
        [b"retry: 10\n\n", b"data: a\n\n"],
    ],
)
def test_sse_chunks_split_directly_give_the_same_events_as_the_library(
    parts: list[bytes],
) -> None:
    assert _events_of(*parts) == _reference_events(*parts)
    every_byte = [whole[i : i + 1] for whole in [b"".join(parts)] for i in range(len(whole))]
    assert _events_of(*every_byte) == _reference_events(*parts)


def test_sse_parser_handles_any_split_line_ends_comments_and_multiline_data() -> None:
    whole = 'data: {"a": "é"}\r\n\r\n: ping\n\nevent: x\ndata: one\ndata: two\r\r'.encode()
    expected = [("message", '{"a": "é"}'), ("x", "one\ntwo")]
    assert _events_of(whole) == expected
    # Split at every byte: inside the UTF-8 of "é", between \r and \n, inside field names.
    assert _events_of(*(whole[i : i + 1] for i in range(len(whole)))) == expected


def test_sse_parser_delivers_a_last_event_without_its_blank_line() -> None:
    assert _events_of(b"data: first\n\ndata: last") == [
        ("message", "first"),
        ("message", "last"),
    ]
    assert _events_of(b"data: last\n") == [("message", "last")]
    assert _events_of(b": only a comment\n") == []


async def test_openai_read_timeout_is_504(http: UpstreamHTTP, fake_openai: FakeUpstream) -> None:
    request = UpstreamRequest(
        upstream_model="fake-hang",
        body={"messages": [{"role": "user", "content": "hi"}]},
        max_tokens=5,
        timeout_seconds=0.3,
    )
    with pytest.raises(UpstreamError) as raised:
        await _collect(_openai(http, fake_openai, retries=0), request)
    assert (raised.value.status, raised.value.code) == (504, "upstream_timeout")


async def test_upstream_cookies_are_never_sent_back(fake_openai: FakeUpstream) -> None:
    """One client serves every account: a cookie an upstream sets for one call must not ride
    along with the next (on both clients the registry builds)."""
    from aivax.config import Settings
    from aivax.providers.registry import ProviderRegistry

    registry = ProviderRegistry(Settings(ssrf_allowlist=["localhost"]))
    # A host name, not an IP: clients refuse cookies from IP addresses anyway.
    base_url = fake_openai.base_url.replace("127.0.0.1", "localhost")
    try:
        for guarded in (False, True):
            http = registry.upstream(base_url, guarded=guarded)
            provider = OpenAICompatProvider(http, base_url=base_url, api_key="sk-fake-upstream")
            for _ in range(2):
                await _collect(provider, _request("fake-ok"))
                assert "cookie" not in fake_openai.recorder.headers[-1]
    finally:
        await registry.close()


async def test_a_compressed_answer_is_decoded(
    http: UpstreamHTTP, fake_openai: FakeUpstream
) -> None:
    request = UpstreamRequest(
        upstream_model="fake-gzip",
        body={"messages": [{"role": "user", "content": "hi"}]},
        max_tokens=5,
        stream=False,
    )
    events = await _collect(_openai(http, fake_openai), request)
    assert _text(events) == "Hello from fake"
    assert UsageEvent(input_tokens=11, output_tokens=3) in events
