"""The error responses every API operation documents: one OpenAI error envelope, under each
status an operation can answer with, so clients (and schema-driven tests) can rely on them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do next.")
    type: str = Field(description="The error class, e.g. `invalid_request_error`.")
    param: str | None = Field(description="The request parameter at fault, if one is.")
    code: str | None = Field(description="A stable machine-readable code, e.g. `not_found`.")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope, the only error shape of the API."""

    error: ErrorDetail


ERROR_STATUSES: dict[int, str] = {
    400: "The request is invalid (a parameter, the JSON body or the upstream's refusal).",
    401: "No API key, or one that is unknown or revoked.",
    402: "The wallet's balance does not cover the request.",
    403: "The key may not do this (a public key, an origin or a plan limit).",
    404: "No such object, model or path for this account.",
    409: "The request conflicts with an existing object.",
    413: "The request body is larger than the server accepts.",
    415: "The request body's media type is not one this operation reads.",
    422: "A structured-output answer did not validate against the requested schema.",
    429: "A rate limit was reached; retry after `retry-after` seconds.",
    500: "An unexpected server error; quote the `x-request-id` if it persists.",
    502: "An upstream provider or dependency failed.",
    503: "A dependency (database, rate limits, a model) is unavailable; retry shortly.",
    504: "An upstream provider did not answer in time.",
}

# Given to `include_router(responses=...)`: a route's own 4xx entry would win over these, and
# documenting 422 here replaces FastAPI's default validation-error body, which AIVAX never sends
# (request validation errors are 400, or 404 for a bad id in the path).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in ERROR_STATUSES.items()
}

# `stream: true` answers with server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "description": "A `chat.completion.chunk` or an error envelope as JSON, or `[DONE]`.",
        },
    },
}

CHAT_COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat completion, or with `stream: true` its chunks as server-sent "
        "events ending with `data: [DONE]`.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": SSE_EVENT},
        },
    }
}

EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The collection's documents as JSON lines, one document per line "
        "(`id`, `text`, `title`, `content_type`, `metadata`), as the import reads them.",
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
    }
}
