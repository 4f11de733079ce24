"""The wallet's async API. Balances move only through ledger entries; holds reserve money up
front. A hold debits the balance at once (entry `hold`, negative). Settling returns the hold
(entry `release`) and charges the real cost (entry `usage`), so the balance is always the sum
of the entries and never counts reserved money as spendable.

Each function runs the synchronous core in `ledger` inside the caller's session (`run_sync`),
so the request (or job) still owns the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from aivax.kit.clock import utcnow
from aivax.models import EntryKind, LedgerEntry, WalletHold
from aivax.wallet import closing, holds, ledger, open_holds, repository
from aivax.wallet.ledger import (  # noqa: F401 - the errors are part of this API
    MAX_MOVEMENT_MICROS,
    HoldAlreadyReleased,
    HoldNotFound,
    IdempotencyMismatch,
    InsufficientBalance,
    InvalidAmount,
    WalletAccountNotFound,
)

T = TypeVar("T")


async def _run(session: AsyncSession, work: Callable[[Any], T]) -> T:
    def in_session(sync_session: Session) -> T:
        return work(sync_session.connection())

    return await session.run_sync(in_session)


@dataclass(frozen=True, slots=True)
class Posted:
    entry: LedgerEntry
    created: bool


async def post_credit(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    kind: EntryKind,
    amount_micros: int,
    idempotency_key: str,
    description: str = "",
    details: dict[str, Any] | None = None,
) -> Posted:
    """Top-up, refund or adjustment. Replaying an idempotency key returns the first entry."""
    entry_id, created = await _run(
        session,
        lambda conn: ledger.post_credit(
            conn,
            account_id=account_id,
            kind=kind,
            amount_micros=amount_micros,
            idempotency_key=idempotency_key,
            description=description,
            details=details,
        ),
    )
    return Posted(await repository.entry_by_id(session, entry_id), created=created)


async def hold(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    amount_micros: int,
    ref: str,
    minimum_balance: int = 0,
) -> WalletHold:
    """Reserve `amount_micros`; succeeds only if the balance covers it (one conditional UPDATE)."""
    hold_id = await _run(
        session,
        lambda conn: holds.hold(
            conn,
            account_id=account_id,
            amount_micros=amount_micros,
            ref=ref,
            minimum_balance=minimum_balance,
        ),
    )
    return await _load_hold(session, hold_id)


async def settle(session: AsyncSession, hold_id: uuid.UUID, actual_micros: int) -> WalletHold:
    """Charge the real cost (at most the hold) and return the rest. Idempotent."""
    await _run(session, lambda conn: closing.settle(conn, hold_id, actual_micros))
    return await _load_hold(session, hold_id)


async def release(session: AsyncSession, hold_id: uuid.UUID) -> WalletHold:
    """Return a hold untouched (nothing was used). Idempotent; a no-op on a closed hold."""
    await _run(session, lambda conn: closing.release(conn, hold_id))
    return await _load_hold(session, hold_id)


async def _load_hold(session: AsyncSession, hold_id: uuid.UUID) -> WalletHold:
    found = await repository.get_hold(session, hold_id)
    if found is None:
        raise HoldNotFound(f"No hold {str(hold_id)!r}.")
    await session.refresh(found)
    return found


async def reap_stale_holds(session: AsyncSession, *, max_age: timedelta, batch: int = 500) -> int:
    """Expire open holds older than `max_age` (a crashed request must not lock money forever):
    what was recorded against a hold (a lease's calls) is charged, the rest given back."""

    def reap(conn: Any) -> int:
        ids = open_holds.stale_hold_ids(conn, created_before=utcnow() - max_age, limit=batch)
        return sum(closing.close_recorded(conn, hold_id, expire=True) for hold_id in ids)

    return await _run(session, reap)


@dataclass(frozen=True, slots=True)
class WalletSummary:
    account_id: uuid.UUID
    balance_micros: int
    held_micros: int


async def summary(session: AsyncSession, account_id: uuid.UUID) -> WalletSummary:
    def read(conn: Any) -> WalletSummary:
        balance = ledger.cached_balance(conn, account_id)
        if balance is None:
            raise WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
        return WalletSummary(account_id, balance, open_holds.open_hold_total(conn, account_id))

    return await _run(session, read)


async def list_entries(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    limit: int,
    after: int | None,
    kind: EntryKind | None,
) -> Sequence[LedgerEntry]:
    return await repository.list_entries(
        session, account_id, limit=limit, after=after, kind=kind.value if kind else None
    )


async def list_shortfalls(
    session: AsyncSession, *, limit: int, after: int | None
) -> Sequence[LedgerEntry]:
    return await repository.list_shortfalls(session, limit=limit, after=after)


@dataclass(frozen=True, slots=True)
class InvariantReport:
    account_id: uuid.UUID
    cached_balance_micros: int
    ledger_sum_micros: int

    @property
    def holds(self) -> bool:
        return self.cached_balance_micros == self.ledger_sum_micros


def _invariant(conn: Any, account_id: uuid.UUID) -> InvariantReport:
    cached = ledger.cached_balance(conn, account_id)
    if cached is None:
        raise WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    return InvariantReport(account_id, cached, ledger.ledger_sum(conn, account_id))


async def check_invariant(session: AsyncSession, account_id: uuid.UUID) -> InvariantReport:
    """The cached balance must equal the sum of the account's ledger entries."""
    return await _run(session, lambda conn: _invariant(conn, account_id))


async def check_all_invariants(session: AsyncSession) -> list[InvariantReport]:
    return await _run(
        session,
        lambda conn: [_invariant(conn, account_id) for account_id in ledger.all_account_ids(conn)],
    )
