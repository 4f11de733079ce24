"""`/v1/mcp/collections`: the account's collections as MCP tools (streamable HTTP, stateless,
JSON responses), built on the official `mcp` SDK.

Authenticated by a private AIVAX key (`Authorization: Bearer aivax_sk_…`): public keys are for
browser widgets calling public gateways, and this server can run account-billed reranker calls
and search any collection of the account. Configured per request by headers:
  x-aivax-collections   comma-separated collection ids (required)
  x-aivax-tool-name     the search tool's name (default `search_collections`)
  x-aivax-top-k         results per search (default 5, 1-50)
  x-aivax-min-score     minimum score in [0, 1] (default 0)
  x-aivax-mode          hybrid | vector | keyword (default hybrid)
  x-aivax-rerank        none | model:<chat model> | endpoint:<credential>:<model>
  x-aivax-allow-writes  true: also expose insert_document and delete_document

Errors about the HTTP request (key, headers, method) are the API's OpenAI error envelope; a body
the server does not take gets a JSON-RPC error with HTTP 400, as the MCP SDK answers other
malformed bodies: -32700 for text that is not UTF-8 JSON or nests past the API's limit, -32602
for a NUL character in a string.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import mcp.types as types
from fastapi import FastAPI
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import ValidationError
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from aivax.auth.dependencies import admitted_principal
from aivax.errors import AppError, BadRequest, Forbidden
from aivax.keys.schemas import KeyKind
from aivax.keys.service import Principal
from aivax.kit.jsonlimits import JsonTooDeep, NulCharacter, check_nul, loads_limited
from aivax.rag import documents, retrieval, service
from aivax.rag.schemas import DocumentCreate, RerankSpec, SearchRequest
from aivax.services import AppServices

PATH = "/v1/mcp/collections"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class McpConfig:
    def __init__(self, headers: dict[str, str]) -> None:
        raw = headers.get("x-aivax-collections", "")
        ids = [part.strip() for part in raw.split(",") if part.strip()]
        if not ids:
            raise BadRequest(
                "Name the collections in the 'x-aivax-collections' header (comma-separated ids).",
                param="x-aivax-collections",
            )
        self.collection_ids = ids[:20]
        self.tool_name = headers.get("x-aivax-tool-name", "search_collections")
        if not TOOL_NAME.match(self.tool_name):
            raise BadRequest(
                "x-aivax-tool-name must be 1-64 letters, digits, '_' or '-'.",
                param="x-aivax-tool-name",
            )
        self.top_k = _number(headers, "x-aivax-top-k", 5, int, 1, 50)
        self.min_score = _number(headers, "x-aivax-min-score", 0.0, float, 0.0, 1.0)
        self.mode = headers.get("x-aivax-mode", "hybrid")
        if self.mode not in ("hybrid", "vector", "keyword"):
            raise BadRequest(
                "x-aivax-mode must be hybrid, vector or keyword.", param="x-aivax-mode"
            )
        self.rerank = _rerank(headers.get("x-aivax-rerank", "none"))
        self.writes = headers.get("x-aivax-allow-writes", "false").lower() == "true"


def _number(
    headers: dict[str, str], name: str, default: Any, kind: Any, low: Any, high: Any
) -> Any:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise BadRequest(f"{name} must be a number from {low} to {high}.", param=name)
    return value


def _rerank(raw: str) -> RerankSpec | None:
    if raw in ("", "none"):
        return None
    kind, _, rest = raw.partition(":")
    try:
        if kind == "model":
            return RerankSpec(type="model", model=rest)
        if kind == "endpoint":
            credential, _, model = rest.partition(":")
            return RerankSpec(type="endpoint", credential=credential, model=model)
    except ValidationError:
        pass
    raise BadRequest(
        "x-aivax-rerank must be none, model:<chat model> or endpoint:<credential>:<model>.",
        param="x-aivax-rerank",
    )


def _search_tool(config: McpConfig) -> types.Tool:
    return types.Tool(
        name=config.tool_name,
        description=(
            "Search the knowledge base. Returns the most relevant passages with their source "
            "document, heading path and score (0-1)."
        ),
        inputSchema={
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 4000},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
                "filter": {"type": "object", "description": "Metadata filter."},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    )


WRITE_TOOLS = [
    types.Tool(
        name="insert_document",
        description="Add (or replace, by id) a document in a collection; it is indexed in the "
        "background.",
        inputSchema={
            "type": "object",
            "properties": {
                "collection_id": {"type": "string"},
                "text": {"type": "string", "minLength": 1},
                "id": {"type": "string"},
                "title": {"type": "string"},
                "metadata": {"type": "object"},
                "content_type": {"enum": ["text", "markdown", "html"]},
            },
            "required": ["text"],
            "additionalProperties": False,
        },
    ),
    types.Tool(
        name="delete_document",
        description="Delete a document (by its id or your own id) from a collection.",
        inputSchema={
            "type": "object",
            "properties": {
                "collection_id": {"type": "string"},
                "document_id": {"type": "string"},
            },
            "required": ["document_id"],
            "additionalProperties": False,
        },
    ),
]


def build_server(services: AppServices) -> Server[Any, Any]:
    server: Server[Any, Any] = Server("aivax-collections")

    def current() -> tuple[McpConfig, Principal, str]:
        request = server.request_context.request
        assert request is not None  # noqa: S101 - streamable HTTP always carries it
        state = request.scope["state"]
        principal: Principal = state["principal"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        return McpConfig(headers), principal, state["request_id"]

    @server.list_tools()  # type: ignore[no-untyped-call, untyped-decorator]
    async def list_tools() -> list[types.Tool]:
        config, _, _ = current()
        return [_search_tool(config), *(WRITE_TOOLS if config.writes else [])]

    @server.call_tool(validate_input=True)  # type: ignore[untyped-decorator]
    async def call_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        config, principal, request_id = current()
        try:
            if name == config.tool_name:
                return await _search(services, config, principal, arguments, request_id)
            if config.writes and name == "insert_document":
                return await _insert(services, config, principal, arguments)
            if config.writes and name == "delete_document":
                return await _delete(services, config, principal, arguments)
        except AppError as exc:
            raise ValueError(exc.message) from exc
        raise ValueError(f"Unknown tool {name!r}.")

    return server


async def _search(
    services: AppServices,
    config: McpConfig,
    principal: Principal,
    arguments: dict[str, Any],
    request_id: str,
) -> dict[str, Any]:
    try:
        request = SearchRequest(
            query=arguments["query"],
            top_k=arguments.get("top_k", config.top_k),
            min_score=config.min_score,
            mode=config.mode,
            filter=arguments.get("filter"),
            rerank=config.rerank,
        )
    except ValidationError as exc:
        raise BadRequest(f"Invalid search: {exc.errors()[0]['msg']}") from exc
    async with services.database.sessions() as session:
        collections = await retrieval.owned_collections(
            session, principal.account_id, config.collection_ids
        )
        response = await retrieval.run(
            services, session, principal, collections, request, request_id=request_id
        )
    return {
        "results": [
            {
                "text": r.text,
                "score": r.score,
                "document_id": str(r.document_id),
                "document_title": r.document_title,
                "heading_path": r.heading_path,
                "collection_id": str(r.collection_id),
                "metadata": r.metadata,
            }
            for r in response.data
        ]
    }


def _target(config: McpConfig, arguments: dict[str, Any]) -> str:
    target = arguments.get("collection_id") or config.collection_ids[0]
    if target not in config.collection_ids:
        raise BadRequest("collection_id must be one of the collections in x-aivax-collections.")
    return str(target)


async def _insert(
    services: AppServices, config: McpConfig, principal: Principal, arguments: dict[str, Any]
) -> dict[str, Any]:
    target = _target(config, arguments)
    try:
        data = DocumentCreate.model_validate(
            {k: v for k, v in arguments.items() if k != "collection_id"}
        )
    except ValidationError as exc:
        raise BadRequest(f"Invalid document: {exc.errors()[0]['msg']}") from exc
    async with services.database.sessions() as session:
        collection = await service.get_collection(session, principal.account_id, target)
        document, _ = await documents.create_document(
            services, session, principal, collection, documents.input_of(data)
        )
        await session.commit()
    return {"document_id": str(document.id), "status": document.status}


async def _delete(
    services: AppServices, config: McpConfig, principal: Principal, arguments: dict[str, Any]
) -> dict[str, Any]:
    target = _target(config, arguments)
    async with services.database.sessions() as session:
        collection = await service.get_collection(session, principal.account_id, target)
        document = await documents.get_document(session, collection, str(arguments["document_id"]))
        await documents.delete_document(session, collection, document)
        await session.commit()
    return {"deleted": True, "document_id": str(document.id)}


# Streamable HTTP (MCP 2025-03-26 and 2025-06-18, "Listening for Messages from the Server"):
# the server MUST answer a GET with text/event-stream or with 405 Method Not Allowed. This
# server sends nothing unprompted, so a GET stream would stay silent and open forever: 405.
# "Session Management": a server MAY answer the DELETE that ends a session with 405; a
# stateless server has no session to end. Every other method is not part of the transport.
NOT_POSTED = (
    "This MCP server is stateless and sends nothing unprompted: it offers no event stream "
    "(GET) and no session to end (DELETE). Send each JSON-RPC message with POST to {path}."
)


class MethodNotAllowed(AppError):
    status = 405
    code = "method_not_allowed"


class McpEndpoint:
    """Checks the key, the method and the headers, and that the body is JSON within the
    nesting limit, then hands the request to the MCP session manager."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = _request_error(scope)
        if error is not None:
            await _send_error(send, error)
            return
        body = await _read_body(receive)
        problem = _body_problem(body)
        if problem is not None:
            await _send_rpc_error(send, *problem)
            return
        manager: StreamableHTTPSessionManager = self.app.state.mcp_manager
        await manager.handle_request(scope, _replay(body, receive), send)


