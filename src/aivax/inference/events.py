"""What the kernel returns: a typed result, or a typed stream of events.

A stream's content events are the provider's own (`TextDelta`, `ReasoningDelta`,
`ToolCallDelta`: no copy per chunk); the others say what happened around them. It ends with
exactly one `CallDone` or `CallError`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from aivax.errors import AppError
from aivax.inference.extensions import ToolCall, ToolResult
from aivax.inference.truncation import Truncation
from aivax.providers.base import ReasoningDelta, TextDelta, ToolCallDelta

ContentDelta = TextDelta | ReasoningDelta | ToolCallDelta


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.estimated or other.estimated,
        )


@dataclass(frozen=True, slots=True)
class OutputOutcome:
    """The checked output of a call with an output plan (structured output)."""

    document: Any
    report: dict[str, Any]
    healing_steps: list[str]
    attempts: int


@dataclass(frozen=True, slots=True)
class CallResult:
    """`cost_micros`: the answer's cost (every step of its tool loop; None when the model is
    not priced); `total_cost_micros`: every model request of the call, re-asks included.
    `usage` is the answer's. `headers`: what admission says about the call (rate limits,
    clamped tokens, truncation, ignored parameters) for adapters that speak HTTP."""

    request_id: str
    model: str
    requested_model: str
    gateway_id: uuid.UUID | None
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    cost_micros: int | None
    total_cost_micros: int
    steps: int
    max_tokens: int
    headers: dict[str, str]
    truncation: Truncation | None = None
    retrieval: dict[str, Any] | None = None
    include_retrieval: bool = False
    output: OutputOutcome | None = None
    tool_activity: list[ToolActivity] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ToolActivity:
    """A server-side tool the model called in step `step`, and what it returned."""

    step: int
    call: ToolCall
    result: ToolResult


@dataclass(frozen=True, slots=True)
class Finished:
    """The model finished its answer (`reason` as OpenAI names it); settling follows."""

    reason: str


@dataclass(frozen=True, slots=True)
class OutputDocument:
    """The checked document of a streamed call with an output plan."""

    document: Any
    report: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallError:
    """The call failed after its stream started; `error` says how (status, code, message)."""

    error: AppError


@dataclass(frozen=True, slots=True)
class CallDone:
    result: CallResult


CallEvent = (
    (TextDelta | ReasoningDelta | ToolCallDelta | ToolActivity | Finished | OutputDocument)
    | CallError
    | CallDone
)
