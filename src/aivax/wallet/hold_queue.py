"""Wallet holds of concurrent requests, taken together in one transaction (group commit).

Every billed call holds its worst case before the upstream is called, so the hold is on the
response path of every call. One transaction per hold spends most of its time on what a
transaction costs (begin, commit, the thread hop to the writer); `HoldQueue` takes every hold
that arrived while the previous batch was being written in the next one. Nothing waits to
fill a batch: a lone request is written at once — on the event loop's own thread when the
writer is idle and the database lock is free (`Database.write_now`, no thread hop) — and under
load each batch takes whatever queued meanwhile (`ledger.hold_many`: each hold is still one
conditional UPDATE, so a batch never overdraws).

A batch that fails as a whole (a database error) is retried hold by hold, so a refusal or a
failure reaches only the request it belongs to. A hold whose caller went away while it was
being taken is released at once through the settler instead of waiting for the reaper.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aivax.db import NOT_NOW, Database
from aivax.inference.settlement import Settlement, Settler
from aivax.wallet import ledger
from aivax.wallet.ledger import HoldRequest

logger = logging.getLogger("aivax.wallet")

MAX_BATCH = 128

HoldResult = uuid.UUID | Exception


class HoldQueue:
    def __init__(self, database: Database, settler: Settler) -> None:
        self.database = database
        self.settler = settler
        # Calls being served right now (kept by the chat route). Only a lone call takes its
        # hold on the event loop's thread: with company, the writer thread takes holds in
        # batches while the loop serves the others.
        self.calls_in_flight = 0
        self._pending: list[tuple[HoldRequest, asyncio.Future[uuid.UUID]]] = []
        self._writing = False

    async def hold(
        self,
        *,
        account_id: uuid.UUID,
        amount_micros: int,
        ref: str,
        minimum_balance: int = 0,
    ) -> uuid.UUID:
        """Reserve `amount_micros` (see `ledger.hold`); raises what `ledger.hold` raises."""
        request = HoldRequest(account_id, amount_micros, ref, minimum_balance)
        if not self._writing and self.calls_in_flight <= 1:
            # A lone call: take it right here if the database lets us at once.
            taken = self.database.write_now(lambda conn: ledger.hold_many(conn, [request]))
            if taken is not NOT_NOW:
                (result,) = taken
                if isinstance(result, Exception):
                    raise result
                return result
        future: asyncio.Future[uuid.UUID] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                results = await self._write(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    self._deliver(future, result)
        finally:
            self._writing = False

    async def _write(
        self, batch: list[tuple[HoldRequest, asyncio.Future[uuid.UUID]]]
    ) -> list[HoldResult]:
        requests = [request for request, _ in batch]
        try:
            return list(
                await self.database.run_write(lambda conn: ledger.hold_many(conn, requests))
            )
        except Exception as exc:
            if len(requests) == 1:
                return [exc]
            logger.warning(
                "a batch of %d holds failed (%s); taking them one by one", len(batch), exc
            )
        return [await self._one(request) for request in requests]

    async def _one(self, request: HoldRequest) -> HoldResult:
        try:
            (result,) = await self.database.run_write(
                lambda conn: ledger.hold_many(conn, [request])
            )
        except Exception as exc:
            return exc
        return result

    def _deliver(self, future: asyncio.Future[uuid.UUID], result: HoldResult) -> None:
        if future.cancelled():
            if isinstance(result, uuid.UUID):  # taken for a caller that left: give it back
                self.settler.submit(Settlement(hold_id=result, cost_micros=0, log=None))
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
