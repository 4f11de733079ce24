"""EventStreamResponse: the body stops, and its `finally` runs, whenever the client leaves —
whether the server says so on `receive` (ASGI 2.3, uvicorn) or by failing a send (ASGI 2.4)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aivax.kit.streaming import EventStreamResponse

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


def _body(log: list[str]) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)  # waiting for an upstream that never answers
            yield b"data: 2\n\n"
        finally:
            log.append("body closed")

    return body()


async def test_a_disconnect_on_receive_cancels_the_waiting_body() -> None:
    log: list[str] = []
    sent: list[dict[str, Any]] = []
    first_chunk = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body"):
            first_chunk.set()

    await asyncio.wait_for(EventStreamResponse(_body(log))(SCOPE, receive, send), timeout=5)
    assert log == ["body closed"]
    assert [m.get("body") for m in sent] == [None, b"data: 1\n\n"]


async def test_a_failed_send_closes_the_body() -> None:
    log: list[str] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")

    await asyncio.wait_for(EventStreamResponse(_body(log))(SCOPE, receive, send), timeout=5)
    assert log == ["body closed"]


async def test_a_complete_stream_ends_with_an_empty_last_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: only\n\n"

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStreamResponse(body())(SCOPE, receive, send)
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [
        (b"data: only\n\n", True),
        (b"", False),
    ]
