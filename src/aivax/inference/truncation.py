"""Fitting a conversation into a gateway's context limit, counted exactly as admission counts.

The leading system/developer messages (the gateway's instruction and templates, and the caller's
own) are the "system part" and always kept. The rest is split into turns; an assistant message
that calls tools and the tool results answering it form one turn, so a call is never separated
from its result. `drop_oldest` drops the oldest turns; `middle_out` keeps the first turn and the
newest ones, dropping from the second onwards. The newest turn is never dropped: if it does not
fit on its own the request is refused with the counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aivax.errors import BadRequest

Count = Callable[[list[dict[str, Any]]], Awaitable[int]]


class ContextLimitExceeded(BadRequest):
    code = "context_length_exceeded"


@dataclass(frozen=True, slots=True)
class Truncation:
    mode: str
    dropped_messages: int
    input_tokens_before: int
    input_tokens_after: int

    def header(self) -> str:
        return (
            f"{self.mode}; dropped={self.dropped_messages}; "
            f"tokens={self.input_tokens_before}->{self.input_tokens_after}"
        )


def split(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(system part, turns)."""
    index = 0
    while index < len(messages) and messages[index]["role"] in ("system", "developer"):
        index += 1
    turns: list[list[dict[str, Any]]] = []
    for message in messages[index:]:
        if message["role"] == "tool" and turns and turns[-1][0].get("tool_calls"):
            turns[-1].append(message)
        else:
            turns.append([message])
    return messages[:index], turns


def _refuse(count: int, limit: int, mode: str) -> ContextLimitExceeded:
    return ContextLimitExceeded(
        f"The conversation has {count} input tokens; this gateway allows {limit} "
        f"(truncation: {mode}). Shorten it or start a new conversation.",
        param="messages",
    )


async def fit(
    messages: list[dict[str, Any]], *, limit: int, mode: str, count: Count
) -> tuple[list[dict[str, Any]], Truncation | None, int]:
    """(messages that fit, what was dropped or None, their input-token count)."""
    before = await count(messages)
    if before <= limit:
        return messages, None, before
    if mode == "error":
        raise _refuse(before, limit, mode)
    system, turns = split(messages)
    keep_first = mode == "middle_out" and len(turns) > 2

    def candidate(dropped: int) -> list[dict[str, Any]]:
        kept = [turns[0], *turns[1 + dropped :]] if keep_first else turns[dropped:]
        return system + [m for turn in kept for m in turn]

    droppable = len(turns) - (2 if keep_first else 1)
    low, high, best = 1, droppable, None  # fewest turns to drop (fitting is monotonic in it)
    while low <= high:
        middle = (low + high) // 2
        if await count(candidate(middle)) <= limit:
            best, high = middle, middle - 1
        else:
            low = middle + 1
    if best is None:
        raise _refuse(before, limit, mode)
    fitted = candidate(best)
    after = await count(fitted)
    return fitted, Truncation(mode, len(messages) - len(fitted), before, after), after
