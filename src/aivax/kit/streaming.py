"""`EventStreamResponse`: a streamed response that stops its producer when the client leaves.

Starlette's `StreamingResponse` watches for the client's disconnect with an anyio task group
around every response; on the chat hot path that bookkeeping cost more CPU than streaming the
body itself. This response runs the body in the request's own task and watches the connection
with one plain asyncio task, started only once the stream has run for
`WATCH_AFTER_SECONDS` (most streams from a fast upstream are over by then). When the client
disconnects, the body's generator is cancelled at
the point where it waits (for the upstream, typically), so its `finally` blocks run — the
pipeline settles what was generated — and the response ends quietly. A server that reports the
disconnect by failing a send (ASGI 2.4) gets the same: the body is closed at once.

Chunks the body has ready together leave in one send (`in_ready_batches`): an upstream that
delivers several events in one network read costs one write to the client, not one per event,
and a chunk that is alone is sent at once, never held back for the next. The last chunk ends
the body in the same send.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable, Generator
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

# The disconnect watcher starts this long after the response: most streams from a fast
# upstream are over by then and never need the task; a client that leaves before it starts is
# seen as soon as it does (the server remembers the disconnect).
WATCH_AFTER_SECONDS = 0.05


class _Drive:
    """Awaiting it finishes `step` — an awaitable's iterator that already ran up to its first
    suspension, which yielded `waiting` — exactly as the task would have driven it (what the
    task sends or throws goes on to `step`); with `error`, that is thrown into `step` first."""

    def __init__(self, step: Any, waiting: Any, error: BaseException | None = None) -> None:
        self.step = step
        self.waiting = waiting
        self.error = error

    def __await__(self) -> Generator[Any, Any, Any]:
        try:
            waiting = self.waiting if self.error is None else self.step.throw(self.error)
            while True:
                try:
                    sent = yield waiting
                except GeneratorExit:
                    self.step.close()
                    raise
                except BaseException as exc:  # cancellation, above all: it belongs to `step`
                    waiting = self.step.throw(exc)
                else:
                    waiting = self.step.send(sent)
        except StopIteration as done:
            return done.value


async def in_ready_batches(
    source: AsyncIterable[T], deliver: Callable[[list[T], bool], Awaitable[None]]
) -> None:
    """Pass the items of `source` to `deliver` in lists of the items that were ready together:
    each next item is taken at once if `source` can give it without waiting, and as soon as it
    would wait, what is ready is delivered first. `deliver`'s flag says the list is the last
    (`source` is exhausted). If `deliver` fails, `source` is mid-step: the same error is thrown
    into it there, so its cleanup runs now rather than whenever it is collected."""
    items = aiter(source)
    batch: list[T] = []
    while True:
        step = items.__anext__().__await__()
        try:
            waiting = step.send(None)
        except StopIteration as ready:
            batch.append(ready.value)
            continue
        except StopAsyncIteration:
            await deliver(batch, True)
            return
        if batch:
            try:
                await deliver(batch, False)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    await _Drive(step, waiting, exc)
                raise
            batch = []
        try:
            item = await _Drive(step, waiting)
        except StopAsyncIteration:
            await deliver([], True)
            return
        batch.append(item)


class _DisconnectWatch:
    """Cancels `task` when the client disconnects, from `WATCH_AFTER_SECONDS` on."""

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.receive = receive
        self.done = False  # the response is complete: a disconnect now changes nothing
        self.gone = False  # the client left, and `task` was cancelled for it
        self._watcher: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, self._start)

    def _start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.done:
            self.gone = True
            self.task.cancel()

    async def stop(self) -> None:
        self.done = True
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher


class EventStreamResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        streaming = asyncio.current_task()
        assert streaming is not None  # noqa: S101 - always called from a task
        watch = _DisconnectWatch(streaming, receive)

        async def deliver(chunks: list[Any], last: bool) -> None:
            body = b"".join(
                c if isinstance(c, bytes | memoryview) else c.encode(self.charset) for c in chunks
            )
            if last:
                watch.done = True
            await send({"type": "http.response.body", "body": body, "more_body": not last})

        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await in_ready_batches(self.body_iterator, deliver)
        except asyncio.CancelledError:
            if not watch.gone:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            streaming.uncancel()
        except OSError:
            # A server on ASGI 2.4 reports a client that left by failing the send: stop the
            # body now, so its `finally` blocks run (rather than whenever it is collected).
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
        finally:
            await watch.stop()
        if self.background is not None:
            await self.background()