def _request_error(scope: Scope) -> AppError | None:
    """What is wrong with the request before its body is read: the caller (a private key of
    an active account, whatever the method, before any `x-aivax-*` header is looked at),
    then the method, then the headers."""
    state = scope.setdefault("state", {})
    try:
        principal = admitted_principal(state, _header(scope, b"origin"))
        if principal.key_kind is not KeyKind.PRIVATE:
            raise Forbidden(PRIVATE_KEY_REQUIRED, code="private_key_required")
        if scope["method"] != "POST":
            raise MethodNotAllowed(NOT_POSTED.format(path=PATH), headers={"allow": "POST"})
        McpConfig({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]})
    except AppError as exc:
        return exc
    return None


# The words every private-only endpoint answers a public key with.
PRIVATE_KEY_REQUIRED = (
    "This endpoint needs a private key (aivax_sk_…); public keys (aivax_pk_…) may only "
    "call public gateways."
)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes:
    """The whole body (the body-size middleware's `receive` raises past the limit: a 413)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _body_problem(body: bytes) -> tuple[int, str] | None:
    """The JSON-RPC error code and message for a body this server does not take (None: it
    takes it). The SDK's own parser raises on invalid UTF-8 and recurses on deep nesting,
    both a 500; orjson checks UTF-8 strictly and `loads_limited` stops at MAX_JSON_DEPTH
    levels. A tool call's arguments are part of the body, so they are held to the limit too
    (and a search filter to its grammar). NUL characters are refused as on every other route:
    PostgreSQL stores them in neither text nor JSON."""
    try:
        value = loads_limited(body)
    except JsonTooDeep as exc:
        return types.PARSE_ERROR, f"Parse error: {exc.message}"
    except ValueError as exc:
        return types.PARSE_ERROR, f"Parse error: the body is not valid UTF-8 JSON ({exc})."
    try:
        check_nul(value)
    except NulCharacter as exc:
        return types.INVALID_PARAMS, f"Invalid params: {exc.message}"
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the SDK the body already read, then waits on the client."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_rpc_error(send: Send, code: int, message: str) -> None:
    # JSON-RPC 2.0 section 5: a null id where the request's id could not be read (and none is
    # answered before the message is taken); HTTP 400 as the streamable HTTP transport
    # answers input it cannot accept.
    body = json.dumps(
        {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    ).encode()
    await _send_json(send, 400, body, [])


async def _send_error(send: Send, error: AppError) -> None:
    body = json.dumps(error.envelope()).encode()
    extra = [(k.encode(), v.encode()) for k, v in error.response_headers().items()]
    await _send_json(send, error.status, body, extra)


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


def mount_mcp(app: FastAPI) -> None:
    endpoint = McpEndpoint(app)
    # Every method reaches the endpoint, which answers all but POST with 405 (see NOT_POSTED).
    app.router.routes.append(Route(PATH, endpoint=endpoint, methods=None))


@contextlib.asynccontextmanager
async def running(app: FastAPI, services: AppServices) -> AsyncIterator[None]:
    """The session manager lives for the app's lifespan (stateless: no session is kept)."""
    manager = StreamableHTTPSessionManager(
        app=build_server(services), json_response=True, stateless=True
    )
    app.state.mcp_manager = manager
    async with manager.run():
        yield
