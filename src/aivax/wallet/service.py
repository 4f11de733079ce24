"""Wallet rules. Balances move only through ledger entries; holds reserve money up front.

A hold debits the balance at once (entry `hold`, negative). Settling returns the hold
(entry `release`) and charges the real cost (entry `usage`), so the balance is always the sum
of the entries and never counts reserved money as spendable.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from aivax.errors import BadRequest, Conflict, NotFound, PaymentRequired
from aivax.kit.clock import utcnow
from aivax.kit.money import micros_to_usd
from aivax.models import EntryKind, HoldStatus, LedgerEntry, WalletHold
from aivax.wallet import repository

MAX_MOVEMENT_MICROS = 10**12  # one million USD in a single movement


class InvalidAmount(BadRequest):
    code = "invalid_amount"


class InsufficientBalance(PaymentRequired):
    code = "insufficient_balance"


class HoldNotFound(NotFound):
    code = "hold_not_found"


class HoldAlreadyReleased(Conflict):
    code = "hold_already_released"


class IdempotencyMismatch(Conflict):
    code = "idempotency_key_reused"


class WalletAccountNotFound(NotFound):
    code = "account_not_found"


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
    if amount_micros == 0 or (kind is not EntryKind.ADJUSTMENT and amount_micros < 0):
        expected = "non-zero" if kind is EntryKind.ADJUSTMENT else "positive"
        raise InvalidAmount(
            f"A {kind.value} amount must be {expected}, got {amount_micros}.",
            param="amount_micros",
        )
    existing = await repository.entry_by_key(session, account_id, idempotency_key)
    if existing is not None:
        return Posted(_same_movement(existing, kind, amount_micros), created=False)
    # A negative adjustment may not take the balance below zero.
    floor = 0 if amount_micros < 0 else None
    balance = await repository.change_balance(session, account_id, amount_micros, floor=floor)
    if balance is None:
        await _raise_missing_or_insufficient(session, account_id, -amount_micros)
    entry_id = await repository.insert_entry(
        session,
        _entry_values(
            account_id, kind, amount_micros, balance, idempotency_key, description, details
        ),
    )
    if entry_id is None:
        # A concurrent request with the same key won the insert: undo our change in this
        # same transaction and answer with the first entry.
        await repository.change_balance(session, account_id, -amount_micros, floor=None)
        winner = await repository.entry_by_key(session, account_id, idempotency_key)
        assert winner is not None  # noqa: S101 - the conflict proves it exists
        return Posted(_same_movement(winner, kind, amount_micros), created=False)
    return Posted(await repository.entry_by_id(session, entry_id), created=True)


def _same_movement(entry: LedgerEntry, kind: EntryKind, amount_micros: int) -> LedgerEntry:
    if entry.kind != kind.value or entry.amount_micros != amount_micros:
        raise IdempotencyMismatch(
            f"Idempotency key {entry.idempotency_key!r} was already used for a {entry.kind} of "
            f"{entry.amount_micros} micros; use a new key for a different movement.",
            param="idempotency_key",
        )
    return entry


async def _raise_missing_or_insufficient(
    session: AsyncSession, account_id: uuid.UUID, needed: int
) -> None:
    balance = await repository.cached_balance(session, account_id)
    if balance is None:
        raise WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    raise InsufficientBalance(
        f"Insufficient balance: {micros_to_usd(balance)} USD available, "
        f"{micros_to_usd(needed)} USD needed. Top up the wallet to continue."
    )


def _entry_values(
    account_id: uuid.UUID,
    kind: EntryKind,
    amount: int,
    balance_after: int | None,
    idempotency_key: str,
    description: str = "",
    details: dict[str, Any] | None = None,
    hold_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "kind": kind.value,
        "amount_micros": amount,
        "balance_after_micros": balance_after,
        "idempotency_key": idempotency_key,
        "hold_id": hold_id,
        "description": description,
        "details": details or {},
        "created_at": utcnow(),
    }


async def hold(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    amount_micros: int,
    ref: str,
    minimum_balance: int = 0,
) -> WalletHold:
    """Reserve `amount_micros`; succeeds only if the balance covers it and is at least
    `minimum_balance` — one conditional UPDATE, atomic on SQLite and PostgreSQL."""
    if not 0 < amount_micros <= MAX_MOVEMENT_MICROS:
        raise ValueError(f"hold amount must be in 1..{MAX_MOVEMENT_MICROS}, got {amount_micros}")
    balance = await repository.change_balance(
        session, account_id, -amount_micros, floor=0, minimum=minimum_balance
    )
    if balance is None:
        await _raise_missing_or_insufficient(session, account_id, amount_micros)
    held = await repository.add_hold(
        session,
        WalletHold(
            id=uuid.uuid4(),
            account_id=account_id,
            amount_micros=amount_micros,
            ref=ref[:200],
            status=HoldStatus.OPEN.value,
            created_at=utcnow(),
        ),
    )
    await repository.insert_entry(
        session,
        _entry_values(
            account_id,
            EntryKind.HOLD,
            -amount_micros,
            balance,
            f"hold:{held.id}",
            details={"ref": held.ref},
            hold_id=held.id,
        ),
    )
    return held


async def settle_charge(session: AsyncSession, hold_id: uuid.UUID, actual_micros: int) -> int:
    """Charge the real cost (at most the hold) and return the rest; the amount charged.

    Idempotent: a hold already settled charges nothing more. A hold the reaper expired is still
    charged (the work was done), even if that takes the balance below zero.
    """
    if actual_micros < 0:
        raise ValueError("actual cost cannot be negative")
    now = utcnow()
    moved = await repository.close_hold(
        session,
        hold_id,
        from_status=HoldStatus.OPEN,
        to_status=HoldStatus.SETTLED,
        actual=actual_micros,
        now=now,
    )
    if moved is not None:
        account_id, amount, charge = moved
        await _return_and_charge(session, account_id, hold_id, amount, charge, actual_micros)
        return charge
    late = await repository.close_hold(
        session,
        hold_id,
        from_status=HoldStatus.EXPIRED,
        to_status=HoldStatus.SETTLED,
        actual=actual_micros,
        now=now,
    )
    if late is not None:
        account_id, _, charge = late
        await _return_and_charge(session, account_id, hold_id, 0, charge, actual_micros)
        return charge
    current = await _load_hold(session, hold_id, refresh=True)
    if current.status == HoldStatus.RELEASED.value:
        raise HoldAlreadyReleased(f"Hold {str(hold_id)!r} was released; it cannot be settled.")
    return 0  # already settled: settling again changes nothing


async def settle(session: AsyncSession, hold_id: uuid.UUID, actual_micros: int) -> WalletHold:
    """`settle_charge`, returning the hold as it now stands. A hold is a ceiling: the caller
    holds the worst case first, so `actual` above the hold is capped and the capped part is
    recorded in the usage entry's details."""
    await settle_charge(session, hold_id, actual_micros)
    return await _load_hold(session, hold_id, refresh=True)


