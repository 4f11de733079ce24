"""The wallet meter: the one interface through which anything priced is paid for.

A caller reserves a call's worst case before the call (`reserve`), and afterwards settles what
it cost together with its request-log row (`settle`), or releases the reservation unused
(`release`). Nothing outside `wallet/` knows how: from this process's wallet lease for the
account when leases are on (`wallet.leases`, no database work for most calls), else in a hold
of the call's own taken in the next group commit (`wallet.hold_queue`). Either way a call is
never charged more than it reserved, and settlements are journaled and written off the
response path by the settler (`wallet.settlement`) through the wallet writer
(`wallet.writer`), while the holds in use are renewed (`wallet.live`).

A reservation must be settled or released exactly once, whatever happens to the call
(upstream error, disconnect, cancellation); a call that makes several model requests reserves
and settles each one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from aivax.config import Settings
from aivax.db import Database
from aivax.errors import PaymentRequired, ServiceUnavailable
from aivax.kit.clock import utcnow
from aivax.metrics import NO_METRICS, Metrics
from aivax.wallet.hold_queue import HoldQueue
from aivax.wallet.leases import LeaseBook, LeaseClaim
from aivax.wallet.live import LiveHolds
from aivax.wallet.settlement import Settlement, build_settler
from aivax.wallet.writer import build_writer


@dataclass(frozen=True, slots=True)
class Reservation:
    """A call's worst case, reserved: `amount` micro-units (0: nothing was reserved, the call
    is free). Opaque to callers beyond `amount` and `charge_for`."""

    amount: int
    hold_id: uuid.UUID | None = None  # a hold of the call's own (leases off)
    claim: LeaseClaim | None = None  # or a share of the account's lease

    def charge_for(self, cost: int) -> int:
        """What settling at `cost` charges: never more than was reserved."""
        return min(cost, self.amount) if cost > 0 else 0


NOTHING = Reservation(0)


class LoggedModel(Protocol):
    """What a request-log row names of the model that served a call (the catalog's
    `ResolvedModel`; the wallet sits below the catalog's users and names only this)."""

    @property
    def id(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def upstream_model(self) -> str: ...
    @property
    def byok(self) -> bool: ...


def log_row(
    *,
    request_id: str,
    account_id: uuid.UUID,
    key_id: uuid.UUID | None,
    model: LoggedModel,
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
    step: int = 1,
) -> dict[str, Any]:
    """The request-log row of one model request (chat or embeddings); `started` and `first`
    are `time.perf_counter()` readings. The model requests one API request makes (re-asks,
    retrieval calls, failed attempts) share its `request_id` and are numbered by `step`."""
    return {
        "request_id": request_id,
        "step": step,
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


class Meter:
    def __init__(
        self, settings: Settings, database: Database, metrics: Metrics = NO_METRICS
    ) -> None:
        self.metrics = metrics
        self.writer = build_writer(settings, database)
        self.live = LiveHolds(database, max_age_seconds=settings.hold_max_age_seconds)
        self.settler = build_settler(settings, self.writer, self.live)
        self.holds = HoldQueue(database, self.settler, self.writer, self.live)
        self.leases = LeaseBook(
            database,
            self.settler,
            calls=settings.wallet_lease_calls,
            idle_seconds=settings.wallet_lease_idle_seconds,
            max_seconds=settings.wallet_lease_max_seconds,
            live=self.live,
        )

    # --- a call's money ----------------------------------------------------------------------

    async def reserve(
        self,
        account_id: uuid.UUID,
        amount: int,
        minimum: int = 0,
        *,
        exact: bool = False,
        ref: str,
    ) -> Reservation:
        """Reserve a call's worst case `amount` for a plan that wants `minimum` spendable
        (`ref` names the call on a hold of its own). `exact`: take no more than the call
        needs (a call clamped to what the balance affords). Raises `InsufficientBalance`,
        `WalletAccountNotFound`, or `WalletWriterUnavailable` (503) while the settlement
        backlog is full or the database does not answer."""
        if amount <= 0:
            return NOTHING
        try:
            if self.leases.enabled:
                claim = await self.leases.reserve(account_id, amount, minimum, exact=exact)
                return Reservation(amount, claim=claim)
            hold_id = await self.holds.hold(
                account_id=account_id, amount_micros=amount, ref=ref, minimum_balance=minimum
            )
        except (PaymentRequired, ServiceUnavailable) as exc:
            self.metrics.wallet_refused(exc.code)
            raise
        return Reservation(amount, hold_id=hold_id)

    def settle(self, reservation: Reservation, cost: int, log: dict[str, Any] | None) -> int:
        """The call ended having cost `cost`: charge it (at most what was reserved; the rest is
        free again) and write its request-log row `log`. Returns the charge. Never waits for
        the database."""
        charge = reservation.charge_for(cost)
        if log is not None:
            self.metrics.record_call(log)
        if reservation.claim is not None:
            self.leases.finish(reservation.claim, charge, log)
        elif reservation.hold_id is not None or log is not None:
            self.settler.submit(
                Settlement(hold_id=reservation.hold_id, cost_micros=charge, log=log)
            )
        return charge

    def release(self, reservation: Reservation) -> None:
        """The reservation ends unused, with no request-log row (the call never ran)."""
        self.settle(reservation, 0, None)

    def record(self, log: dict[str, Any]) -> None:
        """A request-log row that moves no money (a failed attempt before a fallback)."""
        self.metrics.record_call(log)
        self.settler.submit(Settlement(hold_id=None, cost_micros=0, log=log))

    def unreserved(self, account_id: uuid.UUID) -> int:
        """What this process already set aside for the account and no call has reserved: it
        is spendable too, on top of the balance the database reports."""
        return self.leases.free(account_id)

    def check_capacity(self) -> None:
        """Raise 503 `wallet_unavailable` while too many settlements wait for the database."""
        self.settler.check_capacity()

    @property
    def calls_in_flight(self) -> int:
        """Chat calls being served by this process (kept by the chat route): a lone call's
        hold is written at once, calls in company go through the group commit."""
        return self.holds.calls_in_flight

    @calls_in_flight.setter
    def calls_in_flight(self, value: int) -> None:
        self.holds.calls_in_flight = value

    # --- reading the wallet ------------------------------------------------------------------

    async def flush(self, account_id: uuid.UUID | None = None) -> None:
        """Close this process's idle leases (of `account_id`, if given) and wait until every
        settlement so far is written: the wallet then reads as if each call had held and
        settled on its own. Raises `WalletWriterUnavailable` when the database does not
        answer."""
        await self.leases.flush(account_id)

    async def drain(self) -> None:
        """Wait until every settlement (and request-log row) so far is written, leaving the
        leases open."""
        await self.settler.drain()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Before the first request: the writer, then what an earlier server on this data
        directory left unwritten, then the renewal of the holds in use."""
        await self.writer.start()
        await self.settler.start()
        self.live.start()

    async def stop(self) -> None:
        """A server that stops serving stops renewing its holds (`close` does too)."""
        await self.live.stop()

    async def close(self) -> None:
        """At shutdown: close the leases, write (or journal) every settlement, stop the
        writer."""
        await self.live.stop()
        await self.leases.close()
        await self.settler.close()
        await self.writer.close()
