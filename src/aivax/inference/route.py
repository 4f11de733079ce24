"""`POST /v1/chat/completions` served straight from ASGI, ahead of FastAPI's routing.

The chat route is the hot path of every proxied call. FastAPI's per-request machinery (route
matching over every route, dependency solving, the JSON body parsed in Python and then
validated, exception middleware and exit stacks) cost about as much CPU as the whole
pipeline behind it (bench/gateway.py, docs/performance.md). `ChatRoute` sits inside the
request-id/key and body-size middlewares, so it sees the same caller and limits as every other
route, and then does only what this route needs:

- the caller from the scope's state (`admitted_principal`, the same check as `AnyKey`);
- the body read whole and parsed and validated in one step by pydantic-core
  (`model_validate_json`);
- `endpoints.respond`, the same function the FastAPI route calls;
- errors rendered by the application's own exception handlers, so every refusal has the
  envelope, status and headers it has on any other route. Anything unexpected propagates to
  the server-error handler, as it would from a FastAPI route.

When no telemetry is configured, `ChatLane` goes one step further and takes the route before
Starlette's middleware stack altogether, doing the middlewares' part for it with their own
functions (see its docstring); `ChatRoute` then serves inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aivax import handlers
from aivax.auth.dependencies import admitted_principal
from aivax.auth.middleware import (
    announced_too_large,
    body_limit,
    identify,
    limited,
    send_413,
    with_headers,
)
from aivax.bodyguard import reject_nul
from aivax.errors import AppError
from aivax.inference.endpoints import respond
from aivax.inference.schemas import ChatCompletionRequest
from aivax.services import AppServices

logger = logging.getLogger("aivax.inference")

PATH = "/v1/chat/completions"


def takes(scope: Scope) -> bool:
    """Whether `scope` is a request for the chat route."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path: str = scope["path"]
    return path[len(scope.get("root_path", "")) :] == PATH


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class ChatRoute:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not takes(scope):
            await self.app(scope, receive, send)
            return
        meter = scope["app"].state.services.meter
        meter.calls_in_flight += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            meter.calls_in_flight -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._respond(scope, receive)
        except ClientGone:
            logger.debug("client left before sending its request body")
            return
        except AppError as exc:
            response = await handlers.app_error(Request(scope), exc)
        except HTTPException as exc:  # the body-size limit
            response = await handlers.http_error(Request(scope), exc)
        except ValidationError as exc:
            errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
            response = await handlers.validation_error(
                Request(scope), RequestValidationError(errors)
            )
        await response(scope, receive, send)

    @staticmethod
    async def _respond(scope: Scope, receive: Receive) -> Response:
        services: AppServices = scope["app"].state.services
        state = scope["state"]
        origin = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
                break
        principal = admitted_principal(state, origin)
        raw = await _read_body(receive)
        reject_nul(raw)
        body = ChatCompletionRequest.model_validate_json(raw)
        return await respond(services, principal, body, state["request_id"], origin)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class ChatLane:
    """`POST /v1/chat/completions` taken before Starlette's middleware stack, doing itself what
    the stack would do for it, with the same code: the request id and the caller
    (`auth.middleware.identify`), the body-size limit, CORS (the headers `CORSMiddleware`
    adds for any origin), and the server-error handler for anything unexpected (the 500
    envelope, then the exception goes on to the server's log). Starlette's application, its
    error and CORS middlewares and three wrapped `send`s cost about a tenth of a call's CPU
    (docs/performance.md). Used only when no telemetry is configured: FastAPI's telemetry
    middleware stays in the stack, and with it `ChatRoute`. As `handlers.HandledErrors` does
    in the stack, an unexpected exception answered with the 500 envelope stops here (the
    handler logged it), so the connection stays open; one after the response started goes on.
    """

    def __init__(self, route: ChatRoute, cors_headers: Mapping[str, str]) -> None:
        self.route = route
        self.cors = [(k.lower().encode(), v.encode()) for k, v in cors_headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra = await identify(scope)
        if any(name == b"origin" for name, _ in scope["headers"]):
            extra += self.cors
        extra.append((b"vary", b"Origin"))
        started = False
        send_extra = with_headers(send, extra)

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_extra(message)

        limit = body_limit(scope)
        assert limit is not None  # noqa: S101 - the chat path has the general limit
        if announced_too_large(scope, limit):
            await send_413(tracked, limit)
            return
        try:
            await self.route(scope, limited(receive, limit), tracked)
        except Exception as exc:
            if started:
                raise
            # As from the stack's outermost middleware: its own headers only.
            response = await handlers.unexpected_error(Request(scope), exc)
            await response(scope, receive, send)
