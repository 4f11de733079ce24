"""The open holds this server process still uses, renewed while it runs.

The reaper expires open holds that showed no sign of life for `AIVAX_HOLD_MAX_AGE_SECONDS`,
because a server that died cannot close them. A call may outlive that age (a long stream, a
tool loop), and so may a wallet lease's last call: its hold must not expire while the call
runs, or the money it reserved would be spent again and the call's late cost would find
nothing left. So each process keeps the set of holds in use here — a lease's hold from its
first grant until it closes, a call's own hold until its settlement is handed over — and writes
`renewed_at` on all of them in one statement every quarter of the maximum age. Only the holds
of a process that stopped renewing (it died, or lost its database for that long) expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from aivax.db import Database
from aivax.kit.clock import utcnow
from aivax.wallet import open_holds

logger = logging.getLogger("aivax.wallet")


class LiveHolds:
    def __init__(self, database: Database, *, max_age_seconds: float) -> None:
        self.database = database
        # Four chances to renew before the reaper may take a hold; at least every minute.
        self.interval = max(min(max_age_seconds / 4, 60.0), 0.05)
        self._ids: set[uuid.UUID] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, hold_id: uuid.UUID) -> None:
        self._ids.add(hold_id)

    def discard(self, hold_id: uuid.UUID) -> None:
        self._ids.discard(hold_id)

    def __contains__(self, hold_id: object) -> bool:
        return hold_id in self._ids

    async def renew(self) -> int:
        """Renew every hold in use now; how many were still open."""
        ids = list(self._ids)
        if not ids:
            return 0
        now = utcnow()
        return await self.database.write(lambda conn: open_holds.renew_holds(conn, ids, now))

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except Exception:
                logger.exception("renewing the open wallet holds failed; retrying")