async def _return_and_charge(
    session: AsyncSession,
    account_id: uuid.UUID,
    hold_id: uuid.UUID,
    returned: int,
    charge: int,
    requested: int,
) -> None:
    balance = await repository.change_balance(session, account_id, returned - charge, floor=None)
    assert balance is not None  # noqa: S101 - the hold's account exists (foreign key)
    if returned:
        await repository.insert_entry(
            session,
            _entry_values(
                account_id,
                EntryKind.RELEASE,
                returned,
                balance + charge,
                f"release:{hold_id}",
                hold_id=hold_id,
            ),
        )
    details = {"uncollected_micros": requested - charge} if requested > charge else {}
    if charge:
        await repository.insert_entry(
            session,
            _entry_values(
                account_id,
                EntryKind.USAGE,
                -charge,
                balance,
                f"usage:{hold_id}",
                details=details,
                hold_id=hold_id,
            ),
        )


async def release_unused(
    session: AsyncSession, hold_id: uuid.UUID, to_status: HoldStatus = HoldStatus.RELEASED
) -> bool:
    """Return an open hold untouched; True if this call closed it."""
    moved = await repository.close_hold(
        session, hold_id, from_status=HoldStatus.OPEN, to_status=to_status, actual=0, now=utcnow()
    )
    if moved is None:
        return False
    account_id, amount, _ = moved
    await _return_and_charge(session, account_id, hold_id, amount, 0, 0)
    return True


async def release(session: AsyncSession, hold_id: uuid.UUID) -> WalletHold:
    """Return a hold untouched (nothing was used). Idempotent; a no-op on a closed hold."""
    await release_unused(session, hold_id)
    return await _load_hold(session, hold_id, refresh=True)


async def _load_hold(
    session: AsyncSession, hold_id: uuid.UUID, *, refresh: bool = False
) -> WalletHold:
    found = await repository.get_hold(session, hold_id)
    if found is None:
        raise HoldNotFound(f"No hold {str(hold_id)!r}.")
    if refresh:
        await session.refresh(found)
    return found


async def reap_stale_holds(session: AsyncSession, *, max_age: timedelta, batch: int = 500) -> int:
    """Expire open holds older than `max_age` (a crashed request must not lock money forever)."""
    ids = await repository.stale_hold_ids(session, created_before=utcnow() - max_age, limit=batch)
    expired = 0
    for hold_id in ids:
        expired += await release_unused(session, hold_id, HoldStatus.EXPIRED)
    return expired


@dataclass(frozen=True, slots=True)
class WalletSummary:
    account_id: uuid.UUID
    balance_micros: int
    held_micros: int


async def summary(session: AsyncSession, account_id: uuid.UUID) -> WalletSummary:
    balance = await repository.cached_balance(session, account_id)
    if balance is None:
        raise WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    held = await repository.open_hold_total(session, account_id)
    return WalletSummary(account_id=account_id, balance_micros=balance, held_micros=held)


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


@dataclass(frozen=True, slots=True)
class InvariantReport:
    account_id: uuid.UUID
    cached_balance_micros: int
    ledger_sum_micros: int

    @property
    def holds(self) -> bool:
        return self.cached_balance_micros == self.ledger_sum_micros


async def check_invariant(session: AsyncSession, account_id: uuid.UUID) -> InvariantReport:
    """The cached balance must equal the sum of the account's ledger entries."""
    cached = await repository.cached_balance(session, account_id)
    if cached is None:
        raise WalletAccountNotFound(f"No account {str(account_id)!r}.", param="account_id")
    total = await repository.ledger_sum(session, account_id)
    return InvariantReport(account_id, cached, total)


async def check_all_invariants(session: AsyncSession) -> list[InvariantReport]:
    return [
        await check_invariant(session, account_id)
        for account_id in await repository.all_account_ids(session)
    ]
