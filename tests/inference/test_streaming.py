"""EventStreamResponse: the body stops, and its `finally` runs, whenever the client leaves —
whether the server says so on `receive` (ASGI 2.3, uvicorn) or by failing a send (ASGI 2.4).
Chunks ready together leave in one send, and a chunk alone is never held back
(`in_ready_batches`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aivax.kit.streaming import EventStreamResponse, in_ready_batches

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.3"}}


async def _client_stays() -> dict[str, Any]:
    await asyncio.sleep(60)
    return {"type": "http.disconnect"}


async def _bodies_sent(body: AsyncIterator[bytes]) -> list[tuple[bytes, bool]]:
    """(body, more_body) of each body message the response sends to a client that stays."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStreamResponse(body)(SCOPE, _client_stays, send)
    return [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]


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


async def test_a_stream_over_before_the_watcher_starts_never_waits_on_the_client() -> None:
    """The disconnect watcher (a task) starts only once the stream has run for a while: a
    stream from a fast upstream ends first and costs no task."""
    received: list[str] = []

    async def receive() -> dict[str, Any]:
        received.append("receive")
        return await _client_stays()

    async def body() -> AsyncIterator[bytes]:
        for number in range(3):
            await asyncio.sleep(0)  # the event loop runs other tasks between chunks
            yield f"data: {number}\n\n".encode()

    async def send(message: dict[str, Any]) -> None:
        pass

    await asyncio.wait_for(EventStreamResponse(body())(SCOPE, receive, send), timeout=5)
    assert received == []


async def test_a_failed_send_closes_the_body() -> None:
    log: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")

    response = EventStreamResponse(_body(log))
    await asyncio.wait_for(response(SCOPE, _client_stays, send), timeout=5)
    assert log == ["body closed"]


async def test_a_complete_stream_ends_with_its_last_chunk() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: only\n\n"

    assert await _bodies_sent(body()) == [(b"data: only\n\n", False)]


async def test_a_stream_that_ends_after_a_wait_ends_with_an_empty_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.sleep(0.01)

    assert await _bodies_sent(body()) == [(b"data: 1\n\n", True), (b"", False)]


async def test_chunks_ready_together_leave_together() -> None:
    upstream = asyncio.Queue[list[str]]()

    async def source() -> AsyncIterator[str]:
        while (read := await upstream.get()) != ["end"]:
            for event in read:  # one network read, several events
                yield event

    delivered: list[tuple[list[str], bool]] = []

    async def deliver(batch: list[str], last: bool) -> None:
        delivered.append((batch, last))
        if len(delivered) == 1:
            upstream.put_nowait(["c", "d"])
            upstream.put_nowait(["e"])
        elif len(delivered) == 2:
            upstream.put_nowait(["end"])

    upstream.put_nowait(["a", "b"])
    await asyncio.wait_for(in_ready_batches(source(), deliver), timeout=5)
    assert delivered == [(["a", "b"], False), (["c", "d", "e"], False), ([], True)]


async def test_a_chunk_alone_is_not_held_back_for_the_next() -> None:
    answered = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "question"
        await answered.wait()  # the next chunk comes only after the first was delivered
        yield "answer"

    delivered: list[tuple[list[str], bool]] = []

    async def deliver(batch: list[str], last: bool) -> None:
        delivered.append((batch, last))
        answered.set()

    await asyncio.wait_for(in_ready_batches(source(), deliver), timeout=5)
    assert delivered == [(["question"], False), (["answer"], True)]


async def test_a_delivery_that_fails_ends_the_waiting_source_at_once() -> None:
    log: list[str] = []

    async def deliver(batch: list[bytes], last: bool) -> None:
        raise OSError("client gone")

    with pytest.raises(OSError, match="client gone"):
        await asyncio.wait_for(in_ready_batches(_body(log), deliver), timeout=5)
    assert log == ["body closed"]  # not left for the garbage collector


async def test_cancelled_while_delivering_ends_the_waiting_source_with_the_cancellation() -> None:
    log: list[str] = []
    stuck = asyncio.Event()

    async def deliver(batch: list[bytes], last: bool) -> None:
        stuck.set()
        await asyncio.sleep(60)  # a slow client

    task = asyncio.ensure_future(in_ready_batches(_body(log), deliver))
    await stuck.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert log == ["body closed"]


async def test_cancelled_while_the_source_waits() -> None:
    log: list[str] = []
    delivered: list[list[bytes]] = []

    async def deliver(batch: list[bytes], last: bool) -> None:
        delivered.append(batch)

    task = asyncio.ensure_future(in_ready_batches(_body(log), deliver))
    while not delivered:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)  # the source is now waiting for its upstream
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert task.cancelled()
    assert log == ["body closed"]
    assert delivered == [[b"data: 1\n\n"]]


async def test_an_error_of_the_source_reaches_the_caller() -> None:
    async def source() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(0)
        raise ValueError("upstream broke")

    async def deliver(batch: list[str], last: bool) -> None:
        return None

    with pytest.raises(ValueError, match="upstream broke"):
        await in_ready_batches(source(), deliver)
