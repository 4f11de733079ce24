"""The thinnest proxy this stack allows, for benchmarks (run as its own process).

The same HTTP server (uvicorn with httptools and uvloop) and upstream client (AIVAX's own
`Http1Upstream`, pooled keep-alive connections) as AIVAX, with nothing in between: the request
body is forwarded as it came and the upstream's answer is returned as it came. No key check, no
parsing, no rate limits, no wallet, no log. What it costs per call is what any Python proxy on
this stack costs before doing any work of its own, so its row in `make bench` is the ceiling for
AIVAX's figures.

Usage: bare_proxy.py PORT UPSTREAM_ORIGIN
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from aivax.providers.http1 import Http1Upstream

UPSTREAM = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:8080"
_client: Http1Upstream | None = None


async def _lifespan(receive: Any, send: Any) -> None:
    global _client
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _client = Http1Upstream(connect_timeout=5)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _client is not None:
                await _client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    assert _client is not None  # set at startup
    async with _client.post(UPSTREAM + scope["path"], headers={}, body=body, timeout=60) as up:
        content_type = up.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": up.status,
                "headers": [(b"content-type", content_type)],
            }
        )
        async for chunk in up.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
