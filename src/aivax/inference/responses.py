"""OpenAI response shapes for a finished or streaming call."""

from __future__ import annotations

import time
from typing import Any

from aivax.inference.events import CallResult, Usage
from aivax.kit import fastjson
from aivax.kit.money import micros_to_usd


def completion_id(request_id: str) -> str:
    return "chatcmpl-" + request_id.removeprefix("req_")


def usage_block(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def retrieval_block(result: CallResult) -> dict[str, Any]:
    return {"retrieval": result.retrieval} if result.include_retrieval else {}


def aivax_block(result: CallResult) -> dict[str, Any]:
    truncation = result.truncation
    return {
        **retrieval_block(result),
        "request_id": result.request_id,
        "model": result.model,
        "gateway_id": str(result.gateway_id) if result.gateway_id else None,
        "cost_micros": result.cost_micros,
        "cost_usd": micros_to_usd(result.cost_micros) if result.cost_micros is not None else None,
        "usage_estimated": result.usage.estimated,
        "max_tokens": result.max_tokens,
        "truncation": {
            "mode": truncation.mode,
            "dropped_messages": truncation.dropped_messages,
            "input_tokens_before": truncation.input_tokens_before,
            "input_tokens_after": truncation.input_tokens_after,
        }
        if truncation
        else None,
    }


def cost_headers(result: CallResult) -> dict[str, str]:
    headers = dict(result.headers)
    if result.cost_micros is not None:
        headers["x-aivax-cost-micros"] = str(result.cost_micros)
        headers["x-aivax-cost-usd"] = micros_to_usd(result.cost_micros)
    headers["x-aivax-usage-estimated"] = "true" if result.usage.estimated else "false"
    return headers


def message(result: CallResult) -> dict[str, Any]:
    """The assistant message, as OpenAI shapes it."""
    body: dict[str, Any] = {"role": "assistant", "content": result.content, "refusal": None}
    if result.reasoning is not None:
        body["reasoning_content"] = result.reasoning
    if result.tool_calls:
        body["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return body


def completion(result: CallResult) -> dict[str, Any]:
    return {
        "id": completion_id(result.request_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.requested_model or result.model,
        "choices": [
            {
                "index": 0,
                "message": message(result),
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_block(result.usage),
        "aivax": aivax_block(result),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id(request_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
        ],
    }


def usage_chunk(result: CallResult, created: int) -> dict[str, Any]:
    return {
        "id": completion_id(result.request_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": result.requested_model or result.model,
        "choices": [],
        "usage": usage_block(result.usage),
        "aivax": aivax_block(result),
    }


class DeltaLines:
    """The SSE lines of one call's delta chunks: the envelope (id, created, model, …) is
    encoded once, each chunk only encodes its delta."""

    def __init__(self, request_id: str, model: str, created: int) -> None:
        whole = fastjson.dumps(chunk(request_id, model, created)).decode()
        head, tail = whole.split('"delta":{}', 1)  # strings are escaped: one real match
        self.head = b"data: " + head.encode() + b'"delta":'
        self.tail = tail.encode() + b"\n\n"

    def line(self, delta: dict[str, Any]) -> bytes:
        return self.head + fastjson.dumps(delta) + self.tail

    def finish_line(self, reason: str | None) -> bytes:
        """The chunk with an empty delta that gives the finish reason."""
        tail = self.tail.replace(
            b'"finish_reason":null', b'"finish_reason":' + fastjson.dumps(reason), 1
        )
        return self.head + b"{}" + tail


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + fastjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"
