"""All wallet SQL. Every balance change is one conditional UPDATE … RETURNING, which is atomic
on SQLite (the statement takes the write lock) and on PostgreSQL (the row lock re-checks the
WHERE clause after waiting), so concurrent holds can never overdraw an account.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.db import insert_ignoring_conflicts
from aivax.models import Account, HoldStatus, LedgerEntry, WalletHold


async def change_balance(
    session: AsyncSession,
    account_id: uuid.UUID,
    delta: int,
    *,
    floor: int | None,
    minimum: int = 0,
) -> int | None:
    """Add `delta` to the balance; with `floor`, only if the result stays ≥ floor and the
    balance before is ≥ `minimum`. Returns the new balance, or None when the account is missing
    or a condition fails."""
    statement = update(Account).where(Account.id == account_id)
    if floor is not None:
        statement = statement.where(Account.balance_micros + delta >= floor)
    if minimum > 0:
        statement = statement.where(Account.balance_micros >= minimum)
    statement = statement.values(balance_micros=Account.balance_micros + delta).returning(
        Account.balance_micros
    )
    result = await session.execute(statement.execution_options(synchronize_session=False))
    return result.scalar_one_or_none()


async def insert_entry(session: AsyncSession, values: dict[str, Any]) -> int | None:
    """Insert a ledger entry unless its idempotency key exists; returns the new id or None."""
    statement = (
        insert_ignoring_conflicts(
            session, LedgerEntry.__table__, conflict_on=["account_id", "idempotency_key"]
        )
        .values(**values)
        .returning(LedgerEntry.__table__.c.id)
    )
    return (await session.execute(statement)).scalar_one_or_none()


async def entry_by_key(
    session: AsyncSession, account_id: uuid.UUID, idempotency_key: str
) -> LedgerEntry | None:
    query = select(LedgerEntry).where(
        LedgerEntry.account_id == account_id, LedgerEntry.idempotency_key == idempotency_key
    )
    return (await session.scalars(query)).first()


async def entry_by_id(session: AsyncSession, entry_id: int) -> LedgerEntry:
    return (await session.scalars(select(LedgerEntry).where(LedgerEntry.id == entry_id))).one()


async def list_entries(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    limit: int,
    after: int | None,
    kind: str | None,
) -> Sequence[LedgerEntry]:
    """Newest first; `after` is the id of the last entry of the previous page."""
    query = select(LedgerEntry).where(LedgerEntry.account_id == account_id)
    if after is not None:
        query = query.where(LedgerEntry.id < after)
    if kind is not None:
        query = query.where(LedgerEntry.kind == kind)
    query = query.order_by(LedgerEntry.id.desc()).limit(limit + 1)
    return (await session.scalars(query)).all()


async def add_hold(session: AsyncSession, hold: WalletHold) -> WalletHold:
    await session.execute(
        insert(WalletHold).values(
            id=hold.id,
            account_id=hold.account_id,
            amount_micros=hold.amount_micros,
            ref=hold.ref,
            status=hold.status,
            created_at=hold.created_at,
        )
    )
    return hold


async def close_hold(
    session: AsyncSession,
    hold_id: uuid.UUID,
    *,
    from_status: HoldStatus,
    to_status: HoldStatus,
    actual: int,
    now: datetime,
) -> tuple[uuid.UUID, int, int] | None:
    """Move a hold out of `from_status` exactly once, recording min(actual, amount) as charged.
    Returns (account_id, amount, charged) if it moved."""
    charged = case((WalletHold.amount_micros < actual, WalletHold.amount_micros), else_=actual)
    result = await session.execute(
        update(WalletHold)
        .where(WalletHold.id == hold_id, WalletHold.status == from_status.value)
        .values(status=to_status.value, actual_micros=charged, closed_at=now)
        .returning(WalletHold.account_id, WalletHold.amount_micros, WalletHold.actual_micros)
        .execution_options(synchronize_session=False)
    )
    row = result.first()
    return (row[0], row[1], row[2] or 0) if row is not None else None


async def get_hold(session: AsyncSession, hold_id: uuid.UUID) -> WalletHold | None:
    return (await session.scalars(select(WalletHold).where(WalletHold.id == hold_id))).first()


async def stale_hold_ids(
    session: AsyncSession, *, created_before: datetime, limit: int
) -> Sequence[uuid.UUID]:
    query = (
        select(WalletHold.id)
        .where(WalletHold.status == HoldStatus.OPEN.value, WalletHold.created_at < created_before)
        .order_by(WalletHold.created_at)
        .limit(limit)
    )
    return (await session.scalars(query)).all()


async def open_hold_total(session: AsyncSession, account_id: uuid.UUID) -> int:
    query = select(func.coalesce(func.sum(WalletHold.amount_micros), 0)).where(
        WalletHold.account_id == account_id, WalletHold.status == HoldStatus.OPEN.value
    )
    return int(await session.scalar(query) or 0)


async def ledger_sum(session: AsyncSession, account_id: uuid.UUID) -> int:
    query = select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
        LedgerEntry.account_id == account_id
    )
    return int(await session.scalar(query) or 0)


async def cached_balance(session: AsyncSession, account_id: uuid.UUID) -> int | None:
    query = select(Account.balance_micros).where(Account.id == account_id)
    return (await session.execute(query)).scalar_one_or_none()


async def all_account_ids(session: AsyncSession) -> Sequence[uuid.UUID]:
    return (await session.scalars(select(Account.id))).all()
