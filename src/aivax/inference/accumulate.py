"""The one post-processing path for streamed and non-streamed calls: every event passes through
an `Accumulator`, which also renders OpenAI chunks and the final completion."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aivax.providers.base import (
    FinishEvent,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageEvent,
)


@dataclass
class ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Accumulator:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, ToolCallParts] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: UsageEvent | None = None
    first_token_at: float | None = None

    def reset(self) -> None:
        """Forget a failed attempt before the next one (nothing of it reached the client)."""
        self.text.clear()
        self.reasoning.clear()
        self.tool_calls.clear()
        self.finish_reason = None
        self.usage = None
        self.first_token_at = None

    @property
    def produced_output(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls)

    def add(self, event: StreamEvent) -> None:
        match event:
            case TextDelta(text=text):
                self._mark()
                self.text.append(text)
            case ReasoningDelta(text=text):
                self._mark()
                self.reasoning.append(text)
            case ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments):
                self._mark()
                parts = self.tool_calls.setdefault(index, ToolCallParts())
                parts.id = call_id or parts.id
                parts.name = name or parts.name
                parts.arguments += arguments
            case FinishEvent(reason=reason):
                self.finish_reason = reason
            case UsageEvent():
                self.usage = event

    def _mark(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def generated_text(self) -> str:
        calls = "".join(c.name + c.arguments for c in self.tool_calls.values())
        return "".join(self.reasoning) + "".join(self.text) + calls

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if self.text or not self.tool_calls else None,
            "refusal": None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": parts.id or f"call_{index}",
                    "type": "function",
                    "function": {"name": parts.name, "arguments": parts.arguments},
                }
                for index, parts in sorted(self.tool_calls.items())
            ]
        return message

    def final_finish_reason(self) -> str:
        if self.finish_reason:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"


def is_content(event: StreamEvent) -> bool:
    """Output the client may already have seen (after it, a call can no longer fall back)."""
    return isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta)


def delta_of(event: StreamEvent) -> dict[str, Any] | None:
    """The OpenAI `delta` for one event (None for events that carry no delta)."""
    match event:
        case TextDelta(text=text):
            return {"content": text}
        case ReasoningDelta(text=text):
            return {"reasoning_content": text}
        case ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments):
            call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
            if call_id:
                call["id"] = call_id
                call["type"] = "function"
            if name:
                call["function"]["name"] = name
            return {"tool_calls": [call]}
    return None
