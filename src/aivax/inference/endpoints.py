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
from aivax.errors import BadRequest, error_envelope
from aivax.inference import catalog_view, repository, responses
from aivax.inference.accumulate import Accumulator, delta_of
from aivax.inference.pipeline import PreparedCall, client_error, finish, open_stream, prepare
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.steps import Steps
from aivax.keys.service import Principal
from aivax.kit.fastjson import FastJSONResponse
from aivax.kit.pagination import IdCursor, ListPage, PageLimit, page_of
from aivax.kit.streaming import EventStreamResponse
from aivax.openapi import CHAT_COMPLETION_RESPONSES
from aivax.providers.base import StreamEvent, UpstreamError
from aivax.services import AppServices
from aivax.structured import pipeline as structured

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
    if body.stream and body.json_only:
        raise BadRequest(
            "json_only returns one JSON document; it cannot be streamed.", param="json_only"
        )
    if body.stream:
        call = await prepare(services, principal, body, request_id, origin=origin)
        accumulator = Accumulator()
        return await _stream(call, accumulator, open_stream(call, accumulator))
    call, accumulator = await _complete(services, principal, body, request_id, origin)
    if call.structured is not None:
        return await _structured(services, principal, body, origin, call, accumulator)
    return FastJSONResponse(
        responses.completion(call, accumulator), headers=responses.cost_headers(call)
    )


async def _complete(
    services: AppServices,
    principal: Principal,
    body: ChatCompletionRequest,
    request_id: str,
    origin: str | None,
    steps: Steps | None = None,
) -> tuple[PreparedCall, Accumulator]:
    """One whole non-streamed call: prepared, run, settled (as the next of `steps`, if
    given)."""
    call = await prepare(services, principal, body, request_id, origin=origin, steps=steps)
    accumulator = Accumulator()
    status = 499  # unless the call completes or fails upstream
    code: str | None = "cancelled"
    try:
        async for _ in open_stream(call, accumulator):
            pass
        status, code = 200, None
    except UpstreamError as exc:
        error = client_error(exc, call.model)
        status, code = error.status, error.instance_code
        raise error from exc
    finally:
        await finish(call, accumulator, status=status, error_code=code)
    return call, accumulator


async def _structured(
    services: AppServices,
    principal: Principal,
    body: ChatCompletionRequest,
    origin: str | None,
    call: PreparedCall,
    accumulator: Accumulator,
) -> JSONResponse:
    """Heal and validate; re-ask (each a full call, reserved, billed and logged as the next
    step of the same request) until valid or out of attempts."""
    plan = call.structured
    assert plan is not None  # noqa: S101 - the caller checked
    result = structured.check(plan, "".join(accumulator.text))
    attempts, total_cost = 1, call.cost_micros or 0
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    while not result.valid and attempts <= plan.max_attempts:
        messages = structured.reask(messages, result.raw, result.errors)
        retry = ChatCompletionRequest.model_validate(
            {**body.model_dump(exclude_none=True, by_alias=True), "messages": messages}
        )
        call, accumulator = await _complete(
            services, principal, retry, call.request_id, origin, call.steps
        )
        total_cost += call.cost_micros or 0
        attempts += 1
        result = structured.check(plan, "".join(accumulator.text))
    if not result.valid:
        raise structured.failure(result)
    report = structured.healing_report(result, attempts)
    headers = {
        **responses.cost_headers(call),
        "x-aivax-cost-micros": str(total_cost),
        "x-aivax-json-healing": ",".join(result.steps) or "none",
        "x-aivax-json-attempts": str(attempts),
    }
    if body.json_only:
        usage = responses.usage_block(call, accumulator)
        headers |= {
            "x-aivax-usage-prompt-tokens": str(usage["prompt_tokens"]),
            "x-aivax-usage-completion-tokens": str(usage["completion_tokens"]),
        }
        return JSONResponse(result.document, headers=headers)
    payload = responses.completion(call, accumulator)
    payload["choices"][0]["message"]["content"] = json.dumps(result.document)
    payload["aivax"] |= {"json_healing": report, "cost_micros": total_cost}
    return JSONResponse(payload, headers=headers)


async def _stream(
    call: PreparedCall, accumulator: Accumulator, events: AsyncIterator[StreamEvent]
) -> StreamingResponse:
    """Fail with a plain HTTP error if the upstream fails before its first event; after that,
    failures become an SSE error event followed by [DONE]."""
    try:
        first: StreamEvent | None = await anext(events)
    except StopAsyncIteration:
        first = None
    except UpstreamError as exc:
        error = client_error(exc, call.model)
        await finish(call, accumulator, status=error.status, error_code=error.instance_code)
        raise error from exc
    except BaseException:
        await finish(call, accumulator, status=499, error_code="cancelled")
        raise
    return EventStreamResponse(
        _sse(call, accumulator, first, events),
        media_type="text/event-stream",
        headers={**call.admission.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _sse(
    call: PreparedCall,
    accumulator: Accumulator,
    first: StreamEvent | None,
    events: AsyncIterator[StreamEvent],
) -> AsyncIterator[bytes]:
    """The event stream. Chunks that are ready together leave in one write: the opening chunk
    with the first delta, and the finish chunk with the usage chunk and [DONE]."""
    created = int(time.time())
    status = 499  # unless the loop below completes
    code: str | None = "client_disconnected"
    tail: list[bytes] = []
    try:
        lines = responses.DeltaLines(call, created)
        if retrieved := responses.retrieval_block(call):
            opening = responses.chunk(call, created, delta={"role": "assistant", "content": ""})
            opening["aivax"] = retrieved
            head = [responses.sse(opening)]
        else:
            head = [lines.line({"role": "assistant", "content": ""})]
        delta = delta_of(first) if first is not None else None
        if delta is not None:
            head.append(lines.line(delta))
        yield b"".join(head)
        async for event in events:
            delta = delta_of(event)
            if delta is not None:
                yield lines.line(delta)
        tail.append(lines.finish_line(accumulator.final_finish_reason()))
        if call.structured is not None:
            # Streams are healed locally at the end (no re-ask): the validated document comes
            # in a last chunk, or the stream ends with a json_validation_failed error event.
            result = structured.check(call.structured, "".join(accumulator.text))
            if not result.valid:
                raise structured.failure(result)
            final = {**responses.chunk(call, created), "choices": []}
            final["aivax"] = {
                "document": result.document,
                "json_healing": structured.healing_report(result, 1),
            }
            tail.append(responses.sse(final))
        status, code = 200, None
        await finish(call, accumulator, status=200, error_code=None)
        if call.request.include_usage:
            tail.append(responses.sse(responses.usage_chunk(call, accumulator, created)))
        yield b"".join([*tail, responses.DONE])
    except UpstreamError as exc:
        error = client_error(exc, call.model)
        status, code = error.status, error.instance_code
        await finish(call, accumulator, status=status, error_code=code)
        envelope = error_envelope(error.message, type_=error.type, code=code)
        yield b"".join([*tail, responses.sse(envelope), responses.DONE])
    except structured.JsonValidationFailed as failed:
        status, code = 422, failed.code
        await finish(call, accumulator, status=status, error_code=code)
        yield b"".join([*tail, responses.sse(failed.envelope()), responses.DONE])
    finally:
        await finish(call, accumulator, status=status, error_code=code)


@router.get("/models")
async def list_models(principal: AnyKey, session: SessionDep) -> dict[str, Any]:
    data = await catalog_view.visible_models(session, principal)
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, principal: AnyKey, session: SessionDep) -> dict[str, Any]:
    return await catalog_view.visible_model(session, principal, model_id)


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
