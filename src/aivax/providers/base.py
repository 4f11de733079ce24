"""The adapter contract: `Provider.stream(request)` yields typed events; failures raise
`UpstreamError`, which keeps the upstream status, body and headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


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

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
