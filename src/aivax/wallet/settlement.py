"""Settlement off the response path, behind the wallet meter (`wallet.meter`): each finished
call's cost is recorded against its wallet lease (or its own hold is settled or released) and
its request-log row written by the wallet writer (`wallet.writer`), many calls per transaction.

The response never waits for the ledger; the amount it reports is already exact (the charge is
min(cost, reservation), computed in memory).

No settlement is dropped because the database is away or the process dies. Each is appended to
the settlement journal (`wallet.journal`, a file under AIVAX_DATA_DIR; one disk sync per group)
before it is sent, and marked done once its transaction has committed. Settlements the database
does not take stay queued, in order, and are sent again with backoff until it does; sending
them again never charges twice (the writer skips what a lost answer had in fact committed,
`wallet.writer`). A server that stops or dies meanwhile leaves them in its journal, and the next
one to start on the same data directory writes them before serving (`start`). While more than
`backlog_max` wait, paid calls are refused with 503 `wallet_unavailable` (`check_capacity`)
rather than served with their charge out of reach. On shutdown the queue is drained while the
database answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aivax.config import Settings
from aivax.wallet.journal import JOURNAL_DIR, SettlementJournal
from aivax.wallet.live import LiveHolds
from aivax.wallet.writer import (
    SettleItem,
    SettleMode,
    WalletWriter,
    WalletWriterUnavailable,
    unavailable,
)

logger = logging.getLogger("aivax.settlement")

MAX_BATCH = 200
LINGER_SECONDS = 0.02
DEFAULT_BACKLOG_MAX = 10_000
# Retries while the database does not answer: the first after about this long, then twice as
# long each time, up to the cap.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0
# Failed tries a caller of `drain` (a wallet read) waits through before it gets 503.
DRAIN_ATTEMPTS = 3
CLOSE_TIMEOUT_SECONDS = 30.0


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
    """Settlements in the order they were submitted: journaled, then written; kept and sent
    again while the database does not take them."""

    def __init__(
        self,
        writer: WalletWriter,
        live: LiveHolds | None = None,
        *,
        journal: SettlementJournal | None = None,
        backlog_max: int = DEFAULT_BACKLOG_MAX,
    ) -> None:
        self.writer = writer
        self.live = live  # a call's own hold is renewed until its settlement is handed over
        self.journal = journal
        self.backlog_max = backlog_max
        self._incoming: list[SettleItem] = []  # submitted, not yet journaled
        self._queued: collections.deque[SettleItem] = collections.deque()  # journaled
        self._head = 1  # the journal number of `_queued[0]`
        self._replay_below = 1  # queued settlements numbered below this may be written already
        self._submitted = 0
        self._done = 0
        self._failures = 0  # attempts failed in a row
        self._failed_total = 0
        self._retry_at = 0.0
        self._wake: asyncio.Event | None = None
        self._watchers: list[asyncio.Future[None]] = []
        self._journaling = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Settlements submitted and not yet written."""
        return self._submitted - self._done

    def check_capacity(self) -> None:
        """Refuse a paid call while more settlements wait than the bound allows: it would be
        served with its charge queued behind them, in memory and on disk."""
        if self.backlog >= self.backlog_max:
            raise WalletWriterUnavailable(
                f"The wallet cannot record charges right now ({self.backlog} wait for the "
                "database); retry shortly."
            )

    def submit(self, item: Settlement) -> None:
        if self.live is not None and item.mode == "hold" and item.hold_id is not None:
            self.live.discard(item.hold_id)
        self._incoming.append((item.hold_id, item.cost_micros, item.log, item.mode))
        self._submitted += 1
        self._wake_up()

    async def start(self) -> None:
        """Take over the settlements a server on this data directory left unwritten, and
        write them before the first request (or leave them queued, if the database does not
        answer)."""
        if self.journal is None:
            return
        async with self._journaling:
            first = self._head + len(self._queued)
            try:
                adopted = await asyncio.to_thread(self.journal.adopt, first)
            except OSError:
                logger.exception("the settlement journal could not be read")
                return
            self._queued.extend(adopted)
        if not adopted:
            return
        self._submitted += len(adopted)
        self._replay_below = first + len(adopted)
        logger.warning("writing %d settlements left unwritten by an earlier server", len(adopted))
        try:
            await self.drain()
        except WalletWriterUnavailable:
            logger.warning("%d settlements wait for the database", self.backlog)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written, sending what waits at once
        rather than after its backoff; raises `WalletWriterUnavailable` when the database has
        not answered `DRAIN_ATTEMPTS` tries meanwhile."""
        target = self._submitted
        failed_before = self._failed_total
        self._retry_at = 0.0
        while self._done < target:
            if self._failed_total - failed_before >= DRAIN_ATTEMPTS:
                raise WalletWriterUnavailable("The wallet is not available; retry shortly.")
            watcher = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            self._wake_up()
            await watcher

    async def close(self) -> None:
        """Write what was submitted (not waiting for a database that does not answer), then
        keep the rest in the journal for the next start."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(WalletWriterUnavailable, TimeoutError):
                await asyncio.wait_for(self.drain(), CLOSE_TIMEOUT_SECONDS)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        if self._incoming:
            await self._journal_incoming()
        if self.journal is not None:
            if self.backlog:
                logger.warning(
                    "%d settlements were not written; they are kept in %s for the next start",
                    self.backlog,
                    self.journal.path,
                )
            await asyncio.to_thread(self.journal.close, keep=self.backlog > 0)

    # --- inside ----------------------------------------------------------------------------

    def _wake_up(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        assert self._wake is not None  # noqa: S101 - made with the task
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._work()
            if self._incoming:
                # Group commit: wait a moment for more, so one disk sync and one transaction
                # take many calls, and the writer stays free for the holds of new requests.
                await asyncio.sleep(LINGER_SECONDS)
                await self._journal_incoming()
            if self._queued and time.monotonic() >= self._retry_at:
                await self._send()
            for watcher in self._watchers:
                if not watcher.done():
                    watcher.set_result(None)
            self._watchers.clear()

    async def _work(self) -> None:
        """Until there is something new to journal, or something queued to send now."""
        assert self._wake is not None  # noqa: S101 - made with the task
        while not self._incoming:
            if self._queued and time.monotonic() >= self._retry_at:
                return
            self._wake.clear()
            delay = self._retry_at - time.monotonic() if self._queued else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _journal_incoming(self) -> None:
        """Move what was submitted into the queue, on disk first (one sync for them all). A
        journal that cannot be written is logged and the settlements are sent all the same."""
        async with self._journaling:
            fresh, self._incoming = self._incoming, []
            first = self._head + len(self._queued)
            if self.journal is not None and fresh:
                loop = asyncio.get_running_loop()
                writing = loop.run_in_executor(None, self.journal.append, first, fresh)
                try:
                    await asyncio.shield(writing)
                except asyncio.CancelledError:  # at shutdown: let the append finish first
                    await asyncio.wait([writing])
                    self._queued.extend(fresh)
                    raise
                except Exception:
                    logger.exception("%d settlements could not be journaled", len(fresh))
            self._queued.extend(fresh)

    async def _send(self) -> None:
        batch = list(itertools.islice(self._queued, MAX_BATCH))
        try:
            done = await self.writer.settle(batch, replay=self._head < self._replay_below)
        except Exception as exc:  # the writer's own failure, not the database's answer
            logger.exception("a settlement batch failed")
            done = 0 if unavailable(exc) else len(batch)
        for _ in range(done):
            self._queued.popleft()
        self._head += done
        self._done += done
        if done and self.journal is not None:
            try:
                self.journal.done(self._head - 1, left=self._queued)
            except OSError:
                logger.exception("the settlement journal could not be written")
        if done < len(batch):
            self._failed(self._head + len(batch) - done)
        elif self._failures:
            logger.warning(
                "the database takes settlements again after %d failed tries; %d wait",
                self._failures,
                self.backlog,
            )
            self._failures, self._retry_at = 0, 0.0

    def _failed(self, end: int) -> None:
        """The settlements numbered below `end` were sent and not all written: try again after
        a backoff (doubling, capped, with jitter so that replicas do not retry in step), and
        check before writing them what their first try did write."""
        self._replay_below = max(self._replay_below, end)
        self._failures += 1
        self._failed_total += 1
        delay = min(RETRY_FIRST_SECONDS * 2 ** (self._failures - 1), RETRY_MAX_SECONDS)
        jitter = random.uniform(0, delay / 2)  # noqa: S311 - spreading retries, not a secret
        self._retry_at = time.monotonic() + delay / 2 + jitter
        if self._failures == 1:
            logger.warning(
                "the database did not take %d settlements; they are kept in the journal and "
                "tried again until it does",
                self.backlog,
            )


def build_settler(
    settings: Settings, writer: WalletWriter, live: LiveHolds | None = None
) -> Settler:
    return Settler(
        writer,
        live,
        journal=SettlementJournal(settings.data_dir / JOURNAL_DIR),
        backlog_max=settings.wallet_backlog_max,
    )
