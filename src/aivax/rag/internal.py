"""Calls AIVAX makes itself on a caller's behalf (query rewriting, retrieval decisions,
reranking with a chat model): billed to the caller and logged like any call."""

from __future__ import annotations

import uuid
from typing import Any

from aivax.inference import pipeline as inference
from aivax.inference.accumulate import Accumulator
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.steps import Steps
from aivax.keys.service import Principal
from aivax.providers.base import UpstreamError
from aivax.services import AppServices


async def call(
    services: AppServices,
    principal: Principal,
    model: str,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
    steps: Steps | None = None,
) -> Accumulator:
    """One billed, non-streamed call of `model` made by AIVAX itself, reserved, settled and
    logged like any call: as the next step of the caller's request when `steps` is given,
    else under a request id of its own."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if tools:
        body["tools"] = tools
    request = ChatCompletionRequest.model_validate(body)
    steps = steps or Steps(f"internal:{uuid.uuid4()}")
    call = await inference.prepare(
        services, principal, request, steps.request_id, internal=True, steps=steps
    )
    accumulator = Accumulator()
    status, code = 200, None
    try:
        async for _ in inference.open_stream(call, accumulator):
            pass
    except UpstreamError as exc:
        status, code = exc.status, exc.code
        raise
    finally:
        await inference.finish(call, accumulator, status=status, error_code=code)
    return accumulator
