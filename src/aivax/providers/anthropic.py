"""Anthropic Messages API, translated to and from the OpenAI chat shapes.

Request: system/developer messages become `system`; images become image blocks (base64 data
URLs or https URLs); PDFs sent as `file` parts become document blocks; assistant `tool_calls`
become `tool_use` blocks and `tool` messages become `tool_result` blocks (consecutive ones merged
into one user turn, as Anthropic requires alternating roles); `reasoning_effort` becomes a
thinking budget. Response: text, `thinking` (→ `reasoning_content`), `tool_use` (→ tool call
deltas), stop reasons and usage including cache reads and writes.
Wire format: https://docs.anthropic.com/en/api/messages and …/messages-streaming.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aivax.providers.base import (
    TRANSPORT_ERRORS,
    FinishEvent,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageEvent,
    transport_failure,
)
from aivax.providers.http import UpstreamHTTP, sse_batches
from aivax.providers.openai_compat import status_error

ANTHROPIC_VERSION = "2023-06-01"
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
THINKING_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


class TranslationError(ValueError):
    """The request cannot be expressed for Anthropic; the message names the part."""


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";")[0] or "image/png"
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]] | str:
    if isinstance(content, str):
        return content
    blocks: list[dict[str, Any]] = []
    for part in content:
        match part.get("type"):
            case "text":
                blocks.append({"type": "text", "text": part["text"]})
            case "image_url":
                blocks.append(_image_block(part["image_url"]["url"]))
            case "file":
                data = (part.get("file") or {}).get("file_data", "")
                _, _, payload = data.partition(",")
                blocks.append(
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": payload or data,
                        },
                    }
                )
            case other:
                raise TranslationError(f"content part type {other!r} is not supported by Anthropic")
    return blocks


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _text_of(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": function["name"],
                "input": json.loads(function.get("arguments") or "{}"),
            }
        )
    return blocks


def _as_blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _append(turns: list[dict[str, Any]], role: str, content: Any) -> None:
    """Anthropic needs alternating roles: merge a turn into the previous one of the same role."""
    if turns and turns[-1]["role"] == role:
        previous = turns[-1]["content"]
        turns[-1]["content"] = _as_blocks(previous) + _as_blocks(content)
    else:
        turns.append({"role": role, "content": content})


def translate_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        match message["role"]:
            case "system" | "developer":
                system.append(_text_of(message.get("content")))
            case "user":
                _append(turns, "user", _user_blocks(message.get("content") or ""))
            case "assistant":
                blocks = _assistant_blocks(message)
                if blocks:
                    _append(turns, "assistant", blocks)
            case "tool":
                _append(
                    turns,
                    "user",
                    [
                        {
                            "type": "tool_result",
                            "tool_use_id": message["tool_call_id"],
                            "content": _text_of(message.get("content")),
                        }
                    ],
                )
    return "\n\n".join(part for part in system if part), turns


def _tool_choice(choice: Any, parallel: bool | None) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None if parallel is not False else {"type": "auto"}
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        result = {"type": "none"}
    else:
        result = {"type": "tool", "name": choice["function"]["name"]}
    if result is not None and parallel is False and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


def translate_request(request: UpstreamRequest) -> dict[str, Any]:
    body = request.body
    system, turns = translate_messages(body["messages"])
    payload: dict[str, Any] = {
        "model": request.upstream_model,
        "max_tokens": request.max_tokens,
        "messages": turns,
        "stream": True,
    }
    if system:
        payload["system"] = system
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            payload[name] = body[name]
    stop = body.get("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("tools"):
        payload["tools"] = [
            {
                "name": tool["function"]["name"],
                "description": tool["function"].get("description", ""),
                "input_schema": tool["function"].get("parameters") or {"type": "object"},
            }
            for tool in body["tools"]
        ]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and body.get("tools"):
        payload["tool_choice"] = choice
    if body.get("user"):
        payload["metadata"] = {"user_id": body["user"]}
    effort = body.get("reasoning_effort")
    if effort in THINKING_BUDGETS:
        budget = min(THINKING_BUDGETS[effort], max(request.max_tokens - 1, 1024))
        payload["thinking"] = {"type": "enabled", "budget_tokens": budget}
        payload["max_tokens"] = max(request.max_tokens, budget + 1)
        payload.pop("temperature", None)  # Anthropic requires the default with thinking
        payload.pop("top_p", None)
    return payload


class _StreamState:
    """Maps Anthropic content-block indexes to OpenAI tool-call indexes and collects usage."""

    def __init__(self) -> None:
        self.tool_index: dict[int, int] = {}
        self.input_tokens = 0
        self.cache_read = 0
        self.cache_write = 0
        self.output_tokens = 0

    def usage(self) -> UsageEvent:
        return UsageEvent(
            input_tokens=self.input_tokens + self.cache_read + self.cache_write,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cache_read,
            cache_write_tokens=self.cache_write,
        )

    def record_usage(self, usage: dict[str, Any]) -> None:
        self.input_tokens = int(usage.get("input_tokens") or self.input_tokens)
        self.cache_read = int(usage.get("cache_read_input_tokens") or self.cache_read)
        self.cache_write = int(usage.get("cache_creation_input_tokens") or self.cache_write)
        self.output_tokens = int(usage.get("output_tokens") or self.output_tokens)

    def events(self, kind: str, data: dict[str, Any]) -> list[StreamEvent]:  # noqa: C901
        match kind:
            case "message_start":
                self.record_usage(data.get("message", {}).get("usage") or {})
            case "content_block_start":
                block = data.get("content_block") or {}
                if block.get("type") == "tool_use":
                    index = len(self.tool_index)
                    self.tool_index[data["index"]] = index
                    return [ToolCallDelta(index=index, id=block.get("id"), name=block.get("name"))]
                if block.get("type") == "text" and block.get("text"):
                    return [TextDelta(block["text"])]
            case "content_block_delta":
                delta = data.get("delta") or {}
                match delta.get("type"):
                    case "text_delta":
                        return [TextDelta(delta.get("text", ""))]
                    case "thinking_delta":
                        return [ReasoningDelta(delta.get("thinking", ""))]
                    case "input_json_delta":
                        index = self.tool_index.get(data.get("index", -1), 0)
                        return [ToolCallDelta(index=index, arguments=delta.get("partial_json", ""))]
            case "message_delta":
                self.record_usage(data.get("usage") or {})
                reason = (data.get("delta") or {}).get("stop_reason")
                if reason:
                    return [FinishEvent(STOP_REASONS.get(reason, "stop"))]
            case "message_stop":
                return [self.usage()]
            case "error":
                error = data.get("error") or {}
                status = 529 if error.get("type") == "overloaded_error" else 502
                raise UpstreamError(
                    f"upstream stream error: {error.get('message', 'unknown')}",
                    status=status,
                    provider="anthropic",
                    body=json.dumps(data)[:4000],
                    code="upstream_stream_error",
                )
        return []


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, http: UpstreamHTTP, *, base_url: str, api_key: str) -> None:
        self.http = http
        base = base_url.rstrip("/")
        self.url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self.api_key = api_key

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamEvent]:
        try:
            payload = translate_request(request)
        except (TranslationError, json.JSONDecodeError, KeyError) as exc:
            raise UpstreamError(
                str(exc), status=400, provider=self.name, code="unsupported_for_provider"
            ) from exc
        headers = {
            "x-api-key": self.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "accept": "text/event-stream",
        }
        try:
            async with self.http.post(
                self.url,
                headers=headers,
                body=json.dumps(payload).encode(),
                timeout=request.timeout_seconds,
            ) as response:
                if response.status >= 400:
                    raise await status_error(response, self.name)
                state = _StreamState()
                async for events in sse_batches(response.chunks()):
                    for kind, data in events:
                        if not data.strip():
                            continue
                        for event in state.events(kind, json.loads(data)):
                            yield event
        except TRANSPORT_ERRORS as exc:
            raise transport_failure(exc, self.name) from exc
