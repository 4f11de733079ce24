"""A minimal, fast OpenAI-compatible upstream for benchmarks (run as its own process).

Answers `POST /v1/chat/completions` with a fixed 5-token reply, streamed (with a usage chunk)
or not, with no artificial delay, so what a benchmark measures is the proxy in front of it.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

WORDS = ["The", " answer", " is", " forty", "-two"]
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "".join(WORDS)},
            }
        ],
        "usage": USAGE,
    }
).encode()


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        *(_chunk({"content": word}) for word in WORDS),
        _chunk({}, "stop"),
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "mock",
                "choices": [],
                "usage": USAGE,
            }
        ).encode()
        + b"\n\n",
        b"data: [DONE]\n\n",
    ]
)


async def chat(request: Request) -> Response:
    body = await request.json()
    if body.get("stream"):

        async def parts() -> object:
            yield STREAM

        return StreamingResponse(parts(), media_type="text/event-stream")  # type: ignore[arg-type]
    return Response(COMPLETION, media_type="application/json")


async def models(_: Request) -> Response:
    return Response(
        b'{"object":"list","data":[{"id":"mock","object":"model"}]}', media_type="application/json"
    )


app = Starlette(
    routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
