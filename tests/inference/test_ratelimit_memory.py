"""The in-process rate-limit storage: no hit starts the library's sweep task (which walks every
key on every hit); the same hook drops expired counters in place, at most once a second. And
the limiter reads a busy limit's window at most once a tenth of a second."""

from __future__ import annotations

import inspect
import time
from typing import Any

import pytest
from limits.aio.storage import MemoryStorage

from aivax.inference.ratelimit import RateLimiter, SweptMemoryStorage


def test_the_override_still_replaces_the_libraries_sweep() -> None:
    """The pinned `limits` schedules its sweep from `incr` through this private name; if a new
    version renames it, the override would silently stop working, so fail here instead."""
    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    incr = inspect.unwrap(MemoryStorage.incr)  # the library wraps it to translate errors
    assert "_MemoryStorage__schedule_expiry" in incr.__code__.co_names


async def test_hits_schedule_no_sweep_and_stay_exact() -> None:
    limiter = RateLimiter(None)
    storage = limiter.storage
    assert isinstance(storage, SweptMemoryStorage)
    for n in range(3):
        decision = await limiter.hit_requests("rpm:account:model", 3)
        assert (decision.allowed, decision.remaining) == (True, 2 - n)
    refused = await limiter.hit_requests("rpm:account:model", 3)
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert storage.timer is None  # the library's per-hit sweep task was never created


async def test_expired_counters_are_dropped_once_a_second() -> None:
    limiter = RateLimiter(None)
    storage = limiter.storage
    assert isinstance(storage, SweptMemoryStorage)
    for account in range(50):
        await limiter.hit_requests(f"rpm:{account}:model", 10)
    assert len(storage.storage) == 50
    for key in list(storage.expirations)[:40]:
        storage.expirations[key] = time.time() - 1  # these windows have passed
    await limiter.hit_requests("rpm:fresh:model", 10)
    assert len(storage.storage) == 51  # swept less than a second ago: nothing dropped yet
    storage.swept_at -= SweptMemoryStorage.SWEEP_SECONDS
    await limiter.hit_requests("rpm:fresh:model", 10)
    assert len(storage.storage) == 11
    assert set(storage.expirations) == set(storage.storage)


async def test_a_busy_limits_window_is_read_once_a_tenth_of_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every hit is counted; the window's state for the headers is read afresh only when this
    process has not read it in the last tenth of a second, or when the hit is refused."""
    from aivax.inference import ratelimit

    limiter = RateLimiter(None)
    reads = 0
    read = limiter._strategy.get_window_stats

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read(*args, **kwargs)

    monkeypatch.setattr(limiter._strategy, "get_window_stats", counted)
    clock = [1_000.0]
    limiter.clock = lambda: clock[0]
    remaining = [(await limiter.hit_requests("rpm:busy", 5)).remaining for _ in range(4)]
    assert (remaining, reads) == ([4, 3, 2, 1], 1)  # counted down by this process's own hits
    clock[0] += ratelimit.STATS_SECONDS
    assert (await limiter.hit_requests("rpm:busy", 5)).remaining == 0
    assert reads == 2  # a tenth of a second later: read again
    refused = await limiter.hit_requests("rpm:busy", 5)
    assert (refused.allowed, refused.remaining, reads) == (False, 0, 3)  # refusals always read
    assert refused.reset_seconds > 0
