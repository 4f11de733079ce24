"""Settlement off the response path: each finished call's cost is recorded against its wallet
lease (or its own hold is settled or released) and its request-log row written by the wallet
writer (`wallet.writer`), many calls per transaction.

The response never waits for the ledger; the amount it reports is already exact (the charge is
min(cost, reservation), computed in memory). If the process dies before a queued settlement is
written, that call goes uncharged — the same guarantee as a crash mid-request: the reaper closes
its lease with the costs recorded before, or releases its own hold. On shutdown the queue is
drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aivax.catalog.service import ResolvedModel
from aivax.kit.clock import utcnow
from aivax.wallet.writer import SettleMode, WalletWriter

logger = logging.getLogger("aivax.settlement")

MAX_BATCH = 200
# Group commit: after the first settlement arrives, wait this long for more, so one transaction
# settles many calls and the writer stays free for the holds of new requests.
LINGER_SECONDS = 0.02


def log_row(
    *,
    request_id: str,
    account_id: uuid.UUID,
    key_id: uuid.UUID | None,
    model: ResolvedModel,
    status: int,
    error_code: str | None,
    input_tokens: int,
    cost: int | None,
    started: float,
    output_tokens: int = 0,
    cached: int = 0,
    estimated: bool = False,
    first: float | None = None,
    gateway_id: uuid.UUID | None = None,
    stream: bool = False,
    flags: list[str] | None = None,
) -> dict[str, Any]:
    """The request-log row of one call (chat or embeddings); `started` and `first` are
    `time.perf_counter()` readings."""
    return {
        "request_id": request_id,
        "account_id": account_id,
        "key_id": key_id,
        "gateway_id": gateway_id,
        "model": model.id,
        "provider": model.provider,
        "upstream_model": model.upstream_model,
        "byok": model.byok,
        "stream": stream,
        "status": status,
        "error_code": error_code,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached,
        "cost_micros": cost,
        "estimated": estimated,
        "latency_ms": int((time.perf_counter() - started) * 1000),
        "ttft_ms": int((first - started) * 1000) if first else None,
        "flags": flags or None,
        "created_at": utcnow(),
    }


@dataclass(frozen=True, slots=True)
class Settlement:
    """Settle `hold_id` at `cost_micros` (0 releases it) and write the request-log row `log`
    (None: a hold whose request never reached the pipeline's end, released without a row).
    `mode` "lease": record the cost against the lease `hold_id` instead; "close": close that
    lease at what was recorded (`wallet.leases`)."""

    hold_id: uuid.UUID | None
    cost_micros: int
    log: dict[str, Any] | None
    mode: SettleMode = "hold"


class Settler:
    def __init__(self, writer: WalletWriter) -> None:
        self.writer = writer
        self._queue: asyncio.Queue[Settlement] | None = None
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Settlement) -> None:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._queue.put_nowait(item)

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        assert self._queue is not None  # noqa: S101 - created with the task
        queue = self._queue
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(LINGER_SECONDS)
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self.writer.settle(
                    [(item.hold_id, item.cost_micros, item.log, item.mode) for item in batch]
                )
            except Exception:  # the writer logs what it could not write; keep settling
                logger.exception("a settlement batch failed")
            finally:
                for _ in batch:
                    queue.task_done()
