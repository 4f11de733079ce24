"""Calls AIVAX makes itself on a caller's behalf (query rewriting, retrieval decisions,
reranking with a chat model): run by the call kernel as `internal` calls, billed to the caller
and logged like any call."""

from __future__ import annotations

import uuid
from typing import Any

from aivax.inference.caller import Caller
from aivax.inference.events import CallResult
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.service import run_call
from aivax.inference.steps import Steps
from aivax.keys.service import Principal
from aivax.rag.deps import KernelServices


async def call(
    services: KernelServices,
    principal: Principal,
    model: str,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
    steps: Steps | None = None,
) -> CallResult:
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
    request_id = steps.request_id if steps is not None else f"internal:{uuid.uuid4()}"
    caller = Caller.internal(principal, request_id, steps)
    return await run_call(services.kernel, request, caller)


def generated_text(result: CallResult) -> str:
    """Everything the model generated, as one text (reasoning, content, tool calls)."""
    calls = "".join(c.name + c.arguments for c in result.tool_calls)
    return (result.reasoning or "") + (result.content or "") + calls
