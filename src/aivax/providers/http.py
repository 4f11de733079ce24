"""The HTTP client under the provider adapters: one small interface, two implementations.

- `Http1Upstream` (`providers.http1`): for operator upstreams (the hot path), on asyncio
  protocols and httptools. httpx's request and response models, and then aiohttp's, cost more
  CPU per proxied call than large parts of the pipeline (measured in bench/gateway.py,
  docs/performance.md).
- `HttpxUpstream`: an `httpx.AsyncClient`, for account-supplied (BYOK) URLs, whose transport is
  the SSRF guard, and for anything else that already has an httpx client.

Both raise httpx's exception classes (connect error, timeouts, broken stream), so an adapter has
one error taxonomy whatever it runs on. `sse_batches` parses an event stream with httpx-sse's
decoders (comments, keep-alives, multi-line `data:`, `\\r\\n`/`\\r`/`\\n` line ends) over raw
chunks from either client.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import httpx
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


class EventStreamDecoder:
    """Server-sent events from raw body chunks (UTF-8, split anywhere), as they complete, each
    as its (type, data): a plain object fed chunk by chunk, so reading a stream costs no
    generator per event.

    Chunks made only of whole events of one `data: ` line each, after an optional `event: `
    line (what OpenAI-compatible servers and Anthropic send), are split directly. From the first
    chunk that is anything else (a comment, another field, a `\\r`, an event split across
    chunks, invalid UTF-8), that chunk and the rest of the stream go through httpx-sse's
    decoders. Both give the same events for the same bytes (tests/providers/test_providers.py)."""

    def __init__(self) -> None:
        self._plain = True  # every chunk so far was whole events: nothing is buffered

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The events that `chunk` completes."""
        if self._plain:
            whole = _whole_events(chunk)
            if whole is not None:
                return whole
            self._plain = False
            self._text = codecs.getincrementaldecoder("utf-8")("replace")
            self._lines = SSELineDecoder()
            self._events = SSEDecoder()
        found = []
        for line in self._lines.decode(self._text.decode(chunk)):
            event = self._events.decode(line)
            if event is not None:
                found.append((event.event, event.data))
        return found

    def end(self) -> list[tuple[str, str]]:
        """At the end of the body: an event missing its closing blank line is still delivered
        (an upstream that ends its last `data:` line without one must not lose, say, its usage
        chunk)."""
        if self._plain:
            return []
        tail = self._text.decode(b"", final=True)
        found = []
        for line in [*(self._lines.decode(tail) if tail else []), *self._lines.flush(), ""]:
            event = self._events.decode(line)
            if event is not None:
                found.append((event.event, event.data))
        return found


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[str, str]]]:
    """`EventStreamDecoder` over a body: the events each chunk completes, as one list (so a
    chunk costs one step of this generator, not one per event), then those its end completes.
    The body is always read to its end."""
    decoder = EventStreamDecoder()
    async for chunk in chunks:
        if events := decoder.feed(chunk):
            yield events
    if events := decoder.end():
        yield events


def _whole_events(chunk: bytes) -> list[tuple[str, str]] | None:
    """The events of `chunk` if it is nothing but whole events of one `data: ` line, each after
    an optional `event: ` line, with `\\n` line ends and valid UTF-8; else None."""
    if not chunk.endswith(b"\n\n") or b"\r" in chunk:
        return None
    found = []
    try:
        for block in chunk[:-2].split(b"\n\n"):
            if block[:6] != b"data: ":
                name, _, block = block.partition(b"\n")
                if name[:7] != b"event: " or block[:6] != b"data: " or b"\n" in block:
                    return None
                found.append((name[7:].decode() or "message", block[6:].decode()))
            elif b"\n" in block:
                return None
            else:
                found.append(("message", block[6:].decode()))
    except UnicodeDecodeError:
        return None
    return found
