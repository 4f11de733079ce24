"""The HTTP client under the provider adapters: one small interface, two implementations.

- `AiohttpUpstream`: aiohttp directly, for operator upstreams (the hot path). httpx's request
  and response models, cookie handling and charset sniffing cost more CPU per proxied call than
  the rest of the pipeline (measured in bench/gateway.py, docs/performance.md).
- `HttpxUpstream`: an `httpx.AsyncClient`, for account-supplied (BYOK) URLs, whose transport is
  the SSRF guard, and for anything else that already has an httpx client.

Both raise httpx's exception classes (connect error, timeouts, broken stream), so an adapter has
one error taxonomy whatever it runs on. `sse_events` parses an event stream with httpx-sse's
decoders (comments, keep-alives, multi-line `data:`, `\\r\\n`/`\\r`/`\\n` line ends) over raw
chunks from either client.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiohttp
import httpx
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

ERROR_BODY_LIMIT = 64 * 1024


class UpstreamResponse:
    """Status, headers (case-insensitive) and the body as chunks, read once."""

    __slots__ = ("_chunks", "headers", "status")

    def __init__(
        self, status: int, headers: Mapping[str, str], chunks: AsyncIterator[bytes]
    ) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks

    def chunks(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first `limit` bytes (the rest is left unread)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self._chunks:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)[:limit]


class UpstreamHTTP(Protocol):
    def post(
        self, url: str, *, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> AbstractAsyncContextManager[UpstreamResponse]: ...

    async def aclose(self) -> None: ...


class HttpxUpstream:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @asynccontextmanager
    async def post(
        self, url: str, *, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> AsyncIterator[UpstreamResponse]:
        headers = {"content-type": "application/json", **headers}
        async with self.client.stream(
            "POST", url, content=body, headers=headers, timeout=timeout
        ) as response:
            # Decoded bytes (gzip and friends undone), like aiohttp's auto_decompress.
            yield UpstreamResponse(response.status_code, response.headers, response.aiter_bytes())

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpUpstream:
    """`connect_timeout` bounds the connection; `timeout` on each call bounds every read."""

    def __init__(self, *, connect_timeout: float, max_connections: int = 200) -> None:
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        # Built on first use: a ClientSession belongs to the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30)
            # No cookie jar: one session serves every account, and an upstream's cookies must
            # never travel with another caller's request (it also skips cookie work per call).
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    @asynccontextmanager
    async def post(
        self, url: str, *, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> AsyncIterator[UpstreamResponse]:
        limits = self._timeouts.get(timeout)
        if limits is None:
            limits = aiohttp.ClientTimeout(
                total=None, sock_connect=min(self.connect_timeout, timeout), sock_read=timeout
            )
            if len(self._timeouts) < 64:
                self._timeouts[timeout] = limits
        request = self._client().post(
            url,
            data=body,
            headers={"content-type": "application/json", **headers},
            timeout=limits,
            allow_redirects=False,
        )
        try:
            async with request as response:
                yield UpstreamResponse(response.status, response.headers, _body(response))
        except httpx.HTTPError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _as_httpx(exc) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _as_httpx(exc) from exc


def _as_httpx(exc: BaseException) -> httpx.HTTPError:
    """aiohttp's failure in httpx's terms (what the adapters handle)."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    return httpx.ReadError(message)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events from raw body chunks (UTF-8, split anywhere)."""
    text = codecs.getincrementaldecoder("utf-8")("replace")
    lines = SSELineDecoder()
    events = SSEDecoder()
    async for chunk in chunks:
        for line in lines.decode(text.decode(chunk)):
            event = events.decode(line)
            if event is not None:
                yield event
    # At the end, an event missing its closing blank line is still delivered (an upstream that
    # ends its last `data:` line without one must not lose, say, its usage chunk).
    tail = text.decode(b"", final=True)
    for line in [*(lines.decode(tail) if tail else []), *lines.flush(), ""]:
        event = events.decode(line)
        if event is not None:
            yield event
