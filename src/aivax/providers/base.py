"""The adapter contract: `Provider.stream(request)` yields typed events; failures raise
`UpstreamError`, which keeps the upstream status, body and headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from httpx_sse import SSEError


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class FinishEvent:
    reason: str  # OpenAI finish reason: stop, length, tool_calls, content_filter


@dataclass(frozen=True, slots=True)
class UsageEvent:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


StreamEvent = TextDelta | ReasoningDelta | ToolCallDelta | FinishEvent | UsageEvent


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """An OpenAI-shaped chat request body (already validated), minus `model` and `stream`."""

    upstream_model: str
    body: dict[str, Any]
    max_tokens: int
    timeout_seconds: float = 600.0
    # Whether the caller streams. Adapters may stream from upstream either way; a non-streamed
    # call lets an adapter ask for one whole response instead.
    stream: bool = True


class Provider(Protocol):
    name: str

    def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamEvent]: ...


@dataclass
class UpstreamError(Exception):
    """An upstream failure, with what the upstream said."""

    message: str
    status: int
    provider: str
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    code: str = "upstream_error"

    def __post_init__(self) -> None:
        super().__init__(self.message)


RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

# What an HTTP adapter turns into an UpstreamError with `transport_failure`.
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
TRANSPORT_ERRORS = (
    *CONNECT_ERRORS,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    SSEError,
    json.JSONDecodeError,
)


def transport_failure(exc: Exception, provider: str) -> UpstreamError:
    """The UpstreamError for a failure below HTTP: no connection, a timeout, a broken stream,
    or a body that is not JSON."""
    if isinstance(exc, CONNECT_ERRORS):
        return UpstreamError(
            f"cannot connect to the upstream: {type(exc).__name__}",
            status=502,
            provider=provider,
            code="upstream_unreachable",
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(
            "the upstream did not answer in time",
            status=504,
            provider=provider,
            code="upstream_timeout",
        )
    if isinstance(exc, json.JSONDecodeError):
        return UpstreamError(
            "the upstream sent invalid JSON",
            status=502,
            provider=provider,
            code="upstream_bad_response",
        )
    return UpstreamError(
        "the upstream closed the connection mid-response",
        status=502,
        provider=provider,
        code="upstream_disconnected",
    )
