"""What single steps of the chat hot path cost warm (in a loop) and cold (after the CPU caches
were flushed), in-process, no server.

At concurrency 1 the driver and the mock upstream run between two calls of AIVAX's server, so
each call starts with caches that hold their code and data, not the server's: every step then
costs several times what it costs in a loop. This script shows by how much, step by step; it is
why `make bench`'s concurrency-1 rows cannot be read from loop timings (docs/performance.md).

Run: `make bench-cold` (about 15 s).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson

from aivax.inference.ratelimit import RateLimiter
from aivax.inference.schemas import ChatCompletionRequest
from aivax.inference.tokens import count_text
from aivax.kit.crypto import generate_token, token_hash

RUNS = 300
EVICT_BYTES = 32 * 1024 * 1024  # larger than this machine's last-level cache
BODY = orjson.dumps(
    {
        "model": "bench/mock",
        "messages": [{"role": "user", "content": "What is the answer?"}],
        "max_tokens": 16,
    }
)
COMPLETION = {
    "id": f"chatcmpl-{uuid.uuid4().hex}",
    "object": "chat.completion",
    "created": 1,
    "model": "bench/mock",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "The answer is forty-two"},
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}

_junk = bytearray(EVICT_BYTES)
_copy = bytearray(EVICT_BYTES)


def evict() -> None:
    """Copy a buffer larger than the caches into another (memmove, no allocation)."""
    _copy[:] = _junk


async def median_us(step: Callable[[], Awaitable[object]], *, cold: bool) -> float:
    timings = []
    for _ in range(RUNS):
        if cold:
            evict()
        started = time.perf_counter()
        await step()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def sync(function: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return function()

    return run


async def main() -> None:
    secret, token = b"s" * 32, generate_token("sk-aivax-")
    limiter = RateLimiter(None)
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        (
            "request validation (pydantic-core)",
            sync(lambda: ChatCompletionRequest.model_validate_json(BODY)),
        ),
        ("key hash (HMAC-SHA256)", sync(lambda: token_hash(secret, token))),
        ("input-token count (tiktoken)", sync(lambda: count_text("What is the answer?"))),
        ("two rate-limit hits (limits)", lambda: _two_hits(limiter)),
        ("response JSON (orjson)", sync(lambda: orjson.dumps(COMPLETION))),
        ("an empty step (the timer itself)", sync(lambda: None)),
    ]
    print(f"{'step':<36} {'warm us':>8} {'cold us':>8} {'cold/warm':>9}")
    for name, step in steps:
        warm = await median_us(step, cold=False)
        cold = await median_us(step, cold=True)
        print(f"{name:<36} {warm:>8.1f} {cold:>8.1f} {cold / max(warm, 0.01):>8.1f}x", flush=True)
    print("\n(medians of", RUNS, "runs; the empty step is the floor every cold step pays)")


async def _two_hits(limiter: RateLimiter) -> object:
    await limiter.hit_requests("account:model", 100_000_000)
    return await limiter.hit_tokens("account:model:tokens", 1_000_000_000, 12)


if __name__ == "__main__":
    asyncio.run(main())
