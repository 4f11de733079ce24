"""`EventStreamResponse`: a streamed response that stops its producer when the client leaves.

Starlette's `StreamingResponse` watches for the client's disconnect with an anyio task group
around every response; on the chat hot path that bookkeeping cost more CPU than streaming the
body itself. This response runs the body in the request's own task and watches the connection
with one plain asyncio task. When the client disconnects, the body's generator is cancelled at
the point where it waits (for the upstream, typically), so its `finally` blocks run — the
pipeline settles what was generated — and the response ends quietly. A server that reports the
disconnect by failing a send (ASGI 2.4) gets the same: the body is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        streaming = asyncio.current_task()
        assert streaming is not None  # noqa: S101 - always called from a task
        state = {"done": False, "gone": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:
                state["gone"] = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.body_iterator:
                if not isinstance(chunk, bytes | memoryview):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            streaming.uncancel()
        except OSError:
            # A server on ASGI 2.4 reports a client that left by failing the send: stop the
            # body now, so its `finally` blocks run (rather than whenever it is collected).
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
        finally:
            state["done"] = True
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self.background is not None:
            await self.background()
