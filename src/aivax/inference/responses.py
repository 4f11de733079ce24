"""OpenAI response shapes for a finished or streaming call."""

from __future__ import annotations

import time
from typing import Any

from aivax.inference.accumulate import Accumulator
from aivax.inference.pipeline import PreparedCall
from aivax.kit import fastjson
from aivax.kit.money import micros_to_usd


def completion_id(call: PreparedCall) -> str:
    return "chatcmpl-" + call.request_id.removeprefix("req_")


def usage_block(call: PreparedCall, accumulator: Accumulator) -> dict[str, Any]:
    cached = accumulator.usage.cached_input_tokens if accumulator.usage else 0
    reasoning = accumulator.usage.reasoning_tokens if accumulator.usage else 0
    return {
        "prompt_tokens": call.input_tokens,
        "completion_tokens": call.output_tokens,
        "total_tokens": call.input_tokens + call.output_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def retrieval_block(call: PreparedCall) -> dict[str, Any]:
    options = call.request.aivax
    if options is None or not options.include_retrieval:
        return {}
    return {"retrieval": call.retrieval}


def aivax_block(call: PreparedCall) -> dict[str, Any]:
    return {
        **retrieval_block(call),
        "request_id": call.request_id,
        "model": call.model.id,
        "gateway_id": str(call.gateway_id) if call.gateway_id else None,
        "cost_micros": call.cost_micros,
        "cost_usd": micros_to_usd(call.cost_micros) if call.cost_micros is not None else None,
        "usage_estimated": call.estimated,
        "max_tokens": call.admission.max_tokens,
        "truncation": {
            "mode": call.truncation.mode,
            "dropped_messages": call.truncation.dropped_messages,
            "input_tokens_before": call.truncation.input_tokens_before,
            "input_tokens_after": call.truncation.input_tokens_after,
        }
        if call.truncation
        else None,
    }


def cost_headers(call: PreparedCall) -> dict[str, str]:
    headers = dict(call.admission.headers)
    if call.cost_micros is not None:
        headers["x-aivax-cost-micros"] = str(call.cost_micros)
        headers["x-aivax-cost-usd"] = micros_to_usd(call.cost_micros)
    headers["x-aivax-usage-estimated"] = "true" if call.estimated else "false"
    return headers


def completion(call: PreparedCall, accumulator: Accumulator) -> dict[str, Any]:
    return {
        "id": completion_id(call),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.requested_model or call.model.id,
        "choices": [
            {
                "index": 0,
                "message": accumulator.message(),
                "finish_reason": accumulator.final_finish_reason(),
                "logprobs": None,
            }
        ],
        "usage": usage_block(call, accumulator),
        "aivax": aivax_block(call),
    }


def chunk(
    call: PreparedCall,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id(call),
        "object": "chat.completion.chunk",
        "created": created,
        "model": call.requested_model or call.model.id,
        "choices": [
            {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
        ],
    }


def usage_chunk(call: PreparedCall, accumulator: Accumulator, created: int) -> dict[str, Any]:
    return {
        "id": completion_id(call),
        "object": "chat.completion.chunk",
        "created": created,
        "model": call.requested_model or call.model.id,
        "choices": [],
        "usage": usage_block(call, accumulator),
        "aivax": aivax_block(call),
    }


class DeltaLines:
    """The SSE lines of one call's delta chunks: the envelope (id, created, model, …) is
    encoded once, each chunk only encodes its delta."""

    def __init__(self, call: PreparedCall, created: int) -> None:
        whole = fastjson.dumps(chunk(call, created)).decode()
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
