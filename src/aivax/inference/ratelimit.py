"""Rate limits with the `limits` library: in-process memory by default, Redis (atomic scripts,
shared by every replica) when AIVAX_REDIS_URL is set.

When Redis stops answering, the operator's policy (AIVAX_REDIS_OUTAGE) decides: refuse the calls
that need a decision with 503 `rate_limits_unavailable`, or count them in this process for at
most AIVAX_REDIS_FALLBACK_SECONDS. Either way no call waits on a dead Redis: the first failure
switches the limiter over, and a background probe (at most once a second) switches it back.

Both limits use the sliding-window counter: two counters per key (this minute and the last),
weighted by how far into the minute we are. State is O(1) per key, a token count is simply the
cost of one hit, and within a window the count is exact. (The moving window keeps one entry per
request and, in memory, sweeps them with a thread hop per key — far too slow for a hot path.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from aivax.errors import ServiceUnavailable
from aivax.metrics import NO_METRICS, Metrics

logger = logging.getLogger("aivax.ratelimit")

OutagePolicy = Literal["refuse", "local"]

# While Redis is unreachable, one background probe at most this often looks for it again.
PROBE_SECONDS = 1.0
# Enough for the next probe (at most a second away) to find a Redis that has come back.
RETRY_AFTER_SECONDS = 2
PROBE_KEY = "outage-probe"


class RateLimitsUnavailable(ServiceUnavailable):
    code = "rate_limits_unavailable"


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


def _storage(redis_url: str | None, timeout_seconds: float) -> Storage:
    if redis_url is None:
        return SweptMemoryStorage()
    scheme, _, rest = redis_url.partition("://")
    uri = f"async+{scheme}://{rest}"
    # redis-py's defaults (5 s timeouts, ten retries with backoff) would hold every call for
    # up to a minute on a hanging Redis. One immediate retry still replaces a connection that
    # Redis closed while it sat in the pool. Query parameters in the URL override these.
    return RedisStorage(
        uri,
        implementation="redispy",
        key_prefix="aivax",
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1),  # type: ignore[arg-type]
    )


# A limit's window (remaining, reset) as last read, reused for this long by the same process.
STATS_SECONDS = 0.1


@dataclass(slots=True)
class _Window:
    read_at: float  # a reading of the limiter's clock
    remaining: int
    reset_time: float  # time.time() of the next reset, as read


@dataclass(slots=True)
class _Counters:
    """One storage, its strategy, and the windows this process last read from it."""

    storage: Storage
    strategy: SlidingWindowCounterRateLimiter
    windows: dict[tuple[str, int], _Window] = field(default_factory=dict)
    windows_swept: float = 0.0  # a reading of the limiter's clock

    @classmethod
    def on(cls, storage: Storage) -> _Counters:
        return cls(storage, SlidingWindowCounterRateLimiter(storage))

    async def hit(self, item: RateLimitItem, scope: str, cost: int, now: float) -> Decision:
        allowed = await self.strategy.hit(item, scope, cost=cost)
        key = (scope, item.amount)
        window = self.windows.get(key)
        if not allowed or window is None or now - window.read_at >= STATS_SECONDS:
            stats = await self.strategy.get_window_stats(item, scope)
            window = _Window(now, max(stats.remaining, 0), stats.reset_time)
            self.windows[key] = window
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
        if now - self.windows_swept < 1.0:
            return
        self.windows_swept = now
        for key in [k for k, w in self.windows.items() if now - w.read_at >= STATS_SECONDS]:
            del self.windows[key]


@dataclass(slots=True)
class _Outage:
    """Redis stopped answering at `since`; `local` counts calls meanwhile (None: refuse)."""

    since: float
    probed_at: float
    local: _Counters | None
    probe: asyncio.Task[None] | None = None


class RateLimiter:
    """Each call is admitted by an exact, atomic hit on its limits. The window's remaining
    count and reset time, for the `x-ratelimit-*` headers, are read with the hit only when this
    process has not read them in the last `STATS_SECONDS`; in between they are counted down by
    this process's own hits. That halves the storage operations of a busy key (on Redis, two
    commands per call instead of four) at the price of headers that miss other processes'
    hits of the last tenth of a second. A refusal always reads them afresh (Retry-After).

    With Redis, a hit that fails starts an outage: from then on calls go by `outage` ("refuse":
    503; "local": per-process counters for at most `fallback_seconds`, then 503) and never
    touch Redis, until a background probe finds it answering. A healthy Redis costs the hot
    path one attribute check."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        outage: OutagePolicy = "refuse",
        fallback_seconds: float = 300.0,
        timeout_seconds: float = 1.0,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.metrics = metrics
        self._shared = _Counters.on(_storage(redis_url, timeout_seconds))
        # Failures that mean "Redis cannot decide now"; in-process memory cannot fail so.
        self._store_errors: tuple[type[Exception], ...] = (
            (RedisError, OSError) if redis_url is not None else ()
        )
        self.outage_policy: OutagePolicy = outage
        self.fallback_seconds = fallback_seconds
        self._outage: _Outage | None = None
        self._epoch = 0  # counts outages begun and ended, so a late failure starts none
        self.clock: Callable[[], float] = time.monotonic

    @property
    def storage(self) -> Storage:
        return self._shared.storage

    @property
    def _strategy(self) -> SlidingWindowCounterRateLimiter:
        return self._shared.strategy

    @property
    def redis_reachable(self) -> bool:
        """False while an outage lasts (always True without Redis)."""
        return self._outage is None

    async def hit_requests(self, scope: str, per_minute: int) -> Decision:
        return await self._hit(RateLimitItemPerMinute(per_minute), scope, 1)

    async def hit_tokens(self, scope: str, per_minute: int, tokens: int) -> Decision:
        return await self._hit(RateLimitItemPerMinute(per_minute), scope, max(tokens, 1))

    async def _hit(self, item: RateLimitItem, scope: str, cost: int) -> Decision:
        decision = await self._decide(item, scope, cost)
        if not decision.allowed:  # the limit's kind is the scope's prefix (rpm, tpm, byok, …)
            self.metrics.rate_limited(scope.partition(":")[0])
        return decision

    async def _decide(self, item: RateLimitItem, scope: str, cost: int) -> Decision:
        if item.amount <= 0:
            return Decision(False, 0, 0, 60.0)
        if self._outage is None:
            epoch = self._epoch
            try:
                return await self._shared.hit(item, scope, cost, self.clock())
            except self._store_errors as exc:
                self._begin_outage(epoch, exc)
        return await self._hit_during_outage(item, scope, cost)

    def _begin_outage(self, epoch: int, error: Exception) -> None:
        """Only the first of the calls that fail together switches; a call that started
        before an outage ended changes nothing (it gets a 503 of its own)."""
        if self._outage is not None or epoch != self._epoch:
            return
        now = self.clock()
        local = _Counters.on(SweptMemoryStorage()) if self.outage_policy == "local" else None
        self._outage = _Outage(since=now, probed_at=now, local=local)
        self._epoch += 1
        if local is None:
            logger.error(
                "Redis is unreachable (%s): calls that need a rate-limit decision are refused "
                "with 503 until it answers again (AIVAX_REDIS_OUTAGE=refuse)",
                error,
            )
        else:
            logger.warning(
                "Redis is unreachable (%s): rate limits are counted by this process alone for "
                "at most %gs (AIVAX_REDIS_OUTAGE=local)",
                error,
                self.fallback_seconds,
            )

    async def _hit_during_outage(self, item: RateLimitItem, scope: str, cost: int) -> Decision:
        outage = self._outage
        if outage is None:
            raise self._unavailable()
        now = self.clock()
        self._probe_when_due(outage, now)
        if outage.local is not None and now - outage.since >= self.fallback_seconds:
            outage.local = None
            logger.error(
                "Redis is still unreachable after %gs: calls that need a rate-limit decision "
                "are now refused with 503 until it answers again",
                self.fallback_seconds,
            )
        if outage.local is None:
            raise self._unavailable()
        return await outage.local.hit(item, scope, cost, now)

    def _probe_when_due(self, outage: _Outage, now: float) -> None:
        if outage.probe is not None or now - outage.probed_at < PROBE_SECONDS:
            return
        outage.probed_at = now
        outage.probe = asyncio.create_task(self._probe(outage))

    async def _probe(self, outage: _Outage) -> None:
        """One write through the same script path the limits use: a Redis that answers PING
        but refuses writes (out of memory, a read-only replica) cannot count either."""
        try:
            await self._shared.storage.incr(PROBE_KEY, 60)
        except Exception:  # any failure means: not back yet
            return
        finally:
            outage.probe = None
        if self._outage is outage:
            self._outage = None
            self._epoch += 1
            self._shared.windows.clear()
            logger.warning(
                "Redis answers again: rate limits are counted in Redis, shared by every process"
            )

    def _unavailable(self) -> RateLimitsUnavailable:
        return RateLimitsUnavailable(
            "Rate limits cannot be checked right now: their shared store is unreachable, so "
            f"the call was not run. Retry in {RETRY_AFTER_SECONDS}s.",
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )

    async def reset(self) -> None:
        await self.storage.reset()

    async def close(self) -> None:
        if self._outage is not None and self._outage.probe is not None:
            self._outage.probe.cancel()
        # `limits` has no public close; its redis-py client lives on the storage's bridge.
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()
