"""The rules every request's JSON body, path and query string meet before a route parses them:
JSON nested at most `MAX_JSON_DEPTH` levels, and no NUL character in any string.

FastAPI parses bodies with the standard library (recursive: thousands of levels raise
`RecursionError`) and hands free-form fields to the database as they are (PostgreSQL refuses NUL
in text and JSON). Checking here keeps one rule for every route, named in one 400, on SQLite and
PostgreSQL alike. Both checks cost nothing on an ordinary body: they parse it a second time only
when a byte scan says it may break a rule (a `\\u0000` escape, or more brackets than the depth
limit). The chat route reads its own body (`inference.route`) and applies `reject_nul` itself.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aivax import handlers
from aivax.auth.middleware import body_limit
from aivax.errors import AppError
from aivax.kit.jsonlimits import MAX_JSON_DEPTH, NulCharacter, check_nul, loads_limited

NUL_ESCAPE = b"\\u0000"
# The MCP endpoint answers in JSON-RPC, with its own parsing rules.
OWN_RULES_PREFIX = "/v1/mcp/"


def reject_nul(raw: bytes) -> None:
    """Refuse a JSON body with a NUL character in a string (JSON can only carry one escaped)."""
    # memchr for a backslash first: most bodies have none, and those skip the longer search.
    if b"\\" in raw and NUL_ESCAPE in raw:
        try:
            value = loads_limited(raw)
        except ValueError:
            return  # not JSON: the route's parser says so
        check_nul(value)


def check_body(raw: bytes) -> None:
    if (b"\\" not in raw or NUL_ESCAPE not in raw) and (
        raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH
    ):
        return
    try:
        value = loads_limited(raw)  # raises JsonTooDeep
    except ValueError:
        return
    check_nul(value)


def check_url(scope: Scope) -> None:
    if "\x00" in scope["path"]:
        raise NulCharacter("The URL path contains a NUL character (%00); remove it.")
    query: bytes = scope.get("query_string", b"")
    if b"%00" not in query:
        return
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            param = unquote(name).replace("\x00", "")
            raise NulCharacter(
                f"Query parameter {param!r} contains a NUL character (%00); remove it.",
                param=param,
            )


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return False


class ClientGone(Exception):
    pass


async def _read(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class JsonBodyGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OWN_RULES_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            check_url(scope)
            if _is_json(scope) and body_limit(scope) is not None:
                body = await _read(receive)
                check_body(body)
                receive = _replay(body, receive)
        except ClientGone:
            return
        except AppError as exc:
            response: JSONResponse = await handlers.app_error(Request(scope), exc)
            await response(scope, receive, send)
            return
        except HTTPException as exc:  # the body-size limit
            response = await handlers.http_error(Request(scope), exc)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
