"""The HTTP/1.1 client for operator upstreams: asyncio protocols, httptools' response parser
(the parser uvicorn serves with), and a pool of keep-alive connections per origin.

Why not aiohttp's client: on every proxied call it built a request object, a response object,
a stream reader, a timer context, cookie and redirect bookkeeping — 225 µs of CPU per call on
the reference machine, against 77 µs for this client doing the same exchange
(docs/performance.md). The parsing, the part that is hard to get right, is httptools'.

What it does:
- POST with a body of known length; responses delimited by Content-Length, chunked, or the
  connection's close; gzip (which it asks for) and zlib-deflate bodies decoded;
  1xx interim responses skipped.
- Connections are reused (LIFO) while the upstream keeps them alive, dropped after
  `idle_seconds` unused, and never reused after a response that was not read to its end.
  At most `max_connections` are in use at once; further calls wait for one.
- TLS with the system's trust store, or the `ssl_context` given.
- `connect_timeout` bounds connecting; each call's `timeout` bounds every silence (waiting for
  the response head, and between two pieces of the body).
- Back-pressure: a caller that lags behind a streamed body stops the socket being read
  (`pause_reading`) until it catches up, so an upstream cannot fill the memory.
- Failures raise httpx's exception classes, like `HttpxUpstream`: `ConnectError`,
  `ConnectTimeout`, `ReadTimeout`, `RemoteProtocolError`, `UnsupportedProtocol`,
  `LocalProtocolError` (a header the request must not carry).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

from aivax import __version__
from aivax.providers.http import UpstreamResponse

# A lagging reader stops the socket being read above HIGH buffered bytes, resumes below LOW.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one response
MAX_IDLE_PER_ORIGIN = 100
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\0]")
# Headers the client sets itself from the request: a caller's value is ignored.
_OURS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]  # scheme, host, port: the pool key
    path: str
    host_header: str


class _Exchange:
    """One response as it arrives."""

    __slots__ = (
        "buffered",
        "chunks",
        "complete",
        "decoder",
        "delimited",
        "error",
        "head_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "status",
        "waiter",
    )

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.head_done = False
        self.delimited = False  # by Content-Length or chunked (else: by the connection's close)
        self.decoder: zlib._Decompress | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not registered as an `asyncio.Transport` subclass).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the upstream sent malformed HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is None or exchange.complete or exchange.error is not None:
            return
        if exchange.head_done and not exchange.delimited:
            self._finish_body(exchange, keep_alive=False)  # a body that ends with the close
            return
        if exchange.head_done:
            message = "the upstream closed the connection before the response ended"
        else:
            message = "the upstream closed the connection without answering"
        exchange.error = httpx.RemoteProtocolError(message)
        exchange.wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None  # noqa: S101 - data arrives only during an exchange
        exchange.head_bytes += len(name) + len(value) + 4
        if exchange.head_bytes > MAX_HEAD_BYTES:
            self._fail(httpx.RemoteProtocolError("the upstream's response headers are too large"))
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = exchange.headers.get(key)
        exchange.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None  # noqa: S101 - data arrives only during an exchange
        status = self.parser.get_status_code()
        if status < 200:  # an interim response: the real one follows
            exchange.headers = {}
            exchange.head_bytes = 0
            return
        exchange.status = status
        headers = exchange.headers
        exchange.delimited = "content-length" in headers or "chunked" in headers.get(
            "transfer-encoding", ""
        )
        if headers.get("content-encoding", "").strip().lower() in ("gzip", "x-gzip", "deflate"):
            exchange.decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # either header
        exchange.head_done = True
        exchange.wake()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None  # noqa: S101 - data arrives only during an exchange
        if exchange.decoder is not None:
            decoded = self._decoded(functools.partial(exchange.decoder.decompress, body))
            if decoded is None:
                return
            body = decoded
        self._add(exchange, body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None  # noqa: S101 - data arrives only during an exchange
        if not exchange.head_done:  # the end of an interim (1xx) response
            return
        self._finish_body(exchange, keep_alive=self.parser.should_keep_alive())

    # ours

    def _finish_body(self, exchange: _Exchange, *, keep_alive: bool) -> None:
        if exchange.decoder is not None:
            tail = self._decoded(exchange.decoder.flush)
            if tail is None:
                return
            self._add(exchange, tail)
        exchange.complete = True
        exchange.keep_alive = keep_alive
        exchange.wake()

    def _decoded(self, step: Callable[[], bytes]) -> bytes | None:
        """What a step of the body's decoder gives, or None when the body cannot be decoded
        (the exchange has failed)."""
        try:
            return step()
        except zlib.error as exc:
            self._fail(
                httpx.RemoteProtocolError(
                    f"the upstream's compressed body cannot be decoded: {exc}"
                )
            )
            return None

    def _add(self, exchange: _Exchange, data: bytes) -> None:
        """Buffer a piece of the body for the caller; stop reading the socket while the caller
        lags more than HIGH_WATER bytes behind."""
        if not data:
            return
        exchange.chunks.append(data)
        exchange.buffered += len(data)
        if exchange.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        exchange.wake()

    def _fail(self, error: Exception) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.error is None and not exchange.complete:
            exchange.error = error
            exchange.wake()
        self.close()

    def begin(self, exchange: _Exchange, head: bytes, body: bytes) -> None:
        assert self.transport is not None  # noqa: S101 - connected
        self.exchange = exchange  # the connection's parser goes on from the previous response
        self.transport.writelines((head, body))

    def taken(self, exchange: _Exchange, size: int) -> None:
        """The caller consumed `size` buffered bytes: read the socket again if it was paused."""
        exchange.buffered -= size
        if self.paused and exchange.buffered < LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def reusable(self, now: float, idle_seconds: float) -> bool:
        return (
            not self.closed
            and self.loop is asyncio.get_running_loop()
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < idle_seconds
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("the upstream did not answer in time"))


async def _wait(exchange: _Exchange, timeout: float) -> None:
    """Until the exchange has news (or `timeout` seconds of silence: ReadTimeout)."""
    loop = asyncio.get_running_loop()
    waiter = exchange.waiter = loop.create_future()
    timer = loop.call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        exchange.waiter = None


class Http1Upstream:
    """Operator upstreams' client (see the module docstring); `UpstreamHTTP` like the others."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        max_connections: int = 200,
        idle_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._heads: dict[tuple[_Target, tuple[tuple[str, str], ...]], bytes] = {}
        self._user_agent = f"aivax/{__version__}"
        self._closed = False

    @asynccontextmanager
    async def post(
        self, url: str, *, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> AsyncIterator[UpstreamResponse]:
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        target = self._target(url)
        head = self._head(target, headers, len(body))
        await self._slots.acquire()
        connection: _Connection | None = None
        exchange = _Exchange()
        try:
            connection = await self._checkout(target)
            connection.begin(exchange, head, body)
            while not exchange.head_done:
                if exchange.error is not None:
                    raise exchange.error
                await _wait(exchange, timeout)
            yield UpstreamResponse(
                exchange.status, exchange.headers, self._body(connection, exchange, timeout)
            )
        finally:
            self._release(target, connection, exchange)
            self._slots.release()

    async def _body(
        self, connection: _Connection, exchange: _Exchange, timeout: float
    ) -> AsyncIterator[bytes]:
        chunks = exchange.chunks
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(_drain(chunks))
                connection.taken(exchange, len(data))
                yield data
                continue
            if exchange.error is not None:
                raise exchange.error
            if exchange.complete:
                return
            await _wait(exchange, timeout)

    def _release(
        self, target: _Target, connection: _Connection | None, exchange: _Exchange
    ) -> None:
        if connection is None:
            return
        connection.exchange = None
        idle = self._idle.setdefault(target.origin, [])
        if (
            exchange.complete
            and exchange.keep_alive
            and not exchange.chunks
            and not connection.closed
            and not self._closed
            and len(idle) < MAX_IDLE_PER_ORIGIN
        ):
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:  # not read to its end, or not kept alive: never reused
            connection.close()

    async def _checkout(self, target: _Target) -> _Connection:
        idle = self._idle.get(target.origin)
        if idle:
            now = time.monotonic()
            while idle:
                connection = idle.pop()
                if connection.reusable(now, self.idle_seconds):
                    return connection
                connection.close()
        return await self._connect(target)

    async def _connect(self, target: _Target) -> _Connection:
        scheme, host, port = target.origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl or _default_ssl_context()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return protocol

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is not None:
            return target
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"cannot call {url!r}: only http(s) URLs")
        try:
            host = parts.hostname.encode("idna").decode("ascii")
            port = parts.port or (443 if scheme == "https" else 80)
        except (UnicodeError, ValueError) as exc:
            raise httpx.UnsupportedProtocol(f"cannot call {url!r}: {exc}") from exc
        shown = f"[{host}]" if ":" in host else host
        default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if _FORBIDDEN_IN_VALUE.search(path) or " " in path:
            raise httpx.UnsupportedProtocol(f"cannot call {url!r}: the path is not valid")
        target = _Target(
            origin=(scheme, host, port),
            path=path,
            host_header=shown if default else f"{shown}:{port}",
        )
        if len(self._targets) < 1024:
            self._targets[url] = target
        return target

    def _head(self, target: _Target, headers: Mapping[str, str], length: int) -> bytes:
        """The request head. All but its Content-Length is the same from call to call of one
        adapter (its credential, what it accepts), so that part is built once."""
        key = (target, tuple(headers.items()))
        prefix = self._heads.get(key)
        if prefix is None:
            fields = {
                "host": target.host_header,
                "user-agent": self._user_agent,
                "accept-encoding": "gzip",
                "content-type": "application/json",
            }
            for name, value in headers.items():
                if not _TOKEN.match(name) or _FORBIDDEN_IN_VALUE.search(value):
                    raise httpx.LocalProtocolError(f"header {name!r} cannot be sent as it is")
                if name.lower() not in _OURS:
                    fields[name.lower()] = value
            lines = [f"POST {target.path} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.items())]
            try:
                prefix = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
            except UnicodeEncodeError as exc:
                raise httpx.LocalProtocolError("a header value is not Latin-1 text") from exc
            if len(self._heads) < 256:
                self._heads[key] = prefix
        return prefix + b"%d\r\n\r\n" % length

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _drain(chunks: collections.deque[bytes]) -> list[bytes]:
    taken = list(chunks)
    chunks.clear()
    return taken


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()
