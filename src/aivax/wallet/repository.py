"""ORM reads of the wallet (entries and holds as objects); all writes live in `ledger`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.models import LedgerEntry, WalletHold


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


async def get_hold(session: AsyncSession, hold_id: uuid.UUID) -> WalletHold | None:
    return (await session.scalars(select(WalletHold).where(WalletHold.id == hold_id))).first()


async def list_shortfalls(
    session: AsyncSession, *, limit: int, after: int | None
) -> Sequence[LedgerEntry]:
    """Late charges the balance could not pay in full (`closing.charge_late`), every account,
    newest first. A scan of usage entries: an operator's view, not a hot path."""
    shortfall = LedgerEntry.details["shortfall_micros"].as_integer()
    query = select(LedgerEntry).where(LedgerEntry.kind == "usage", shortfall > 0)
    if after is not None:
        query = query.where(LedgerEntry.id < after)
    query = query.order_by(LedgerEntry.id.desc()).limit(limit + 1)
    return (await session.scalars(query)).all()
