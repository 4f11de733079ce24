"""Pure ASGI middleware (no BaseHTTPMiddleware overhead) for every HTTP request:

- `AccountKeyMiddleware` gives each request an id, resolves a presented API key to a
  `Principal` and adds `x-request-id`, `x-aivax-account-id` and `x-aivax-key-id` to the response.
  It never refuses a request itself: endpoints declare what they need (see `dependencies`), so
  public routes such as `/healthz` work with or without a key.
- `BodySizeLimitMiddleware` refuses bodies over `max_body_bytes` with 413, whether announced by
  Content-Length or streamed in chunks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aivax.errors import AppError, PayloadTooLarge, ServiceUnavailable
from aivax.keys import service as key_service
from aivax.keys.schemas import ADMIN_TOKEN_PREFIX
from aivax.kit.crypto import token_hash
from aivax.services import AppServices

logger = logging.getLogger("aivax.auth")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def presented_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from `Authorization: Bearer …` or `x-api-key`, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if REQUEST_ID_PATTERN.match(candidate):
                return candidate
    return f"req_{os.urandom(16).hex()}"  # 128 random bits, like a UUIDv4 (which has 122)


async def identify(scope: Scope) -> list[tuple[bytes, bytes]]:
    """Give the request its id and resolve a presented API key into `scope["state"]`
    (`request_id`; `principal` or `auth_error`); the headers every response to it carries."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    state = scope.setdefault("state", {})
    request_id = _request_id(headers)
    state["request_id"] = request_id
    extra = [(b"x-request-id", request_id.encode())]
    token = presented_token(headers)
    if token is not None and not token.startswith(ADMIN_TOKEN_PREFIX):
        extra += await _resolve(scope["app"].state.services, token, state)
    return extra


async def _resolve(
    services: AppServices, token: str, state: dict[str, object]
) -> list[tuple[bytes, bytes]]:
    caches = services.caches
    try:
        # A cached key was well formed when it was cached: its format and checksum are
        # checked (before any I/O) only when the cache does not know it.
        digest = token_hash(services.secret, token)
        principal = caches.principals.get(digest) if caches.enabled else None
        if principal is None:
            key_service.checked_hash(token, services.secret)
            interval = timedelta(seconds=services.settings.key_touch_interval_seconds)
            async with services.database.sessions() as session:
                principal = await key_service.authenticate(
                    session, token, secret=services.secret, touch_interval=interval
                )
                await session.commit()
            if caches.enabled:
                caches.principals[digest] = principal
    except AppError as exc:
        state["auth_error"] = exc
        return []
    except SQLAlchemyError:
        logger.exception("database unavailable while checking an API key")
        state["auth_error"] = ServiceUnavailable(
            "The service cannot check API keys right now; retry shortly."
        )
        return []
    state["principal"] = principal
    return [
        (b"x-aivax-account-id", str(principal.account_id).encode()),
        (b"x-aivax-key-id", str(principal.key_id).encode()),
    ]


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send`, adding `extra` to the response's headers."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return send_with_headers


class AccountKeyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = await identify(scope)
        await self.app(scope, receive, with_headers(send, extra))


class RequestBodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parser re-raises it untouched."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"Request body is larger than the {limit}-byte limit (AIVAX_MAX_BODY_BYTES)."
        )


# The JSONL import streams its body and enforces the plan's import size itself; document
# uploads have their own limit (AIVAX_RAG_UPLOAD_MAX_BYTES) instead of AIVAX_MAX_BODY_BYTES.
OWN_BODY_LIMIT = re.compile(r"^/v1/collections/[^/]+/import$")
UPLOAD_PATH = re.compile(r"^/v1/collections/[^/]+/documents/upload$")


def body_limit(scope: Scope) -> int | None:
    """The most bytes a request's body may have (None: the route enforces its own)."""
    if OWN_BODY_LIMIT.match(scope["path"]):
        return None
    settings = scope["app"].state.services.settings
    limit: int = (
        settings.rag_upload_max_bytes
        if UPLOAD_PATH.match(scope["path"])
        else settings.max_body_bytes
    )
    return limit


def announced_too_large(scope: Scope, limit: int) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return True
    return False


def limited(receive: Receive, limit: int) -> Receive:
    """`receive` that raises `RequestBodyTooLarge` once the body passes `limit` bytes."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestBodyTooLarge(limit)
        return message

    return limited_receive


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = body_limit(scope) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        if announced_too_large(scope, limit):
            await send_413(send, limit)
            return
        await self.app(scope, limited(receive, limit), send)


async def send_413(send: Send, limit: int) -> None:
    error = PayloadTooLarge(
        f"Request body is larger than the {limit}-byte limit (AIVAX_MAX_BODY_BYTES)."
    )
    body = json.dumps(error.envelope()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
