"""Wallet leases: a server process moves a slice of an account's balance into one open hold —
the lease — and admits that account's calls against it in memory, instead of writing one hold
per call on the response path. It is how prepaid telecom charging works (Diameter
Credit-Control, RFC 4006 §5.1: the charging server grants a quota, the gateway meters usage
against it locally and reports what was used), applied to the wallet.

Why the budget still holds: a lease's money has left the spendable balance in the database (a
conditional UPDATE, like any hold), a call is admitted from a lease only when its worst case
fits in what the lease has neither reserved for calls in flight nor spent, and a call is never
charged more than its worst case. So no balance goes below zero, whatever the concurrency and
however many processes or replicas share the account.

- A call that fits is admitted with no database work. The plan's minimum balance is then
  checked against the lease alone (the lease is part of the spendable balance, so this is
  conservative); a call that fails that check, or does not fit, makes the lease grow.
- Growing is one transaction (`grants.grant`): it checks the minimum against the real balance
  and moves the call's worst case plus room for more calls into the lease: for `calls` more
  calls, or for what the lease's calls reserved per `horizon_seconds` since its last grant if
  that is more, so a busy account grows its lease about once per horizon rather than every few
  calls. No more than a quarter of the balance is taken unless the call needs more (other
  processes may want some). One call grows a lease at a time; the others wait for it.
- Each finished call's cost is recorded against the lease with its request-log row, by the
  settler, in the same batch transactions as before (`closing.charge_holds`). The balance moves
  when the lease closes: the recorded costs are charged as one `usage` entry and the rest comes
  back (`closing.close_recorded`). Each call's own cost is in the request log at once.
- A lease closes when it has been idle for `idle_seconds`; when it is `max_seconds` old (it
  takes no more calls and closes when its last call ends); when the account's wallet is read
  through this process (`flush`); and at shutdown. The leases of a process that dies are
  closed by the reaper, which charges what was recorded and gives back the rest. A live
  process renews the holds of its open leases (`wallet.live`), so the reaper never takes a
  lease whose calls are still running, however long they run.

`calls = 0` turns leases off: every call then takes a hold of its own (`hold_queue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aivax.db import Database
from aivax.errors import AppError
from aivax.wallet import grants, holds, ledger
from aivax.wallet.live import LiveHolds
from aivax.wallet.settlement import Settlement, Settler
from aivax.wallet.writer import WalletWriterUnavailable

logger = logging.getLogger("aivax.wallet.leases")

LEASE_REF = "lease"
# A growing lease takes room for what its calls reserved in this long, at the rate since its
# last grant (the rate measured over at least `RATE_FLOOR_SECONDS`, so a burst of a few calls is
# not taken for a sustained rate).
HORIZON_SECONDS = 1.0
RATE_FLOOR_SECONDS = 0.1


@dataclass(eq=False)
class Lease:
    account_id: uuid.UUID
    opened: float  # the book's clock
    used: float
    hold_id: uuid.UUID | None = None  # None until the first grant
    granted: int = 0  # moved into the hold so far
    reserved: int = 0  # the worst cases of the calls in flight
    spent: int = 0  # the costs of the calls that ended
    calls: int = 0  # calls in flight
    granted_at: float = 0.0  # the book's clock at the last grant
    taken_since_grant: int = 0  # the worst cases of the calls admitted since then
    retired: bool = False  # takes no more calls; closes when its last call ends
    closed: bool = False
    growing: asyncio.Task[LeaseClaim | None] | None = None

    @property
    def free(self) -> int:
        return self.granted - self.reserved - self.spent


@dataclass(frozen=True, slots=True)
class LeaseClaim:
    """One call's worst case, reserved from a lease (the meter's `Reservation` wraps it)."""

    lease: Lease
    amount: int


class LeaseBook:
    def __init__(
        self,
        database: Database,
        settler: Settler,
        *,
        calls: int,
        idle_seconds: float,
        max_seconds: float,
        horizon_seconds: float = HORIZON_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        live: LiveHolds | None = None,
    ) -> None:
        self.database = database
        self.settler = settler
        self.live = live  # renews the holds of open leases, so the reaper leaves them
        self.calls = calls
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.horizon_seconds = horizon_seconds
        self.clock = clock  # monotonic seconds: ages, idleness, the rate of demand
        self._current: dict[uuid.UUID, Lease] = {}  # per account, the lease taking calls
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.calls > 0

    def free(self, account_id: uuid.UUID) -> int:
        """What this process's lease for the account has neither reserved nor spent."""
        lease = self._current.get(account_id)
        return lease.free if lease is not None else 0

    async def reserve(
        self, account_id: uuid.UUID, amount: int, minimum: int, *, exact: bool = False
    ) -> LeaseClaim:
        """Reserve a call's worst case `amount` for a plan that wants `minimum` spendable;
        raises what a hold raises (`InsufficientBalance`, `WalletAccountNotFound`). `exact`:
        grow by no more than the call needs (a call clamped to what the balance affords)."""
        holds.check_hold_amount(amount)
        self.settler.check_capacity()  # 503 while too many settlements wait for the database
        self._ensure_sweeper()
        while True:
            lease = self._lease_for(account_id)
            if lease.growing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(lease.growing)
                continue
            if lease.hold_id is not None and lease.free >= max(amount, minimum):
                return self._take(lease, amount)
            task = asyncio.get_running_loop().create_task(
                self._grow(lease, amount, minimum, exact=exact)
            )
            lease.growing = task
            try:
                taken = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(self._give_back)  # the grant outlives the caller
                raise
            if taken is not None:
                return taken

    def finish(self, reservation: LeaseClaim, charge: int, log: dict[str, Any] | None) -> None:
        """A call ended having cost `charge` (at most its reservation): the rest of its
        reservation is free again, and the cost and the request-log row go to the settler."""
        lease = reservation.lease
        charge = min(charge, reservation.amount)
        lease.reserved -= reservation.amount
        lease.spent += charge
        lease.calls -= 1
        lease.used = self.clock()
        if charge or log is not None:
            self.settler.submit(
                Settlement(hold_id=lease.hold_id, cost_micros=charge, log=log, mode="lease")
            )
        if lease.retired and lease.calls == 0:
            self._close(lease)

    def close_idle(
        self, *, idle_since: float | None = None, account_id: uuid.UUID | None = None
    ) -> None:
        """Close the leases with no call in flight (of `account_id` only, if given) that have
        been unused since `idle_since` (a reading of the book's clock; None: any), or that are
        past their age."""
        now = self.clock()
        for lease in list(self._current.values()):
            if account_id is not None and lease.account_id != account_id:
                continue
            if lease.calls or lease.growing is not None:
                continue
            too_old = now - lease.opened >= self.max_seconds
            if idle_since is None or lease.used <= idle_since or too_old:
                self._retire(lease)

    async def flush(self, account_id: uuid.UUID | None = None) -> None:
        """Close the idle leases (of `account_id`, if given) and wait until everything the
        settler was given is written: the wallet then reads as if calls held one by one."""
        self.close_idle(account_id=account_id)
        await self.settler.drain()

    async def close(self) -> None:
        """At shutdown: close every lease now, or when its last call ends."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._sweeper
            self._sweeper = None
        for lease in list(self._current.values()):
            self._retire(lease)

    # --- inside ----------------------------------------------------------------------------

    def _lease_for(self, account_id: uuid.UUID) -> Lease:
        now = self.clock()
        lease = self._current.get(account_id)
        if lease is not None and lease.growing is None and now - lease.opened >= self.max_seconds:
            self._retire(lease)
            lease = None
        if lease is None:
            lease = self._current[account_id] = Lease(account_id, opened=now, used=now)
        return lease

    def _take(self, lease: Lease, amount: int) -> LeaseClaim:
        lease.reserved += amount
        lease.taken_since_grant += amount
        lease.calls += 1
        lease.used = self.clock()
        return LeaseClaim(lease, amount)

    async def _grow(
        self, lease: Lease, amount: int, minimum: int, *, exact: bool
    ) -> LeaseClaim | None:
        """Grant the lease what the call needs (and room for more calls unless `exact`), then
        reserve the call's worst case in the same step; None when the lease's hold turned out
        to be closed (the lease is retired, and the caller starts a new one)."""
        try:
            free = lease.free  # only grows while this runs: calls end, none is admitted
            need = max(amount - free, 0)
            room = max(amount * max(self.calls, 2 * (lease.calls + 1)), self._demand(lease))
            want = need if exact else max(need, room + minimum - free)
            hold_id = lease.hold_id

            def grant(conn: Any) -> grants.Grant | AppError:
                return grants.grant(
                    conn,
                    account_id=lease.account_id,
                    hold_id=hold_id,
                    need=need,
                    want=want,
                    minimum=max(minimum - free, 0),
                    ref=LEASE_REF,
                )

            try:
                granted = await self.database.write(grant)
            except ledger.HoldNotOpen:
                logger.warning("lease %s was closed by the reaper; starting another", hold_id)
                if self.live is not None and hold_id is not None:
                    self.live.discard(hold_id)
                lease.closed = True
                self._retire(lease)
                return None
            except AppError:
                raise
            except Exception as exc:
                logger.exception("a wallet lease could not grow")
                raise WalletWriterUnavailable(
                    "The wallet is not available; retry shortly."
                ) from exc
            if isinstance(granted, AppError):
                raise granted
            if self.live is not None and lease.hold_id is None:
                self.live.add(granted.hold_id)
            lease.hold_id = granted.hold_id
            lease.granted += granted.amount
            lease.granted_at, lease.taken_since_grant = self.clock(), 0
            return self._take(lease, amount)
        finally:
            lease.growing = None
            if lease.retired and lease.calls == 0:  # retired meanwhile (shutdown)
                self._close(lease)

    def _demand(self, lease: Lease) -> int:
        """What the lease's calls would reserve in `horizon_seconds` at their rate since its
        last grant (0 before its first)."""
        if lease.hold_id is None or not self.horizon_seconds:
            return 0
        elapsed = max(self.clock() - lease.granted_at, RATE_FLOOR_SECONDS)
        return int(lease.taken_since_grant * self.horizon_seconds / elapsed)

    def _give_back(self, task: asyncio.Task[LeaseClaim | None]) -> None:
        """A grant whose caller left while it was taken: its reservation ends unused."""
        if task.cancelled() or task.exception() is not None:
            return
        reservation = task.result()
        if reservation is not None:
            self.finish(reservation, 0, None)

    def _retire(self, lease: Lease) -> None:
        if self._current.get(lease.account_id) is lease:
            del self._current[lease.account_id]
        lease.retired = True
        if lease.calls == 0 and lease.growing is None:
            self._close(lease)

    def _close(self, lease: Lease) -> None:
        if lease.closed:
            return
        lease.closed = True
        if lease.hold_id is not None:
            if self.live is not None:
                self.live.discard(lease.hold_id)
            self.settler.submit(
                Settlement(hold_id=lease.hold_id, cost_micros=0, log=None, mode="close")
            )

    def _ensure_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_seconds, 1.0))
            self.close_idle(idle_since=self.clock() - self.idle_seconds)
