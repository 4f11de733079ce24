"""Rate limits with the `limits` library: in-process memory by default, Redis (atomic scripts,
shared by every replica) when AIVAX_REDIS_URL is set.

Both limits use the sliding-window counter: two counters per key (this minute and the last),
weighted by how far into the minute we are. State is O(1) per key, a token count is simply the
cost of one hit, and within a window the count is exact. (The moving window keeps one entry per
request and, in memory, sweeps them with a thread hop per key — far too slow for a hot path.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float


class SweptMemoryStorage(MemoryStorage):
    """`limits`' in-process storage, with its expired counters dropped at most once a second.

    The library sweeps after every hit: a new asyncio task that walks every key it holds. That
    makes each hit cost O(keys): 49 µs per call with 10 keys, 0.93 ms with 10,000 and 6 ms with
    50,000 (two accounts' limits each; bench in docs/performance.md), so a server with many
    active accounts would spend most of its time sweeping. Here the same hook sweeps in place,
    at most once a second. Counters are still exact between sweeps: the library checks a key's
    expiry whenever it reads it. (The hook is a private method, checked by the tests against the
    pinned `limits` version.)
    """

    SWEEP_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.swept_at = time.monotonic()

    async def _MemoryStorage__schedule_expiry(self) -> None:
        """Called by the library on every counted hit: drop every counter whose window has
        passed, if a second has gone by since the last time."""
        if time.monotonic() - self.swept_at < self.SWEEP_SECONDS:
            return
        self.swept_at = time.monotonic()
        now = time.time()
        for key in [key for key, at in self.expirations.items() if at <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            self.locks.pop(key, None)


def _storage(redis_url: str | None) -> Storage:
    if redis_url is None:
        return SweptMemoryStorage()
    scheme, _, rest = redis_url.partition("://")
    uri = f"async+{scheme}://{rest}"
    return RedisStorage(uri, implementation="redispy", key_prefix="aivax")


# A limit's window (remaining, reset) as last read, reused for this long by the same process.
STATS_SECONDS = 0.1


@dataclass(slots=True)
class _Window:
    read_at: float  # time.monotonic()
    remaining: int
    reset_time: float  # time.time() of the next reset, as read


class RateLimiter:
    """Each call is admitted by an exact, atomic hit on its limits. The window's remaining
    count and reset time, for the `x-ratelimit-*` headers, are read with the hit only when this
    process has not read them in the last `STATS_SECONDS`; in between they are counted down by
    this process's own hits. That halves the storage operations of a busy key (on Redis, two
    commands per call instead of four) at the price of headers that miss other processes'
    hits of the last tenth of a second. A refusal always reads them afresh (Retry-After)."""

    def __init__(self, redis_url: str | None) -> None:
        self.storage = _storage(redis_url)
        self._strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._windows: dict[tuple[str, int], _Window] = {}
        self._windows_swept = 0.0  # a reading of `clock`
        self.clock: Callable[[], float] = time.monotonic  # when windows were read

    async def hit_requests(self, scope: str, per_minute: int) -> Decision:
        return await self._hit(RateLimitItemPerMinute(per_minute), scope, 1)

    async def hit_tokens(self, scope: str, per_minute: int, tokens: int) -> Decision:
        return await self._hit(RateLimitItemPerMinute(per_minute), scope, max(tokens, 1))

    async def _hit(self, item: RateLimitItem, scope: str, cost: int) -> Decision:
        if item.amount <= 0:
            return Decision(False, 0, 0, 60.0)
        allowed = await self._strategy.hit(item, scope, cost=cost)
        now = self.clock()
        key = (scope, item.amount)
        window = self._windows.get(key)
        if not allowed or window is None or now - window.read_at >= STATS_SECONDS:
            stats = await self._strategy.get_window_stats(item, scope)
            window = _Window(now, max(stats.remaining, 0), stats.reset_time)
            self._windows[key] = window
            self._sweep_windows(now)
        else:
            window.remaining = max(window.remaining - cost, 0)
        return Decision(
            allowed=allowed,
            limit=item.amount,
            remaining=window.remaining,
            reset_seconds=max(window.reset_time - time.time(), 0.0),
        )

    def _sweep_windows(self, now: float) -> None:
        """Forget windows not read for a second (at most once a second)."""
        if now - self._windows_swept < 1.0:
            return
        self._windows_swept = now
        for key in [k for k, w in self._windows.items() if now - w.read_at >= STATS_SECONDS]:
            del self._windows[key]

    async def reset(self) -> None:
        await self.storage.reset()

    async def close(self) -> None:
        # `limits` has no public close; its redis-py client lives on the storage's bridge.
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()
