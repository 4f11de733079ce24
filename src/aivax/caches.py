"""Short-lived in-process caches for the request hot path.

Authentication, plan limits, model resolution and gateway lookups are read on every call but
change rarely; each is cached for `AIVAX_CACHE_SECONDS` (default 5). Every change made through
this process clears them as soon as its transaction commits, before its response is sent (a
change that rolls back clears nothing); other replicas (and `aivax` CLI changes) take effect
within that many seconds. Set AIVAX_CACHE_SECONDS=0 to read the database on every request.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from cachetools import TTLCache
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.db import on_commit

if TYPE_CHECKING:
    from aivax.catalog.service import ResolvedModel
    from aivax.gateways.compose import GatewayTarget
    from aivax.keys.service import Principal
    from aivax.plans.schemas import PlanLimits

MAX_ENTRIES = 50_000


class HotPathCaches:
    def __init__(self, ttl_seconds: float) -> None:
        self.enabled = ttl_seconds > 0
        ttl = max(ttl_seconds, 0.001)
        self.principals: TTLCache[str, Principal] = TTLCache(MAX_ENTRIES, ttl)
        self.plans: TTLCache[str, PlanLimits] = TTLCache(1_000, ttl)
        self.models: TTLCache[tuple[uuid.UUID, str], ResolvedModel] = TTLCache(MAX_ENTRIES, ttl)
        self.gateways: TTLCache[tuple[uuid.UUID, str], GatewayTarget] = TTLCache(MAX_ENTRIES, ttl)

    def clear_after_commit(self, session: AsyncSession) -> None:
        """Clear every cache once `session`'s transaction commits, for a change to keys,
        accounts, plans, models, credentials or gateways. Not before: a request reading between
        an early clear and the commit would cache the old row again for the whole TTL."""
        on_commit(session, self.clear)

    def clear(self) -> None:
        self.principals.clear()
        self.plans.clear()
        self.models.clear()
        self.gateways.clear()
