from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from aivax.auth.dependencies import AnyKey, PrivateKey, Services
from aivax.db import SessionDep
from aivax.errors import BadRequest
from aivax.inference import catalog_view, repository, responses
from aivax.inference.accumulate import delta_of
from aivax.inference.caller import Caller
from aivax.inference.events import (
    CallDone,
    CallError,
    CallResult,
    Finished,
    OutputDocument,
    OutputOutcome,
)
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.service import CallStream, run_call, stream_call
from aivax.keys.service import Principal
from aivax.kit.fastjson import FastJSONResponse
from aivax.kit.pagination import IdCursor, ListPage, PageLimit, page_of
from aivax.kit.streaming import EventStreamResponse
from aivax.openapi import CHAT_COMPLETION_RESPONSES
from aivax.providers.base import ReasoningDelta, TextDelta, ToolCallDelta
from aivax.services import AppServices

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post("/chat/completions", response_model=None, responses=CHAT_COMPLETION_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, principal: AnyKey, services: Services, request: Request
) -> JSONResponse | StreamingResponse:
    """Served by `inference.route.ChatRoute` before FastAPI routing; declared here for the
    OpenAPI schema and for an app built without that route."""
    return await respond(
        services, principal, body, request.state.request_id, request.headers.get("origin")
    )


async def respond(
    services: AppServices,
    principal: Principal,
    body: ChatCompletionRequest,
    request_id: str,
    origin: str | None,
) -> JSONResponse | StreamingResponse:
    """One chat completion, streamed or not, as the HTTP response to send."""
    caller = Caller.api_key(principal, request_id, origin)
    if body.stream:
        stream = await stream_call(services.kernel, body, caller)
        return EventStreamResponse(
            _sse(stream),
            media_type="text/event-stream",
            headers={**stream.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    result = await run_call(services.kernel, body, caller)
    if result.output is not None:
        return _structured(body, result, result.output)
    return FastJSONResponse(responses.completion(result), headers=responses.cost_headers(result))


def _structured(
    body: ChatCompletionRequest, result: CallResult, output: OutputOutcome
) -> JSONResponse:
    """A checked document: in the message (with its healing report), or as the whole body
    (`json_only`)."""
    headers = {
        **responses.cost_headers(result),
        "x-aivax-cost-micros": str(result.total_cost_micros),
        "x-aivax-json-healing": ",".join(output.healing_steps) or "none",
        "x-aivax-json-attempts": str(output.attempts),
    }
    if body.json_only:
        headers |= {
            "x-aivax-usage-prompt-tokens": str(result.usage.input_tokens),
            "x-aivax-usage-completion-tokens": str(result.usage.output_tokens),
        }
        return JSONResponse(output.document, headers=headers)
    payload = responses.completion(result)
    payload["choices"][0]["message"]["content"] = json.dumps(output.document)
    payload["aivax"] |= {"json_healing": output.report, "cost_micros": result.total_cost_micros}
    return JSONResponse(payload, headers=headers)


async def _sse(stream: CallStream) -> AsyncIterator[bytes]:
    """The event stream. Chunks that are ready together leave in one write: the opening chunk
    with the first delta, and the finish chunk with the usage chunk and [DONE]."""
    created = int(time.time())
    lines = responses.DeltaLines(stream.request_id, stream.model, created)
    head = _opening(stream, lines, created)
    if not stream.opens_with_content:
        yield head
        head = b""
    tail: list[bytes] = []
    async for event in stream:
        match event:
            case TextDelta() | ReasoningDelta() | ToolCallDelta():
                line = lines.line(delta_of(event) or {})
                yield head + line if head else line
                head = b""
            case Finished(reason=reason):
                tail.append(lines.finish_line(reason))
            case OutputDocument(document=document, report=report):
                final = {**responses.chunk(stream.request_id, stream.model, created), "choices": []}
                final["aivax"] = {"document": document, "json_healing": report}
                tail.append(responses.sse(final))
            case CallDone(result=result):
                if stream.include_usage:
                    tail.append(responses.sse(responses.usage_chunk(result, created)))
                yield b"".join([head, *tail, responses.DONE])
            case CallError(error=error):
                yield b"".join([head, *tail, responses.sse(error.envelope()), responses.DONE])


def _opening(stream: CallStream, lines: responses.DeltaLines, created: int) -> bytes:
    if not stream.include_retrieval:
        return lines.line({"role": "assistant", "content": ""})
    opening = responses.chunk(
        stream.request_id, stream.model, created, delta={"role": "assistant", "content": ""}
    )
    opening["aivax"] = {"retrieval": stream.retrieval}
    return responses.sse(opening)


@router.get("/models")
async def list_models(principal: AnyKey, session: SessionDep, services: Services) -> dict[str, Any]:
    listings = services.kernel.extensions.listings
    data = await catalog_view.visible_models(session, principal, listings)
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
async def get_model(
    model_id: str, principal: AnyKey, session: SessionDep, services: Services
) -> dict[str, Any]:
    listings = services.kernel.extensions.listings
    return await catalog_view.visible_model(session, principal, model_id, listings)


@router.get("/requests", response_model=ListPage[catalog_view.RequestLogRead])
async def list_requests(
    auth: PrivateKey, session: SessionDep, limit: PageLimit = 20, after: IdCursor = None
) -> ListPage[catalog_view.RequestLogRead]:
    logs = await repository.list_logs(session, auth.account.id, limit=limit, after=after)
    data = [catalog_view.RequestLogRead.model_validate(log) for log in logs]
    return page_of(data, [str(log.id) for log in data], limit=limit)


def _in_utc(value: datetime, param: str) -> datetime:
    """A time without an offset is UTC; one whose UTC time falls outside years 1-9999 is
    refused by name rather than overflowing."""
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise BadRequest(
            f"{param!r} ({value.isoformat()}) is out of range once converted to UTC; give a "
            "time between years 1 and 9999.",
            param=param,
        ) from None


def _days_before(end: datetime, days: int) -> datetime:
    try:
        return end - timedelta(days=days)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


@router.get("/usage")
async def usage(
    auth: PrivateKey,
    session: SessionDep,
    group_by: Literal["day", "model", "key"] = "day",
    since: Annotated[datetime | None, Query(description="Start (default: 30 days ago).")] = None,
    until: Annotated[datetime | None, Query(description="End, exclusive (default: now).")] = None,
) -> dict[str, Any]:
    end = _in_utc(until, "until") if until else datetime.now(UTC)
    start = _in_utc(since, "since") if since else _days_before(end, 30)
    if start >= end:
        raise BadRequest(
            f"'since' ({start.isoformat()}) must be before 'until' ({end.isoformat()}).",
            param="since",
        )
    rows = await repository.usage_totals(
        session, auth.account.id, group_by=group_by, since=start, until=end
    )
    for row in rows:
        row[group_by] = str(row.pop("group"))
    return {
        "object": "usage",
        "group_by": group_by,
        "since": start.isoformat(),
        "until": end.isoformat(),
        "data": rows,
    }
