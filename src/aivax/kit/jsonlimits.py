"""One nesting limit for every JSON document the API parses: request bodies, tool-call
arguments, import lines, upload and collection metadata, MCP messages.

Deep nesting is never legitimate in what AIVAX accepts (the deepest real documents, JSON
schemas for structured output, stay well under it), while thousands of levels make recursive
parsers, validators and encoders fail with `RecursionError` — a 500 — or spend quadratic time.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from aivax.errors import BadRequest

MAX_JSON_DEPTH = 64


class JsonTooDeep(BadRequest):
    code = "json_too_deep"


def depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests objects/arrays more than `limit` levels deep.

    A value cannot be deeper than the number of objects and arrays it has, and counting the
    brackets of its serialization (orjson, in C) costs a tenth of walking it in Python: only a
    value with more than `limit` brackets is walked."""
    if type(value) is not dict and type(value) is not list:
        return False
    try:
        text = orjson.dumps(value)
    except TypeError:  # orjson's own depth limit (254), or a value that is not plain JSON
        return _walk_exceeds(value, limit)
    if text.count(b"{") + text.count(b"[") <= limit:
        return False
    return _walk_exceeds(value, limit)


def _walk_exceeds(value: Any, limit: int) -> bool:
    """One level at a time without recursion, so any depth is safe to check; stops at `limit`."""
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        if below and depth >= limit:
            return True
        level = below
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


def too_deep_error(limit: int = MAX_JSON_DEPTH) -> PydanticCustomError:
    """The validation error of a field nested past the limit (rendered as `json_too_deep`)."""
    return PydanticCustomError(
        "json_too_deep", "nested more than {limit} levels deep; flatten it.", {"limit": limit}
    )


def _within_depth(value: Any) -> Any:
    if depth_exceeds(value):
        raise too_deep_error()
    return value


# A free-form JSON field of a request body (schemas, tool parameters, metadata): the one place
# a validated body can nest without bound, so the one place its depth needs checking.
JsonObject = Annotated[dict[str, Any], AfterValidator(_within_depth)]


class NulCharacter(BadRequest):
    code = "nul_character"


def nul_path(value: Any) -> str | None:
    """Where a parsed JSON value has a string (or object key) with a NUL character, as a dotted
    path like `messages.0.content`; None when it has none. PostgreSQL can store NUL in neither
    text nor JSON, so such a string is refused on both databases alike."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    return child_path
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item))
    return None


def check_nul(value: Any, *, where: str = "the request body") -> None:
    """Raise `NulCharacter` (400, naming the field) for a string with a NUL character."""
    path = nul_path(value)
    if path is not None:
        raise NulCharacter(
            f"{path!r} in {where} contains a NUL character (\\u0000), which AIVAX does not "
            "store; remove it.",
            param=path or None,
        )
