"""Exception handlers: every error leaves as the OpenAI envelope, with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aivax.errors import AppError, error_envelope
from aivax.kit.jsonlimits import MAX_JSON_DEPTH

logger = logging.getLogger("aivax.errors")

HTTP_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)  # noqa: S101 - registered for AppError only
    return _json(exc.status, exc.envelope(), exc.response_headers())


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for it only
    type_, code = HTTP_ERROR_KINDS.get(exc.status_code, ("invalid_request_error", "http_error"))
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"Unknown path: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        # The standard JSON parser gives up on nesting deeper than the interpreter's stack.
        message = _too_deep_message()
        type_, code = "invalid_request_error", "json_too_deep"
    elif exc.status_code == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, ValueError)):
        # FastAPI's body parser wraps decoding failures in a bare "error parsing the body".
        message = f"The request body is not valid UTF-8 JSON: {exc.__cause__}."
        type_, code = "invalid_request_error", "invalid_json"
    else:
        message = str(exc.detail)
    return _json(
        exc.status_code,
        error_envelope(message, type_=type_, code=code),
        dict(exc.headers or {}),
    )


# Tag values of the discriminated unions in request bodies (message roles, content-part
# types): pydantic puts them in error locations right after a list index.
UNION_TAGS = frozenset(
    {
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "text",
        "image_url",
        "input_audio",
        "file",
    }
)
BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _clean_location(location: tuple[Any, ...]) -> list[str]:
    """Field names and indexes only: no union branch names or discriminator tags."""
    parts: list[str] = []
    previous: Any = None
    for part in location[1:]:
        if isinstance(part, str) and (
            "[" in part
            or part in BRANCH_NAMES
            or (isinstance(previous, int) and part in UNION_TAGS)
        ):
            previous = part
            continue
        parts.append(str(part))
        previous = part
    return parts


# Pydantic's type errors → the JSON type the field expects, in OpenAI's words.
EXPECTED_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "float_type": "a number",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
}


def _json_type(value: Any) -> str:
    """The JSON type of a parsed value, as OpenAI names it in `invalid_type` messages."""
    if value is None:
        return "null"
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a decimal number"),
        (str, "a string"),
        (dict, "an object"),
        (list, "an array"),
    ):
        if isinstance(value, kind):
            return name
    return "a value of another type"


def _too_deep_message() -> str:
    return f"The request body is nested more than {MAX_JSON_DEPTH} levels deep; flatten it."


def _param(location: tuple[Any, ...]) -> str | None:
    return ".".join(_clean_location(location)) or None


def _most_specific(errors: list[Any]) -> Any:
    """A union reports one error per branch; the deepest one says what is really wrong."""
    return max(errors, key=lambda error: len(_clean_location(tuple(error.get("loc", ())))))


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    """Schema errors are 400 like OpenAI's; a bad id in the path is simply not found (404)."""
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it only
    errors = list(exc.errors())
    first = errors[0] if errors[0].get("loc", ("",))[0] == "path" else _most_specific(errors)
    location = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    param = _param(location)
    if location and location[0] == "path":
        return _json(
            404,
            error_envelope(
                f"No object with {param} {first.get('input')!r}.",
                type_="not_found_error",
                code="not_found",
                param=param,
            ),
        )
    message, code = _describe(first, kind, param)
    return _json(
        400, error_envelope(message, type_="invalid_request_error", code=code, param=param)
    )


def _describe(error: Any, kind: str, param: str | None) -> tuple[str, str]:
    """The message and code of one body or query error (`param` None: the whole body)."""
    where = repr(param) if param is not None else "the request body"
    if kind == "json_invalid":
        reason = str(error.get("ctx", {}).get("error"))
        if "recursion limit" in reason:
            return _too_deep_message(), "json_too_deep"
        return f"The request body is not valid JSON: {reason}", "invalid_json"
    if kind == "json_too_deep":
        return f"Invalid value for {where}: {error.get('msg')}", "json_too_deep"
    if kind in EXPECTED_TYPES:
        return (
            f"Invalid type for {where}: expected {EXPECTED_TYPES[kind]}, but got "
            f"{_json_type(error.get('input'))} instead.",
            "invalid_type",
        )
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}.", "unknown_parameter"
    if kind == "missing":
        return f"Missing required parameter: {where}.", "missing_required_parameter"
    return f"Invalid value for {where}: {error.get('msg')}.", "invalid_value"


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "unknown")
    logger.error(
        "unhandled error in %s %s (%s)", request.method, request.url.path, request_id, exc_info=exc
    )
    message = (
        "The server had an error while processing your request. Retry, and quote request id "
        f"{request_id} if the error persists."
    )
    return _json(
        500,
        error_envelope(message, type_="server_error", code="internal_error"),
        {"x-request-id": request_id},
    )


class HandledErrors:
    """Answers an unexpected exception with the 500 envelope and keeps the connection.

    Starlette's outermost error middleware re-raises after its 500 so that the server logs the
    exception, and uvicorn then closes the connection: every keep-alive client pays a new
    connection for one failed request. The exception is logged here instead (with the request
    id), so it stops here. Only an exception after the response started goes on: that response
    is cut short, and closing the connection is the only way to tell the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            response = await unexpected_error(Request(scope), exc)
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
