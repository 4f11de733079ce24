"""One nesting limit for every JSON document the API parses: request bodies, tool-call
arguments, import lines, upload and collection metadata, MCP messages.

Deep nesting is never legitimate in what AIVAX accepts (the deepest real documents, JSON
schemas for structured output, stay well under it), while thousands of levels make recursive
parsers, validators and encoders fail with `RecursionError` — a 500 — or spend quadratic time.
"""

from __future__ import annotations

from typing import Any

import orjson

from aivax.errors import BadRequest

MAX_JSON_DEPTH = 64


class JsonTooDeep(BadRequest):
    code = "json_too_deep"


def depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests objects/arrays more than `limit` levels deep; walks
    without recursion, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def check_depth(value: Any, *, param: str | None = None, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise `JsonTooDeep` (400, naming `param`) for a value nested past the limit."""
    if depth_exceeds(value, limit):
        where = f" in {param!r}" if param else ""
        raise JsonTooDeep(
            f"JSON{where} is nested more than {limit} levels deep; flatten it.", param=param
        )


def loads_limited(
    raw: bytes | str, *, param: str | None = None, limit: int = MAX_JSON_DEPTH
) -> Any:
    """Parse JSON text with the nesting limit. Raises `JsonTooDeep`, or `ValueError` (with
    orjson's message) for text that is not JSON or not UTF-8. orjson stops by itself at 1,024
    levels, so no depth of input reaches a recursive parser."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise JsonTooDeep(
                f"JSON{f' in {param!r}' if param else ''} is nested more than {limit} levels "
                "deep; flatten it.",
                param=param,
            ) from None
        raise ValueError(str(exc)) from None
    check_depth(value, param=param, limit=limit)
    return value
